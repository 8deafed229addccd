"""Optuna plumbing: samplers, storage, the model identity and the recorded data split."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from kvcore.pipeline import KVCompPipeline
from kvcomp_eval.tune.outputs import _atomic_write
from kvcomp_eval.tune.settings import LONGBENCH_TUNING_ROWS, SAMPLERS, TUNING_PROBE_SEED, TuneError


# -- Optuna plumbing --------------------------------------------------------------------------------
def make_sampler(
    name: str, *, seed: int, startup_trials: int = 5, population_size: int = 8
) -> "optuna.samplers.BaseSampler":
    """An Optuna sampler by name (see :data:`SAMPLERS`), seeded.

    ``tpe`` is the multivariate TPE with grouped (conditional) parameters; ``cmaes`` models the
    float and int parameters and samples the categorical ``propagation`` (and the parameters
    that exist only with it, when not in every trial) with a seeded random sampler.
    """
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True, group=True)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401  # Optuna imports it lazily; fail here with the fix instead
        except ImportError as exc:
            raise TuneError("--sampler cmaes needs the 'cmaes' package: pip install 'kvcomp[tune]'") from exc
        return optuna.samplers.CmaEsSampler(
            seed=seed,
            n_startup_trials=startup_trials,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            warn_independent_sampling=False,
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    raise TuneError(f"unknown sampler {name!r}; samplers: {', '.join(SAMPLERS)}")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for printing and files."""
    return re.sub(r"(://[^/@:]*:)[^@/]*@", r"\1***@", url)


def open_storage(url: str, *, attempts: int = 3) -> "optuna.storages.BaseStorage":
    """Open an Optuna storage URL (SQLite, PostgreSQL, MySQL: any SQLAlchemy URL Optuna takes).

    Database storages get a heartbeat, so a trial whose worker was killed is marked failed
    (after two minutes) instead of staying ``RUNNING`` for ever.
    """
    import optuna

    if not isinstance(url, str) or "://" not in url:
        raise TuneError(
            f"storage {url!r} is not a database URL; use e.g. sqlite:///tune/study.db or "
            "postgresql+psycopg://user:password@host:5432/dbname"
        )
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=120)
        except Exception as exc:  # SQLAlchemy raises many types (bad dialect, unreachable host, bad path)
            # Workers started together on an empty database race to create Optuna's tables; the
            # loser sees a duplicate table or row. The tables exist by then: open again.
            if attempt + 1 < attempts and _is_creation_race(exc):
                time.sleep(0.5 + random.random())
                continue
            raise TuneError(f"cannot open the Optuna storage {redact_url(url)!r}: {type(exc).__name__}: {exc}") from exc
    raise AssertionError("unreachable")


def _is_creation_race(exc: BaseException) -> bool:
    try:
        from sqlalchemy.exc import IntegrityError, ProgrammingError
    except ImportError:  # pragma: no cover - sqlalchemy comes with optuna
        return False
    return isinstance(exc, (IntegrityError, ProgrammingError)) and (
        "already exists" in str(exc) or "duplicate key" in str(exc)
    )


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(pipeline: "KVCompPipeline") -> dict[str, Any]:
    """Shape and weights fingerprint of the loaded model (paths left out, so workers on other machines agree)."""
    cfg = pipeline.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h = hashlib.sha256()
    for name, tensor in sorted(pipeline.model.state_dict().items())[:4]:
        h.update(name.encode())
        h.update(tensor.detach().float().flatten()[:256].cpu().numpy().tobytes())
    return {
        "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": cfg.vocab_size,
        "weights": h.hexdigest()[:16],
    }


def check_report_split(
    tune_dir: str | os.PathLike[str],
    *,
    longbench_rows: tuple[int, int] | None = None,
    task: str | None = None,
    probe_seed: int | None = None,
) -> None:
    """Refuse report examples that a tuning run in ``tune_dir`` used (or that the split reserves).

    Args:
        tune_dir: the ``--out`` folder of ``kvcomp tune`` (holds ``split.json``).
        longbench_rows: the report's LongBench rows ``[start, stop)`` of ``task``.
        task: the report's LongBench task.
        probe_seed: the report's probe seed.

    Raises:
        TuneError: when the report range overlaps the tuning split or the tuning pool.
    """
    path = Path(tune_dir) / "split.json"
    if not path.is_file():
        raise TuneError(f"{path} not found: not a kvcomp tune output folder")
    split = json.loads(path.read_text(encoding="utf-8"))
    if longbench_rows is not None:
        start, stop = longbench_rows
        if start < LONGBENCH_TUNING_ROWS:
            raise TuneError(
                f"report rows [{start}, {stop}) overlap the tuning pool [0, {LONGBENCH_TUNING_ROWS}); start at row {LONGBENCH_TUNING_ROWS}"
            )
        if split.get("task") == task and "rows" in split:
            a, b = split["rows"]
            if start < b and a < stop:
                raise TuneError(f"report rows [{start}, {stop}) of {task} overlap the tuned rows [{a}, {b})")
    if probe_seed is not None and (probe_seed >= TUNING_PROBE_SEED or probe_seed == split.get("probe_seed")):
        raise TuneError(f"report probe seed {probe_seed} is in the tuning range (>= {TUNING_PROBE_SEED})")


def _record_split(out_dir: Path, split: dict[str, Any]) -> None:
    """Write ``split.json``, or refuse when the folder already holds a study tuned on other data."""
    path = out_dir / "split.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != split:
            raise TuneError(
                f"{out_dir} holds a study tuned on {json.dumps(old)}; this run asks for {json.dumps(split)}. "
                "Mixing examples would make the trials incomparable: use another --out or the same data"
            )
        return
    _atomic_write(path, json.dumps(split, indent=2) + "\n")


def _check_study_spec(study: "optuna.Study", spec: dict[str, Any]) -> None:
    """Attach ``spec`` to a new study; refuse one that was made with a different objective or data."""
    old = study.user_attrs.get("kvcomp_spec")
    if old is None:
        study.set_user_attr("kvcomp_spec", spec)
        # Two workers may both have seen no spec; the database keeps the first one written
        # (Optuna ignores the second insert), so read it back and compare as usual.
        old = study.user_attrs.get("kvcomp_spec")
    # Studies made before ``kl_aggregate`` existed took the mean: they resume with it.
    old = {"kl_aggregate": "mean", **json.loads(json.dumps(old))}
    new = json.loads(json.dumps(spec))
    if old != new:
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        diffs = "; ".join(f"{k}: study has {old.get(k)!r}, this run {new.get(k)!r}" for k in keys)
        raise TuneError(
            f"study {study.study_name!r} was made with other settings ({diffs}); "
            "resume it with the same settings or pick another --study-name"
        )
