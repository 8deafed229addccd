"""Ablation variants, byte matching, ``kvcomp ablate`` and ``kvcomp run`` (tiny random LLaMA)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcomp_eval.runs.store import REFERENCE, config_hash, read_results
from kvcomp_eval.runs.experiments import ABLATION_VARIANTS, derive_ablation_variants, match_fraction
from kvcore.cli import main
from kvcore.config import CompressionConfig

BASE = """\
description: a base with all three scorer terms and propagation after layer 2
scorer: {name: prompt_guided, alpha: 0.6, beta: 0.2, gamma: 0.2}
quantizer: {name: mixed_precision, frac_8bit: 0.1, frac_4bit: 0.35, frac_2bit: 0.15, frac_drop: 0.4, residual_length: 16}
propagator: {name: selective, keep_ratio_by_layer: {2: 0.5}}
"""


def fake_kv_bytes(config: CompressionConfig) -> int:
    """A stand-in for a measured cache: 1000 B of residual plus 100 B per (bit + 1 of scale overhead)
    of payload per candidate token, as the packed tiers cost."""
    q = config.resolved().to_dict()["quantizer"]
    if q["name"] == "uniform":
        per_token = q["bits"] + 1
    elif q["name"] == "mixed_precision":
        per_token = 9 * (q["frac_8bit"] or 0) + 5 * (q["frac_4bit"] or 0) + 3 * (q["frac_2bit"] or 0)
    else:
        per_token = 16
    return int(round(1000 + 100 * per_token))


# -- byte matching ----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    base=st.integers(0, 5000),
    step=st.integers(1, 500),
    n=st.integers(1, 400),
    target_frac=st.floats(0.0, 1.0),
)
def test_match_fraction_lands_within_one_step_of_the_target(base, step, n, target_frac):
    calls: list[float] = []

    def measure(f: float) -> int:  # bytes of floor(f * n + 0.5) kept tokens, a step function like the tiers
        calls.append(f)
        return base + step * math.floor(f * n + 0.5)

    target = base + int(target_frac * step * n)
    f, got, points = match_fraction(measure, target)
    assert 0.0 <= f <= 1.0 and got == measure(f)
    assert abs(got - target) <= step
    assert len(calls) <= 7  # a handful of prefills, not a sweep
    assert all(abs(got - target) <= abs(b - target) for _, b in points)


def test_match_fraction_clamps_outside_the_reachable_range():
    assert match_fraction(lambda f: 100 + int(50 * f), 10)[:2] == (0.0, 100)
    assert match_fraction(lambda f: 100 + int(50 * f), 1000)[:2] == (1.0, 150)


# -- the variants -----------------------------------------------------------------------------------
def test_variants_are_real_configs_that_change_one_thing():
    base = CompressionConfig.from_dict(__import__("yaml").safe_load(BASE))
    variants = {v.name: v for v in derive_ablation_variants("base", base, fake_kv_bytes)}
    assert list(variants) == list(ABLATION_VARIANTS)
    for v in variants.values():
        assert isinstance(v.config, CompressionConfig) and v.same_as is None
        v.config.validate_components()
        assert v.config.n_sink == base.n_sink and v.config.window_size == base.window_size
    scorer = {n: variants[n].config.scorer for n in ("alpha-only", "beta-only", "gamma-only")}
    assert [(s.params["alpha"], s.params["beta"], s.params["gamma"]) for s in scorer.values()] == [(1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)]
    assert all(variants[n].config.quantizer == base.quantizer for n in ("alpha-only", "random-scores", "no-propagation"))
    assert variants["random-scores"].config.scorer.name == "random"
    assert variants["no-propagation"].config.propagator.name == "none"
    assert variants["no-propagation"].config.scorer == base.scorer

    evict = variants["evict-only"].config.resolved().quantizer.params
    assert evict["frac_4bit"] == evict["frac_2bit"] == 0.0 and evict["frac_8bit"] + evict["frac_drop"] == pytest.approx(1)
    assert evict["residual_length"] == 16  # the base's shared quantizer settings carry over
    target = fake_kv_bytes(base)  # 1000 + 100 * 3.1
    assert abs(fake_kv_bytes(variants["evict-only"].config) - target) <= 1
    assert evict["frac_8bit"] == pytest.approx(3.1 / 9, abs=1e-3)
    # 2 bit for everything costs 1300 B vs the base's 1310 B: within 5%, so nothing is dropped.
    uniform = variants["uniform-bytes"].config.resolved().quantizer
    assert uniform.name == "uniform" and uniform.params["bits"] == 2 and uniform.params["residual_length"] == 16
    assert "1300 B vs base 1310 B" in variants["uniform-bytes"].bytes_match


def test_uniform_bytes_drops_tokens_when_no_width_fits_whole():
    base = CompressionConfig.from_preset("quant-only")  # 20% 8 bit, 60% 4 bit, 20% 2 bit: 5.4 "bits"
    variants = {v.name: v for v in derive_ablation_variants("quant-only", base, fake_kv_bytes)}
    uniform = variants["uniform-bytes"].config.resolved().quantizer
    assert uniform.name == "uniform" and uniform.params["bits"] == 4  # 1500 B vs 1540 B: within 5%
    base = base.with_overrides({"quantizer": {"name": "mixed_precision", "frac_8bit": 0.7, "frac_drop": 0.3}})
    variants = {v.name: v for v in derive_ablation_variants("heavy", base, fake_kv_bytes)}
    q = variants["uniform-bytes"].config.resolved().quantizer.params  # 6.3 "bits": only 8 bit with drops fits
    assert q["frac_8bit"] == pytest.approx(0.7, abs=2e-3) and q["frac_drop"] == pytest.approx(0.3, abs=2e-3)


def test_a_base_with_layer_budgets_gets_flat_single_tier_variants():
    base = CompressionConfig.from_preset("tiny")  # budget_by_layer {0: 0.25, 8: 1.4, 20: 1.0}
    variants = {v.name: v for v in derive_ablation_variants("tiny", base, fake_kv_bytes)}
    for name in ("uniform-bytes", "evict-only"):
        assert variants[name].config is not None, name
        params = variants[name].config.resolved().quantizer.params
        assert params.get("budget_by_layer") is None, name
    assert base.resolved().quantizer.params["budget_by_layer"] == {0: 0.25, 8: 1.4, 20: 1.0}


def test_variants_equal_to_the_base_are_not_run_twice():
    base = CompressionConfig.from_preset("default")  # scores with alpha only and propagates nothing
    variants = {v.name: v for v in derive_ablation_variants("default", base, fake_kv_bytes)}
    assert variants["alpha-only"].same_as == "default" and variants["no-propagation"].same_as == "default"
    assert "not run twice" in variants["alpha-only"].describe()["derivation"]
    assert variants["beta-only"].same_as is None


def test_variants_that_do_not_apply_say_why():
    base = CompressionConfig.from_preset("propagate-only")  # no quantizer: nothing to match
    variants = {v.name: v for v in derive_ablation_variants("p", base, fake_kv_bytes)}
    assert variants["evict-only"].config is None and "not applicable" in variants["evict-only"].derivation
    assert variants["uniform-bytes"].config is None


# -- the commands on a tiny model -------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def suite_args(model: Path, out: Path) -> list[str]:
    return ["--suite", "passkey", "--lengths", "300", "--depths", "0.5", "--limit", "1", "--max-new-tokens", "4",
            "--model", str(model), "--out", str(out), "--no-progress"]


def test_ablate_runs_every_variant_beside_full_and_the_base(tiny_model_dir, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text(BASE, encoding="utf-8")
    out = tmp_path / "ablate"
    assert main(["ablate", "--config", str(config), *suite_args(tiny_model_dir, out)]) == 0
    rows = read_results(out / "results.jsonl")
    assert [r["config"] for r in rows] == [REFERENCE, "base", *ABLATION_VARIANTS]
    by_name = {r["config"]: r for r in rows}
    run = json.loads((out / "run.json").read_text())
    for name in ABLATION_VARIANTS:  # the rows are of the configs run.json prints
        cfg = CompressionConfig.from_dict(run["configs"][name]["config"])
        assert by_name[name]["config_hash"] == config_hash(cfg) == run["configs"][name]["hash"]
    base_bytes = by_name["base"]["kv_bytes"]
    for name in ("evict-only", "uniform-bytes"):
        assert abs(by_name[name]["kv_bytes"] / base_bytes - 1) < 0.06, name  # equal bytes, measured
        assert "B vs base" in run["variants"][name]["bytes_match"]
    assert by_name["no-propagation"]["tokens_kept_per_layer"][3] > by_name["base"]["tokens_kept_per_layer"][3]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# kvcomp ablation: passkey") and "## Ablation variants" in summary
    assert all(f"| `{name}` |" in summary for name in ABLATION_VARIANTS)
    assert all(f"### `{name}`" in summary for name in ABLATION_VARIANTS)  # every variant's config printed
    assert (out / "ablation.png").is_file() and len(list(out.glob("*.png"))) == 4

    before = (out / "results.jsonl").read_bytes()  # a rerun re-derives the same variants and skips them all
    assert main(["ablate", "--config", str(config), *suite_args(tiny_model_dir, out)]) == 0
    assert (out / "results.jsonl").read_bytes() == before


def test_run_is_one_config_against_full(tiny_model_dir, tmp_path):
    out = tmp_path / "main"
    args = ["run", "--preset", "default", "--set", "quantizer.frac_8bit=0.2", "--set", "quantizer.frac_drop=0.25"]
    assert main([*args, *suite_args(tiny_model_dir, out)]) == 0
    rows = read_results(out / "results.jsonl")
    name = "default[quantizer.frac_8bit=0.2,quantizer.frac_drop=0.25]"
    assert [r["config"] for r in rows] == [REFERENCE, name]
    expected = CompressionConfig.from_preset("default").with_overrides({"quantizer.frac_8bit": 0.2, "quantizer.frac_drop": 0.25})
    assert rows[1]["config_hash"] == config_hash(expected)
    assert (out / "summary.md").read_text().startswith("# kvcomp main experiment: passkey")


def test_ablate_refuses_an_uncompressed_base(tiny_model_dir, tmp_path, capsys):
    assert main(["ablate", "--preset", "full", *suite_args(tiny_model_dir, tmp_path / "x")]) == 2
    assert "compresses nothing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
