"""``bench/bench_decode.py`` on the tiny shape: it runs every config, ratios are against ``full``,
stock transformers decodes the same greedy tokens as kvcomp's own uncompressed path, ``--profile``
writes each config's prefill and decode op tables; the bench
scripts that share its config resolver refuse bad arguments before loading a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_decode.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_tiny_shape_times_every_config_against_full(tmp_path: Path) -> None:
    out, profile = tmp_path / "decode.json", tmp_path / "profile.txt"
    proc = _run("--shape", "tiny", "--lengths", "160", "--batch", "1", "2", "--repeats", "1", "--decode-tokens", "3",
                "--configs", "transformers", "full", "default", "--json", str(out), "--profile", str(profile))
    assert proc.returncode == 0, proc.stderr
    summary, *tables = profile.read_text().split("\n## ")
    assert [line.split(":")[0] for line in summary.strip().splitlines()] == ["transformers", "full", "default"]
    assert [t.split(",")[0] for t in tables] == [f"{c} {p} (160 tokens" for c in ("transformers", "full", "default")
                                                 for p in ("prefill", "decode")]  # no CUDA: host-time tables only
    assert tables[5].startswith("default decode (160 tokens, batch 2, 3 decode steps), by host time") and "aten::" in tables[5]
    assert "prefill" in summary.splitlines()[2] and "per decode step" in summary.splitlines()[2]
    rows = {(r["config"], r["batch"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(c, b) for c in ("transformers", "full", "default") for b in (1, 2)}
    for batch in (1, 2):
        assert rows[("transformers", batch)]["same_tokens_as_full"], "stock and kvcomp full decode alike"
        assert 0 < rows[("default", batch)]["kv_frac_fp16"] < 1
        assert all(rows[(c, batch)]["decode_tokens_per_s"] > 0 and rows[(c, batch)]["ttft_s"] > 0 for c in ("full", "default"))
    assert "| 160 | 2 | default |" in proc.stdout
    assert "TTFT / full, pairs (<= 1)" in proc.stdout and "1.00 (1/1)" in proc.stdout  # full against itself


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "default"], "must include 'full'"),
        (["--configs", "full", "nope"], "unknown config(s) ['nope']"),
    ],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    proc = _run("--shape", "tiny", *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_config_file_times_under_its_stem(tmp_path: Path) -> None:
    config = tmp_path / "thin.yaml"
    config.write_text("scorer: prompt_guided\npropagator: {name: selective, keep_ratio_by_layer: {1: 0.5}}\n")
    out = tmp_path / "decode.json"
    proc = _run("--shape", "tiny", "--lengths", "160", "--repeats", "1", "--decode-tokens", "2",
                "--configs", "full", str(config), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"full", "thin"}
    assert rows["thin"]["kv_frac_fp16"] < 1, "the file's propagation thinned the cache"


def test_a_bad_config_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("quantizer: {name: mixed_precision, frac_8bit: 2}\n")
    proc = _run("--shape", "tiny", "--configs", "full", str(config))
    assert proc.returncode == 2 and "bad.yaml" in proc.stderr and "frac_8bit" in proc.stderr, proc.stderr


def test_scripts_that_need_a_compression_config_refuse_the_baseline_before_any_model_loads() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "demo_passcodes.py"), "--configs", "fast,transformers"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'transformers' (stock transformers) has no compression config here" in proc.stderr
    assert "Loading" not in proc.stderr


def test_prefill_costs_refuses_a_prompt_too_short_before_any_model_loads() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "prefill_costs.py"), "--tokens", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "--tokens must be >= 2" in proc.stderr, proc.stderr
    assert "Loading" not in proc.stderr


def test_thinning_layer_bench_refuses_bad_configs_before_any_model_loads(tmp_path: Path) -> None:
    script = SCRIPT.parent / "thinning_layer.py"
    for configs, message in ((["nope"], "unknown config(s) ['nope']"), (["full", "fast"], "'full' is always the baseline")):
        proc = subprocess.run([sys.executable, str(script), "--configs", *configs], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Loading" not in proc.stderr


def test_the_gpu_suite_runs_end_to_end_on_a_cpu(tmp_path: Path) -> None:
    """``bench/gpu_suite.sh`` with its CPU knobs: every step runs and leaves its log and tables."""
    env = {**os.environ, "GPU_DEVICE": "cpu", "GPU_SHAPE": "tiny", "SHORT": "96", "LONG": "128", "NO_INSTALL": "1",
           "REPEATS": "1", "REPEATS_B8": "1", "B8_CONFIGS": "full default", "NO_CUDNN_ROW": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT.parent / "gpu_suite.sh"), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in tmp_path.iterdir()} == {
        "setup.txt", "attend.txt", "attend.json", "decode_b1.txt", "decode_b1.json", "decode_b8.txt", "decode_b8.json",
        "profile.txt", "profile_ops.txt"}
    for step in ("attend", "decode_b1", "decode_b8", "profile"):
        assert "exit 0 after" in (tmp_path / f"{step}.txt").read_text(), step
    assert "| 128 | 8 | default |" in proc.stdout
    assert {(r["tokens"], r["batch"], r["impl"]) for r in json.loads((tmp_path / "attend.json").read_text())["rows"]} == {
        (n, b, impl) for n in (96, 128) for b in (1, 8) for impl in ("sdpa", "kvcomp", "kvcomp-torch")}
