"""CompressionBenchmark and ``kvcomp bench``: rows, report, resume, refusals (tiny random LLaMA)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvcore.registry import get_registry
from kvcomp_eval.runs.store import REFERENCE, config_hash, read_results, row_key
from kvcomp_eval.runs.suite import BenchSuite
from kvcomp_eval.runs.benchmark import CompressionBenchmark
from kvcore.cli import main
from kvcore.config import CompressionConfig

# A schedule the 4-layer test model has (the shipped `fast` preset names layers 8 and 16).
PROPAGATING = """\
description: mixed precision plus propagation after layer 2
scorer: {name: prompt_guided}
quantizer: {name: mixed_precision, frac_8bit: 0.2, frac_4bit: 0.3, frac_drop: 0.5, residual_length: 16}
propagator: {name: selective, keep_ratio_by_layer: {2: 0.5}}
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def prop_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "prop.yaml"
    path.write_text(PROPAGATING, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first_run(tiny_model_dir: Path, prop_config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One finished run (full, default, prop on 2 passkey prompts) and what it printed."""
    out = tmp_path_factory.mktemp("first") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(bench_args(tiny_model_dir, out, "--preset", "default", "--config", str(prop_config), "--limit", "2"))
    torch.set_num_threads(before)
    assert rc == 0
    return out, buf.getvalue()


@pytest.fixture()
def run_copy(first_run: tuple[Path, str], tmp_path: Path) -> Path:
    """A copy of the finished run's folder to resume into."""
    out = tmp_path / "run"
    shutil.copytree(first_run[0], out)
    return out


def bench_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "bench", "--suite", "passkey", "--lengths", "300", "--depths", "0.2,0.8", "--model", str(model),
        "--max-new-tokens", "6", "--out", str(out), "--no-progress", *extra,
    ]


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# -- the whole run ----------------------------------------------------------------------------------
def test_bench_writes_rows_summary_and_plots(tiny_model_dir, prop_config, first_run):
    out, printed = first_run
    rows = read_results(out / "results.jsonl")
    assert [r["config"] for r in rows] == [REFERENCE, "default", "prop"] * 2  # full first on every prompt
    assert len({r["example_id"] for r in rows}) == 2
    for ex in {r["example_id"] for r in rows}:
        mine = [r for r in rows if r["example_id"] == ex]
        assert len({r["prompt_tokens"] for r in mine}) == 1  # the same prompt for every config
    full, default, prop = rows[:3]
    assert full["kl_mean"] == 0.0 and full["exact_match"] is True and full["kv_fraction"] == 2.0  # fp32 cache
    for row in (default, prop):
        assert 0 < row["kv_bytes"] < row["kv_bytes_fp16_full"]
        assert row["kv_fraction"] == pytest.approx(row["kv_bytes"] / row["kv_bytes_fp16_full"])
        assert row["avg_bits"] == pytest.approx(16 * row["kv_fraction"])
        assert len(row["kl_per_step"]) == min(8, len(full["token_ids"]))
        assert row["kl_mean"] == pytest.approx(sum(row["kl_per_step"]) / len(row["kl_per_step"]))
        assert row["kl_first"] == row["kl_per_step"][0] and row["kl_mean"] > 0
        assert 0.0 <= row["prefix_agreement"] <= 1.0 and row["ttft_s"] > 0
        assert row["config_hash"] == config_hash(
            CompressionConfig.from_preset("default") if row["config"] == "default" else CompressionConfig.from_file(prop_config)
        )
    # Propagation: later layers store fewer tokens than early ones.
    assert prop["tokens_kept_per_layer"][3] < prop["tokens_kept_per_layer"][0]

    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "added by the benchmark" in summary
    command = next(line for line in summary.splitlines() if line.startswith("- command:"))
    assert command.startswith("- command: `kvcomp bench --preset default --config ") and "--suite passkey" in command
    assert "torch " in summary and "CPUs" in summary
    table = [line for line in summary.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in table[:3]] == ["`full`", "`default`", "`prop`"]
    with (out / "results.csv").open(newline="") as fh:
        table_rows = list(csv.DictReader(fh))
    assert [r["config"] for r in table_rows] == [r["config"] for r in rows]
    assert json.loads(table_rows[1]["kl_per_step"]) == rows[1]["kl_per_step"]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2 and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    run = json.loads((out / "run.json").read_text())
    assert list(run["configs"]) == [REFERENCE, "default", "prop"] and run["identity"]["model"] == str(tiny_model_dir)
    assert "| `prop` |" in printed


def test_rerun_skips_finished_rows_and_adds_only_new_ones(tiny_model_dir, prop_config, run_copy):
    out = run_copy
    before = (out / "results.jsonl").read_bytes()
    assert main(bench_args(tiny_model_dir, out, "--preset", "default", "--config", str(prop_config), "--limit", "2")) == 0
    assert (out / "results.jsonl").read_bytes() == before  # nothing redone
    assert main(bench_args(tiny_model_dir, out, "--preset", "default", "--preset", "quant-only", "--limit", "3")) == 0
    after = (out / "results.jsonl").read_bytes()
    assert after.startswith(before)  # appended only
    rows = read_results(out / "results.jsonl")
    keys = [row_key(r) for r in rows]
    # 2 examples x (full, default, prop) + quant-only on them + a third example x (full, default, quant-only)
    assert len(keys) == len(set(keys)) == 6 + 2 + 3


def test_changed_config_contents_get_new_rows_and_the_report_uses_them(tiny_model_dir, run_copy, tmp_path):
    out = run_copy
    changed = tmp_path / "prop.yaml"
    changed.write_text(PROPAGATING.replace("frac_drop: 0.5", "frac_drop: 0.4").replace("frac_8bit: 0.2", "frac_8bit: 0.3"))
    assert main(bench_args(tiny_model_dir, out, "--config", str(changed), "--limit", "1")) == 0
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 7  # the reference row is reused; only the changed config ran
    assert len({r["config_hash"] for r in rows if r["config"] == "prop"}) == 2
    summary = (out / "summary.md").read_text()
    assert "2 older row(s)" in summary  # the old prop rows stay in the file, out of the tables


def test_report_is_rebuilt_from_results_alone(run_copy, tmp_path):
    out = run_copy
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.jsonl").write_bytes((out / "results.jsonl").read_bytes())
    assert main(["bench", "report", str(bare)]) == 0
    summary = (bare / "summary.md").read_text()
    assert "| `full` | 2 |" in summary and "| `prop` | 2 |" in summary
    assert len(list(bare.glob("*.png"))) >= 2
    original = (out / "summary.md").read_text()
    (out / "summary.md").unlink()
    assert main(["bench", "report", str(out)]) == 0
    regenerated = (out / "summary.md").read_text()
    assert regenerated.split("## passkey")[1] == original.split("## passkey")[1]


# -- interruption -----------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def test_interrupted_run_resumes_without_losing_or_repeating_rows(tiny_model_dir, tmp_path):
    """Ctrl-C a real ``kvcomp bench`` process mid-run, then rerun it: every row once, none lost.

    (A ``kill -9`` can at worst cut the last line: see the next test.)
    """
    sig = signal.SIGINT
    out = tmp_path / "run"
    # Enough rows (3 configs x 16 prompts) that a busy machine cannot finish them all before the
    # signal lands, while the run still takes only seconds on an idle one.
    args = bench_args(tiny_model_dir, out, "--preset", "default", "--preset", "quant-only", "--limit", "16")
    results = out / "results.jsonl"
    with (tmp_path / "stderr.txt").open("wb") as err:
        # A test run started in the background (CI, `make test &`) inherits SIGINT as ignored, and
        # Python keeps ignoring it; give the child the default action, as an interactive shell would.
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvcore.cli", *args],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                if results.is_file() and results.read_bytes().count(b"\n") >= 2:
                    break
                time.sleep(0.005)
            proc.send_signal(sig)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 130, (tmp_path / "stderr.txt").read_text()[-2000:]
    first = results.read_bytes()
    done = read_results(results)
    assert 2 <= len(done) < 48, "the run finished before it could be interrupted"
    assert first.endswith(b"\n")  # Ctrl-C never leaves half a row

    assert main(args) == 0
    rows = read_results(results)
    keys = [row_key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 16 * 3
    assert results.read_bytes().startswith(first)  # earlier rows kept byte for byte


def test_a_cut_off_last_line_is_ignored_and_repaired(tiny_model_dir, prop_config, run_copy):
    out = run_copy
    results = out / "results.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    results.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # the last row cut off mid-write (kill -9)
    assert len(read_results(results)) == 5
    assert main(bench_args(tiny_model_dir, out, "--preset", "default", "--config", str(prop_config), "--limit", "2")) == 0
    rows = read_results(results)
    assert [r["config"] for r in rows] == [REFERENCE, "default", "prop"] * 2
    assert results.read_bytes().startswith(b"".join(lines[:-1]))
    assert all(line.startswith(b"{") and line.endswith(b"}") for line in results.read_bytes().splitlines())


def test_a_corrupt_middle_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"config": "full", "suite": "s", "example_id": "e", "config_hash": "h"}\nnot json\n{}\n')
    with pytest.raises(ValueError, match=r"results.jsonl, line 2"):
        read_results(path)


# -- refusals ---------------------------------------------------------------------------------------
def test_resume_into_a_folder_of_another_run_is_refused(tiny_model_dir, run_copy, tmp_path, capsys):
    out = run_copy
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    args = bench_args(tiny_model_dir, out, "--preset", "default", "--limit", "1")
    args[args.index("--lengths") + 1] = "400"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "suite.lengths: [300] there, [400] now" in err
    args = bench_args(tmp_path / "elsewhere", out, "--preset", "default", "--limit", "1")
    (tmp_path / "elsewhere").mkdir()
    assert main(args) == 2
    assert "model:" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--preset", "nosuch"], "unknown preset 'nosuch'; presets: compact, default"),
        (["--preset", "default", "--suite", "needles"], "unknown suite 'needles'"),
        (["--preset", "default", "--suite", "longbench:nosuch"], "unknown LongBench task"),
        (["--preset", "default", "--suite", "longbench:qasper", "--data-dir", "/nonexistent/lb"], "LongBench data folder not found"),
        (["--preset", "default", "--depths", "0.5,1.5"], "depths must lie in [0, 1]"),
        ([], "give at least one --preset"),
        (["--peer", "tova"], "tova needs a compression ratio, e.g. tova:0.5"),
        (["--peer", "hqq:5"], "hqq takes a bit width in (1, 2, 3, 4, 8)"),
        (["--peer", "nosuch:0.5"], "unknown peer 'nosuch:0.5'"),
        (["--config", "/nonexistent/c.yaml"], "does not exist"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    args = bench_args(tiny_model_dir, out, "--limit", "1")
    if "--suite" in extra:
        i = args.index("--suite")
        del args[i : i + 2]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", ["bench", "run"])
def test_out_naming_a_file_or_a_missing_cuda_is_one_line_and_touches_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    taken = tmp_path / "results.txt"
    taken.write_text("keep me\n", encoding="utf-8")
    out = tmp_path / "run"
    for target, extra, message in (
        (taken, [], f"--out {taken} is a file; give a folder"),
        (out, ["--device", "cuda"], "device 'cuda': this machine has no CUDA device"),
    ):
        args = bench_args(tiny_model_dir, target, "--preset", "default", *extra)
        args[0] = command
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("kvcomp: error: ") and err.count("\n") == 1 and message in err, err
    assert taken.read_text(encoding="utf-8") == "keep me\n" and not out.exists()


def test_full_is_reserved_for_the_uncompressed_model(tmp_path):
    compressing = CompressionConfig.from_preset("default")
    with pytest.raises(ValueError, match="reserved for the uncompressed reference"):
        CompressionBenchmark({REFERENCE: compressing}, "passkey", tmp_path)


def _longbench_dir(folder: Path, bad_line: int | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    lines = []
    for i in range(3):
        row = {"input": f"What colour is item {i}?", "context": "The sky is blue. " * 6 + f"Item {i} is red.",
               "answers": ["red"], "all_classes": None, "length": 30, "_id": f"id{i}"}
        if bad_line == i + 1:
            del row["context"]
        lines.append(json.dumps(row))
    (folder / "qasper.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_longbench_suite_runs_and_a_bad_row_is_named_without_losing_results(tiny_model_dir, tmp_path, capsys):
    data = _longbench_dir(tmp_path / "lb")
    out = tmp_path / "run"
    args = ["bench", "--preset", "default", "--suite", "longbench:qasper", "--data-dir", str(data), "--limit", "1",
            "--max-new-tokens", "4", "--model", str(tiny_model_dir), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rows = read_results(out / "results.jsonl")
    assert [(r["config"], r["example_id"], r["task"]) for r in rows] == [(REFERENCE, "qasper-0", "qasper"), ("default", "qasper-0", "qasper")]
    assert rows[1]["question_span"] is not None and rows[1]["generated_tokens"] <= 4
    before = (out / "results.jsonl").read_bytes()
    capsys.readouterr()
    _longbench_dir(data, bad_line=3)
    assert main(args[:-1] + ["--limit", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "qasper.jsonl, line 3" in err and "context" in err
    assert (out / "results.jsonl").read_bytes() == before


def test_the_same_data_folder_spelt_with_dots_resumes_the_run(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = _longbench_dir(tmp_path / "lb")
    (tmp_path / "work").mkdir()
    out = tmp_path / "run"
    args = ["bench", "--preset", "default", "--suite", "longbench:qasper", "--limit", "1", "--max-new-tokens", "2",
            "--model", str(tiny_model_dir), "--out", str(out), "--no-progress"]
    monkeypatch.chdir(tmp_path / "work")
    assert main([*args, "--data-dir", "../lb"]) == 0
    assert json.loads((out / "run.json").read_text())["identity"]["suite"]["data_dir"] == str(data)
    # A folder written before paths were normalised kept the dots; both spellings are one folder.
    run = json.loads((out / "run.json").read_text())
    run["identity"]["suite"]["data_dir"] = str(tmp_path / "work" / ".." / "lb")
    (out / "run.json").write_text(json.dumps(run))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main([*args, "--data-dir", str(data)]) == 0
    assert "2 rows already" in capsys.readouterr().err


def test_min_prompt_tokens_keeps_only_long_enough_rows(tiny_model_dir, tmp_path):
    folder = tmp_path / "lb"
    folder.mkdir()
    rows = [{"input": f"What colour is item {i}?", "context": "The sky is blue. " * reps + f"Item {i} is red.",
             "answers": ["red"], "all_classes": None, "length": 30, "_id": f"id{i}"} for i, reps in enumerate([2, 20, 3, 25, 30])]
    (folder / "qasper.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")

    def ids(**options):
        suite = BenchSuite.parse("longbench:qasper", data_dir=folder, **options)
        bench = CompressionBenchmark({"default": CompressionConfig.from_preset("default")}, suite, tmp_path / "run",
                                     model=str(tiny_model_dir), max_new_tokens=2, progress=False)
        return [(ex.example_id, ex.prompt_tokens) for ex in bench.examples()]

    every = ids()
    floor = sorted(n for _, n in every)[2]  # the three longest rows (1, 3, 4) reach it
    long_ones = [(i, n) for i, n in every if n >= floor]
    assert [i for i, _ in long_ones] == ["qasper-1", "qasper-3", "qasper-4"]
    assert ids(min_prompt_tokens=floor, limit=2) == long_ones[:2]  # --limit counts the rows kept
    assert ids(min_prompt_tokens=floor, offset=2) == long_ones[1:]  # --offset still skips file rows first
    # An empty selection names the filters that emptied it.
    with pytest.raises(ValueError, match="has no examples left after --offset 1, --min-prompt-tokens 1000000$"):
        ids(min_prompt_tokens=10**6, offset=1)
    # An offset past the file's end is refused with the data check, before any model loads.
    suite = BenchSuite.parse("longbench:qasper", data_dir=folder, offset=5)
    bench = CompressionBenchmark({"default": CompressionConfig.from_preset("default")}, suite, tmp_path / "past",
                                 model="/nonexistent/model", max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="--offset 5 is past the last row of qasper"):
        bench.check()
    with pytest.raises(ValueError, match="probes take their lengths"):
        BenchSuite.parse("passkey", min_prompt_tokens=100)
    with pytest.raises(ValueError, match="exceeds max_prompt_tokens"):
        BenchSuite.parse("longbench:qasper", min_prompt_tokens=500, max_prompt_tokens=400)


def test_suite_parsing_and_identity():
    suite = BenchSuite.parse("passkey", lengths=[500, 1000], limit=4, offset=2)
    assert suite.label == "passkey" and suite.depths == (0.1, 0.5, 0.9)
    assert "limit" not in suite.identity() and suite.identity()["lengths"] == [500, 1000]
    lb = BenchSuite.parse("longbench:qasper, hotpotqa")
    assert lb.tasks == ("qasper", "hotpotqa") and lb.label == "longbench:qasper,hotpotqa"
    assert len(BenchSuite.parse("longbench").tasks) == 13
    with pytest.raises(ValueError, match="unknown suite"):
        BenchSuite.parse("passkeys")
    with pytest.raises(ValueError, match="limit"):
        BenchSuite.parse("passkey", limit=0)


def test_config_hash_follows_contents_not_description():
    base = CompressionConfig.from_preset("default")
    assert config_hash(base) == config_hash(base.with_overrides({"description": "other words"}))
    assert config_hash(base) != config_hash(base.with_overrides({"quantizer.frac_8bit": 0.2, "quantizer.frac_drop": 0.25}))
    # Defaults spelt out or left implicit: the same config.
    assert config_hash(base) == config_hash(base.resolved())


def test_probe_limit_covers_every_cell(tiny_model_dir, tmp_path):
    bench = CompressionBenchmark(
        {"default": CompressionConfig.from_preset("default")},
        BenchSuite.parse("passkey", lengths=[300, 400], depths=[0.2, 0.8], limit=5),
        tmp_path / "x",
        model=str(tiny_model_dir),
        progress=False,
    )
    ids = [e.example_id for e in bench.examples()]
    assert ids == [
        "passkey-L300-d0.2-i0", "passkey-L300-d0.8-i0", "passkey-L400-d0.2-i0", "passkey-L400-d0.8-i0",
        "passkey-L300-d0.2-i1",
    ]
    assert not (tmp_path / "x").exists()


@pytest.mark.model
def test_bench_on_the_embedded_model(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "kvcore.cli", "bench", "--preset", "full", "--preset", "default", "--preset", "tiny",
           "--suite", "passkey", "--limit", "6", "--lengths", "500", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(out / "results.jsonl")
    assert len(rows) == 18 and {r["config"] for r in rows} == {REFERENCE, "default", "tiny"}
    full = [r for r in rows if r["config"] == REFERENCE]
    assert sum(r["score"] for r in full) >= 4  # the model finds the pass key at 500 tokens
    default = [r for r in rows if r["config"] == "default"]
    assert all(r["kv_fraction"] < 0.6 for r in default)
    tiny = [r for r in rows if r["config"] == "tiny"]
    # Every byte held after the answer was generated, against an fp16 cache of the same tokens.
    assert all(r["kv_bytes"] <= 0.0625 * r["kv_bytes_fp16_full"] for r in tiny)
    assert sum(r["score"] for r in tiny) >= 4
    summary = (out / "summary.md").read_text()
    assert "| `default` | 6 |" in summary and "it was not asked for" not in summary
    assert len(list(out.glob("*.png"))) >= 2


def test_a_new_option_left_off_keeps_the_hashes_of_earlier_rows(monkeypatch):
    base = CompressionConfig.from_preset("default")
    before = config_hash(base)
    registry = get_registry()
    spec = registry.get("quantizer", "mixed_precision")

    class WithOption(spec.config_model):  # what a release adding an optional parameter looks like
        new_option: int | None = None

    monkeypatch.setitem(registry._specs, ("quantizer", "mixed_precision"), dataclasses.replace(spec, config_model=WithOption))
    assert "new_option" in base.resolved().quantizer.params
    assert config_hash(base) == before, "rows stored before the option existed still match"
    assert config_hash(base.with_overrides({"quantizer.new_option": 3})) != before
