"""``bench/bench_attend.py`` on a CPU: every implementation is timed on the same layer, kvcomp's
kernel and the torch path agree, and bad arguments are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_attend.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_a_small_layer_is_timed_for_every_implementation(tmp_path: Path) -> None:
    out = tmp_path / "attend.json"
    proc = _run("--lengths", "300", "--batch", "1", "2", "--kv-heads", "2", "--group", "3", "--head-dim", "64",
                "--calls", "2", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["impl"]) for r in rows] == [(b, i) for b in (1, 2) for i in ("sdpa", "kvcomp", "kvcomp-torch")]
    dense_bytes = {r["batch"]: r["kv_bytes"] for r in rows if r["impl"] == "sdpa"}
    for r in rows:
        assert r["wall_us"] > 0 and r["host_us"] > 0
        if r["impl"] != "sdpa":
            assert r["max_abs_diff"] < 1e-4  # the same attention, summed in another order
            assert r["kv_bytes"] < dense_bytes[r["batch"]] / 2  # 35% dropped, the tiers packed
    assert "| 300 | 2 | kvcomp |" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lengths", "96", "--dense", "40"], "--dense must be in 1..33"),
        (["--head-dim", "48"], "--head-dim must be a multiple of 64"),
        (["--lengths", "8"], "every --lengths must be >= 16"),
        (["--batch", "0"], "--batch, --kv-heads, --group, --calls and --repeats must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present: --device cuda is valid here")
def test_cuda_without_a_gpu_is_refused() -> None:
    proc = _run("--device", "cuda")
    assert proc.returncode == 2 and "CUDA is not available here" in proc.stderr
