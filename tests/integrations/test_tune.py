"""``kvcomp tune``: Optuna samplers end to end on a tiny random LLaMA, resume, split, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from tiny_models import save_bpe_llama
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomp_eval.tune.objective import FidelityObjective, aggregate_kl, build_prompts, compute_references
from kvcomp_eval.tune.space import SearchSpace, build_trial_config, tier_fractions
from kvcomp_eval.tune.settings import TuneError, TuneSettings
from kvcomp_eval.tune.study import _check_study_spec, check_report_split, open_storage
from kvcore.cli import main
from kvcore.config import CompressionConfig

LENGTH = 140  # tokens: the shortest passkey probe the tiny tokenizer can hold is ~125


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # The tiny model is latency-bound; extra threads only fight over the shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer LLaMA (GQA 4/2 heads, head_dim 32) with a BPE tokenizer trained on probe text."""
    from kvcomp_eval.data.probes import _DEFAULT_FILLER, _INTRO_FACT

    corpus = [*_DEFAULT_FILLER, _INTRO_FACT, "The pass key is 12345. Remember it. 67890 is the pass key.",
              "Question: What is the pass key?\nAnswer: The pass key is", "Summarize the news articles."]
    corpus += [str(i) for i in range(100)]
    out = tmp_path_factory.mktemp("tiny_llama")
    save_bpe_llama(out, corpus * 20, vocab_size=400, num_hidden_layers=4, max_position_embeddings=512)
    return out


def tune(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["tune", "--no-progress", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def base_args(model_dir: Path, out: Path, sampler: str, trials: int) -> list[str]:
    return [
        "--sampler", sampler, "--trials", str(trials), "--suite", "passkey", "--lengths", str(LENGTH),
        "--limit", "1", "--kl-steps", "4", "--startup-trials", "1", "--population-size", "2",
        "--model", str(model_dir), "--out", str(out), "--json",
    ]


def read_trials(out: Path) -> list[dict[str, str]]:
    with (out / "trials.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("sampler", ["random", "tpe", "cmaes", "nsga2"])
def test_sampler_runs_end_to_end(
    sampler: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tune"
    rc, stdout, err = tune(capsys, *base_args(tiny_model_dir, out, sampler, 3))
    assert rc == 0, err
    record = json.loads(stdout)
    assert record["trials_run"] == [0, 1, 2]
    rows = read_trials(out)
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    for row in rows:
        assert row["state"] in {"COMPLETE", "PRUNED"}
        if row["state"] == "PRUNED":  # only group_size 64 can be invalid here (head_dim 32)
            assert "head_dim=32" in row["prune_reason"] and row["group_size"] == ""
        else:
            kv, kl = float(row["kv_fraction"]), float(row["kl"])
            assert 0 < kv < 2 and kl >= 0
            fracs = [float(row[k]) for k in ("frac_8bit", "frac_4bit", "frac_2bit", "frac_drop")]
            assert math.isclose(sum(fracs), 1.0, abs_tol=1e-9)
            if sampler == "nsga2":
                assert float(row["objective_0"]) == pytest.approx(float(row["quality"]))
                assert float(row["objective_1"]) == pytest.approx(kv)
            else:
                assert float(row["objective_0"]) == pytest.approx(float(row["quality"]) + float(row["penalty"]))
    assert record["best_trial"] is not None
    best = CompressionConfig.from_file(out / "best.yaml")
    assert best.quantizer.name == "mixed_precision" and best.scorer.name == "prompt_guided"
    best_row = rows[record["best_trial"]]
    assert best.scorer.params["alpha"] == pytest.approx(float(best_row["alpha"]))
    capsys.readouterr()
    assert main(["config", "show", "--config", str(out / "best.yaml")]) == 0
    assert "mixed_precision" in capsys.readouterr().out
    if sampler == "nsga2":
        pareto = (out / "pareto.md").read_text()
        assert len([line for line in pareto.splitlines() if line.startswith("| ") and line[2].isdigit()]) == len(
            record["pareto_trials"]
        )
        assert f"| {record['best_trial']}* |" in pareto
    else:
        assert not (out / "pareto.md").exists()


def test_interrupted_study_continues(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tune"
    rc, stdout, err = tune(capsys, *base_args(tiny_model_dir, out, "random", 2))
    assert rc == 0, err
    reference_mtime = (out / "reference.pt").stat().st_mtime_ns
    rc, stdout, err = tune(capsys, *base_args(tiny_model_dir, out, "random", 2))
    assert rc == 0, err
    assert json.loads(stdout)["trials_run"] == [2, 3]
    rows = read_trials(out)
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    # The resumed sampler moves on instead of replaying the first run's points.
    assert {rows[0]["param_alpha"], rows[1]["param_alpha"]}.isdisjoint({rows[2]["param_alpha"], rows[3]["param_alpha"]})
    assert (out / "reference.pt").stat().st_mtime_ns == reference_mtime  # references reused, not recomputed
    study = optuna.load_study(study_name="kvcomp-tune", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 4
    # The same folder with other data is refused: trials would not be comparable.
    args = base_args(tiny_model_dir, out, "random", 1)
    args[args.index("--lengths") + 1] = str(LENGTH + 10)
    rc, _, err = tune(capsys, *args)
    assert rc == 2 and "tuned on" in err
    # So is another way of combining the prompts' KL: the trials' values would not compare.
    rc, _, err = tune(capsys, *base_args(tiny_model_dir, out, "random", 1), "--kl-aggregate", "median")
    assert rc == 2 and "kl_aggregate: study has 'mean', this run 'median'" in err
    assert len(read_trials(out)) == 4


def test_kl_aggregates_and_what_one_outlying_prompt_does() -> None:
    # 18 prompts near 0.02 and one at 0.40 against 19 near 0.03: the mean ranks them the other
    # way round from the trimmed mean and the median (the case docs/tuning.md describes).
    a = [0.02] * 17 + [0.01, 0.40]
    b = [0.03] * 17 + [0.025, 0.04]
    assert aggregate_kl(a) == pytest.approx(sum(a) / 19) and aggregate_kl(a) > aggregate_kl(b)
    assert aggregate_kl(a, "trimmed") == pytest.approx(0.02) and aggregate_kl(b, "trimmed") == pytest.approx(0.03)
    assert aggregate_kl(a, "median") == 0.02 and aggregate_kl(b, "median") == 0.03
    assert aggregate_kl([1.0, 2.0, 4.0, 10.0], "median") == 3.0
    # Fewer than 10 prompts: nothing to trim.
    assert aggregate_kl([0.0, 1.0, 5.0], "trimmed") == pytest.approx(2.0)
    # 20 prompts: 2 cut at each end.
    assert aggregate_kl([100.0, 100.0] + [1.0] * 16 + [-100.0, -100.0], "trimmed") == 1.0
    with pytest.raises(ValueError, match="'max'"):
        aggregate_kl(a, "max")
    with pytest.raises(ValueError, match="no KL values"):
        aggregate_kl([])
    # The command's choices (kept there to import nothing heavy) are the settings' aggregates.
    from kvcomp_eval.tune import commands
    from kvcomp_eval.tune.settings import KL_AGGREGATES

    assert commands._KL_AGGREGATES == KL_AGGREGATES


def test_a_study_made_before_kl_aggregate_resumes_with_the_mean() -> None:
    study = optuna.create_study()
    spec = {"objectives": "single", "kl_steps": 8}
    study.set_user_attr("kvcomp_spec", spec)  # what studies recorded before the option existed
    _check_study_spec(study, {**spec, "kl_aggregate": "mean"})
    with pytest.raises(TuneError, match="kl_aggregate: study has 'mean', this run 'trimmed'"):
        _check_study_spec(study, {**spec, "kl_aggregate": "trimmed"})


def test_fidelity_objective_is_zero_for_the_uncompressed_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from kvcore.pipeline import KVCompPipeline

    pipe = KVCompPipeline.from_pretrained(str(tiny_model_dir), "full")
    s = TuneSettings.create(out_dir=tmp_path, lengths=(LENGTH,), limit=1, kl_steps=4)
    prompts = build_prompts(s, pipe.tokenizer, pipe.max_prompt_tokens)
    refs = compute_references(pipe, prompts, kl_steps=4)
    assert refs[0].logprobs.shape == (len(refs[0].tokens), pipe.model.config.vocab_size)
    objective = FidelityObjective(pipe, prompts, refs)
    full = objective.measure(CompressionConfig.from_preset("full"))
    assert full.kl == 0.0 and full.agreement == 1.0 and full.task_loss == 0.0
    assert full.kv_fraction == pytest.approx(2.0)  # fp32 cache on CPU vs fp16 bytes
    cheap = CompressionConfig.from_preset("default").with_overrides(
        {"quantizer.residual_length": 16, "quantizer.frac_8bit": 0.0, "quantizer.frac_4bit": 0.2,
         "quantizer.frac_2bit": 0.2, "quantizer.frac_drop": 0.6}
    )
    lossy = objective.measure(cheap)
    # Negative control: the lossy config fails the check the full one passes, by a clear margin.
    assert lossy.kl > 1e-4 and lossy.agreement < 1.0 and lossy.kv_fraction < 0.5
    assert lossy.quality == pytest.approx(lossy.kl + lossy.task_loss)


def test_a_trial_is_scored_like_a_bench_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One config on one prompt: the tuner's KL, agreement and KV fraction are the benchmark row's."""
    from kvcomp_eval.runs.benchmark import CompressionBenchmark
    from kvcomp_eval.runs.store import ResultsStore
    from kvcomp_eval.runs.suite import BenchSuite
    from kvcomp_eval.tune.settings import TUNING_PROBE_SEED
    from kvcore.pipeline import KVCompPipeline

    pipe = KVCompPipeline.from_pretrained(str(tiny_model_dir), "full")
    s = TuneSettings.create(out_dir=tmp_path / "tune", lengths=(LENGTH,), limit=1, kl_steps=4)
    prompts = build_prompts(s, pipe.tokenizer, pipe.max_prompt_tokens)
    cheap = CompressionConfig.from_preset("default").with_overrides(
        {"quantizer.residual_length": 16, "quantizer.frac_8bit": 0.0, "quantizer.frac_4bit": 0.2,
         "quantizer.frac_2bit": 0.2, "quantizer.frac_drop": 0.6}
    )
    trial = FidelityObjective(pipe, prompts, compute_references(pipe, prompts, kl_steps=4)).measure(cheap)

    # The tuning prompt (seed TUNING_PROBE_SEED, index 0, depth 0.5) as a one-example bench suite.
    suite = BenchSuite.parse("passkey", lengths=[LENGTH], depths=[0.5], seed=TUNING_PROBE_SEED, limit=1)
    bench = CompressionBenchmark({"cheap": cheap}, suite, tmp_path / "bench", model=str(tiny_model_dir),
                                 pipeline=pipe, kl_steps=4, progress=False, warmup=False)
    [example] = bench.examples()
    assert example == prompts[0].example
    bench.run()
    [row] = [r for r in ResultsStore(tmp_path / "bench").rows() if r["config"] == "cheap"]
    assert trial.kl > 1e-4  # a lossy config: the equalities below compare real numbers, not zeros
    assert trial.kl == pytest.approx(row["kl_mean"], rel=1e-9, abs=1e-12)
    assert trial.kl_per_prompt == pytest.approx([row["kl_mean"]], rel=1e-9, abs=1e-12)
    assert trial.kv_fraction == row["kv_fraction"]
    assert trial.agreement == row["prefix_agreement"]


def test_longbench_suite_and_split(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"input": "", "context": "The grass is green. The sky is blue. " * 8 + f"Story {i}.", "answers": [f"summary {i}"]}
        for i in range(3)
    ]
    (data / "multi_news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tune"
    args = base_args(tiny_model_dir, out, "random", 2)
    args[args.index("--suite") + 1] = "longbench:multi_news"
    args[args.index("--limit") + 1] = "2"
    rc, stdout, err = tune(capsys, *args, "--data-dir", str(data))
    assert rc == 0, err
    split = json.loads((out / "split.json").read_text())
    assert split["task"] == "multi_news" and split["rows"] == [0, 2]
    assert all(r["task_score"] == "" for r in read_trials(out))  # no task score for LongBench
    with pytest.raises(TuneError, match="overlap"):
        check_report_split(out, longbench_rows=(0, 50), task="multi_news")
    check_report_split(out, longbench_rows=(100, 200), task="multi_news")
    # The tuning pool ends at row 100.
    rc, _, err = tune(capsys, *args, "--data-dir", str(data), "--offset", "99")
    assert rc == 2 and "tuning pool" in err


def test_probe_split_is_enforced(tmp_path: Path) -> None:
    (tmp_path / "split.json").write_text(json.dumps(TuneSettings.create(out_dir=tmp_path).split()))
    with pytest.raises(TuneError, match="probe seed"):
        check_report_split(tmp_path, probe_seed=1_000_000)
    check_report_split(tmp_path, probe_seed=0)
    with pytest.raises(TuneError, match="not a kvcomp tune output"):
        check_report_split(tmp_path / "missing", probe_seed=0)


def test_bad_input_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tune"
    with pytest.raises(SystemExit):
        main(["tune", "--sampler", "annealing", "--out", str(out)])
    assert "invalid choice: 'annealing'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--trials", "0", "--out", str(out)])
    assert "--trials: must be >= 1, got 0" in capsys.readouterr().err
    for storage, message in (("not-a-url", "not a database URL"), ("nosuchdb://x/y", "cannot open the Optuna storage")):
        rc, _, err = tune(capsys, *base_args(tiny_model_dir, out, "random", 1), "--storage", storage)
        assert rc == 2 and message in err
    rc, _, err = tune(capsys, *base_args(tiny_model_dir, out, "cmaes", 1), "--objectives", "multi")
    assert rc == 2 and "cmaes sampler optimises one objective" in err
    rc, _, err = tune(capsys, *base_args(tiny_model_dir, out, "random", 1), "--suite", "haystack")
    assert rc == 2 and "unknown suite 'haystack'" in err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(TuneError, match="trials"):
        TuneSettings.create(out_dir=out, trials=0)
    with pytest.raises(TuneError, match="sampler"):
        TuneSettings.create(out_dir=out, sampler="grid")
    with pytest.raises(TuneError, match="kl_aggregate"):
        TuneSettings.create(out_dir=out, kl_aggregate="max")
    with pytest.raises(SystemExit):
        main(["tune", "--kl-aggregate", "max", "--out", str(out)])
    assert "invalid choice: 'max'" in capsys.readouterr().err
    with pytest.raises(TuneError):
        open_storage("sqlite:////nonexistent-dir/sub/study.db")


@settings(max_examples=50, deadline=None)
@given(st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_tier_fractions_sum_to_one(kept: float, share8: float, share4: float) -> None:
    f = tier_fractions(kept, share8, share4)
    assert all(0.0 <= v <= 1.0 for v in f.values())
    assert math.isclose(sum(f.values()), 1.0, abs_tol=1e-9)
    assert f["frac_drop"] == pytest.approx(1.0 - kept, abs=3e-4)


@settings(max_examples=30, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "alpha": st.floats(0.0, 1.0), "beta": st.floats(0.0, 1.0), "gamma": st.floats(0.0, 1.0),
            "kept_fraction": st.floats(0.05, 1.0), "share_8bit": st.floats(0.0, 1.0), "share_4bit": st.floats(0.0, 1.0),
            "group_size_log2": st.integers(4, 6), "residual_length": st.integers(16, 128),
            "propagation": st.sampled_from(["none", "selective"]), "propagation_layer": st.integers(3, 28),
            "keep_ratio_1": st.floats(0.2, 1.0), "keep_ratio_2_share": st.floats(0.2, 1.0),
        }
    )
)
def test_search_space_points_are_valid_configs(params: dict[str, Any]) -> None:
    space = SearchSpace(num_layers=30, head_dim=64)  # SmolLM2-135M's shape: every group size divides
    overrides = space.suggest(optuna.trial.FixedTrial(params))
    base = CompressionConfig.from_preset("default")
    if sum(round(params[k], 4) for k in ("alpha", "beta", "gamma")) == 0:  # pruned with the scorer's reason
        with pytest.raises(ValueError, match="alpha \\+ beta \\+ gamma must be > 0"):
            build_trial_config(base, overrides, num_layers=30, head_dim=64)
        return
    config = build_trial_config(base, overrides, num_layers=30, head_dim=64)
    assert config.quantizer.params["group_size"] == 2 ** params["group_size_log2"]
    if params["propagation"] == "none":
        assert config.propagator.name == "none"
    else:
        schedule = config.propagator.params["keep_ratio_by_layer"]
        ratios = [schedule[k] for k in sorted(schedule)]
        assert min(schedule) == params["propagation_layer"] and max(schedule) < 30
        assert ratios == sorted(ratios, reverse=True)


def test_group_size_that_does_not_divide_head_dim_is_refused() -> None:
    overrides = {"quantizer.group_size": 32}
    with pytest.raises(ValueError, match="group_size=32 does not divide the model's head_dim=48"):
        build_trial_config(CompressionConfig.from_preset("default"), overrides, num_layers=4, head_dim=48)
    # A group of a whole head or more is one group per head (values) and is accepted.
    build_trial_config(CompressionConfig.from_preset("default"), {"quantizer.group_size": 64}, num_layers=4, head_dim=32)
    assert SearchSpace(num_layers=2, head_dim=32).propagation_layers is None


@pytest.fixture(scope="module")
def postgres_url() -> Any:
    """A throw-away PostgreSQL server on loopback for this module; skipped only where none can run."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver comes with the tune extra: pip install 'kvcomp[tune]'")
    from pg_server import PostgresUnavailable, find_bin_dir, postgres_server

    try:
        find_bin_dir()
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        with postgres_server() as server:
            yield server.url("psycopg")
    except PostgresUnavailable as exc:  # no account to run the server as
        pytest.skip(str(exc))


def start_worker(model_dir: Path, out: Path, storage: str, seed: int, trials: int) -> subprocess.Popen[str]:
    """``kvcomp tune`` in its own process, as a worker on another machine would run it."""
    args = base_args(model_dir, out, "random", trials)
    args += ["--objectives", "multi", "--storage", storage, "--study-name", "shared", "--seed", str(seed), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two workers on shared cores
    code = "import sys; from kvcore.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, "tune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_two_workers_share_a_postgresql_study(postgres_url: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    workers = [start_worker(tiny_model_dir, tmp_path / f"worker{i}", postgres_url, seed=i, trials=2) for i in range(2)]
    records = [finish(w) for w in workers]
    numbers = [n for r in records for n in r["trials_run"]]
    # Distinct numbers, none lost: the two workers' trials are exactly 0..3 between them.
    assert sorted(numbers) == [0, 1, 2, 3] and all(len(r["trials_run"]) == 2 for r in records)
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    # Each worker's folder holds the study as of its own last trial: its own trials and the
    # other's finished by then (the worker that ends last sees all four).
    seen = [[int(r["number"]) for r in read_trials(tmp_path / f"worker{i}")] for i in range(2)]
    for i in range(2):
        assert set(records[i]["trials_run"]) <= set(seen[i]) and seen[i] == sorted(seen[i])
    assert max(len(s) for s in seen) == 4
    # The Pareto front reads back from the server.
    complete = [t.number for t in study.trials if t.state.name == "COMPLETE"]
    front = sorted(t.number for t in study.best_trials)
    assert set(front) <= set(complete) and bool(front) == bool(complete)
    # A third process resumes the study where the two left it.
    third = finish(start_worker(tiny_model_dir, tmp_path / "worker2", postgres_url, seed=2, trials=1))
    assert third["trials_run"] == [4]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    assert len(study.trials) == 5
    front = sorted(t.number for t in study.best_trials)
    assert sorted(third["pareto_trials"] or []) == front
    if front:
        assert (tmp_path / "worker2" / "pareto.md").is_file()
    summary = json.loads((tmp_path / "worker2" / "summary.json").read_text())
    assert summary["n_trials"] == 5 and summary["pareto_trials"] == third["pareto_trials"]
    assert postgres_url.split("@")[0].split(":")[-1] not in json.dumps(third)  # the password is not printed
