"""``bench/bench_prefill.py`` on the tiny shape: it runs, measures what it says, refuses bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_prefill.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_tiny_shape_reports_bytes_and_thinning(tmp_path: Path) -> None:
    out = tmp_path / "prefill.json"
    proc = _run("--shape", "tiny", "--tokens", "700", "--presets", "full", "fast", "--repeats", "1",
                "--decode-tokens", "2", "--device", "cpu", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| 700 | fast |" in proc.stdout
    data = json.loads(out.read_text())
    rows = {r["preset"]: r for r in data["rows"]}
    assert data["machine"]["shape"] == "tiny" and data["machine"]["dtype"] == "float32"
    # full stores fp32 K/V: twice an fp16 cache; fast packs and drops tokens.
    assert rows["full"]["kv_frac_fp16"] == pytest.approx(2.0)
    assert 0 < rows["fast"]["kv_frac_fp16"] < 0.5
    assert all(r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--presets", "nope"], "unknown preset(s) ['nope']"),
        (["--tokens", "5000"], "exceed tiny's 4096 positions"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_by_name(args: list[str], message: str) -> None:
    proc = _run("--shape", "tiny", "--device", "cpu", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
