"""``bench/prefill_ops.py``: it counts a prefill's torch ops per layer through the GPU's quantizer
path (the Triton interpreter here) and names who issued them; it refuses a config that compresses
nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "prefill_ops.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_ops_per_layer_are_counted_and_attributed() -> None:
    proc = _run("--configs", "default", "--layers", "3", "--tokens", "96")
    assert proc.returncode == 0, proc.stderr
    head = re.search(r"## default: ([\d.]+) non-view torch ops per layer .* sorts per layer ([\d.]+)", proc.stdout)
    assert head, proc.stdout
    assert float(head.group(1)) > 20 and 2 <= float(head.group(2)) <= 3  # a layer sorts twice, the stream once
    assert "plugins/kvcomp_plugins/quantizers/tiers.py:split_tokens" in proc.stdout
    assert "kvcore/model.py" in proc.stdout


def test_a_config_that_compresses_nothing_is_refused() -> None:
    proc = _run("--configs", "full")
    assert proc.returncode == 2 and "'full' compresses nothing" in proc.stderr
