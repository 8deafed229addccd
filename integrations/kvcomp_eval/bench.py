"""``CompressionBenchmark``: many compression configs on one suite, side by side with the full cache.

One model is loaded once; every example of the suite (synthetic probes or LongBench tasks) is
run first uncompressed (``full``, always included, always first) and then under every config on
the *same* prompt. Each finished (config, example) becomes one JSON line in
``DIR/results.jsonl``, written whole, flushed and fsynced, so an interrupted run loses nothing
already written and a rerun with the same arguments resumes where it stopped.

Fidelity to the uncompressed model is measured by teacher forcing: the reference's own greedy
tokens are fed through each config's cache (:meth:`KVCompPipeline.continuation_logprobs`) and
``KL(P_full || P_config)`` is taken at each of the first ``kl_steps`` positions. The first
position alone says little for quantisation: the prefill's own last-token logits come from
full-precision attention inside the prefill, so only later steps read the compressed cache.

Rows are keyed by ``(config name, suite, example id, config hash)``; the hash covers the
config's resolved contents (defaults filled in, description left out).

Peers (kvpress presses, transformers' ``QuantizedCache``) run in the same benchmark as extra
configs named ``peer:<label>``: one process of the peers' environment
(:class:`~kvcomp_eval.peers.PeerGenerator`) gets the same prompt text and question span, and its
teacher-forced KL is taken against the same ``full`` reference log-probs as kvcomp's configs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm.auto import tqdm

from kvcomp_eval.fidelity import greedy_exact_match, next_token_kl, output_rouge_l, prefix_agreement
from kvcomp_eval.longbench import (
    DATASET2MAXLEN,
    LONGBENCH_E_TASKS,
    LONGBENCH_TASKS,
    LongBenchDataLoader,
    LongBenchEvaluator,
    LongBenchExample,
    PreparedExample,
)
from kvcomp_eval.peers import PRESS_METHODS, PeerGenerator, PeerMethod, PeersUnavailable, peers_available
from kvcomp_eval.probes import PROBES, ProbeEvaluator, ProbeExample, build_probe
from kvcore.config import CompressionConfig, ConfigError, format_validation_error
from kvcore.loading import DEFAULT_MODEL
from kvcore.types import GenerationResult

__all__ = [
    "REFERENCE",
    "RESULTS_FILE",
    "RUN_FILE",
    "BenchSuite",
    "BenchExample",
    "CompressionBenchmark",
    "config_hash",
    "machine_info",
    "peer_hash",
    "read_results",
    "row_key",
]

REFERENCE = "full"
"""Name of the uncompressed reference config; reserved, always run first."""
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
DEFAULT_KL_STEPS = 8
"""Teacher-forced positions over which the KL to the reference is averaged."""
DEFAULT_LENGTHS = (500, 1000)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)


# -- the suite ------------------------------------------------------------------------------------
class BenchSuite(BaseModel):
    """What the benchmark runs: one synthetic probe, or LongBench tasks.

    ``limit``/``offset`` pick examples (probes: of the whole sweep, ordered so that any prefix
    covers every (length, depth) cell; LongBench: per task, after ``offset`` rows); they and
    ``n_per_cell`` are not part of the suite's identity, so a later run may add examples.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: str = Field(pattern="^(probe|longbench)$")
    tasks: tuple[str, ...] = Field(min_length=1)
    """The probe name (one) or the LongBench task names."""
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    """Probe prompt lengths, tokens."""
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    """Probe depths: fraction of the filler before the fact, in [0, 1]."""
    n_per_cell: int | None = Field(default=None, ge=1)
    """Probe examples per (length, depth); ``None``: enough for ``offset + limit``, else 1."""
    seed: int = 0
    haystack_dir: str | None = None
    data_dir: str | None = None
    """Folder of LongBench ``<task>.jsonl``; ``None`` reads the hub."""
    longbench_e: bool = False
    limit: int | None = Field(default=None, ge=1)
    offset: int = Field(default=0, ge=0)
    max_prompt_tokens: int | None = Field(default=None, ge=16)
    """LongBench: prompts longer than this are cut in the middle (default: the model's limit)."""
    min_prompt_tokens: int | None = Field(default=None, ge=1)
    """LongBench: skip rows whose prompt (template applied, after any cut) is shorter; ``limit``
    then counts the rows kept, from ``offset`` on. Like ``limit``, not part of the identity."""

    @field_validator("lengths")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(n < 1 for n in v):
            raise ValueError(f"lengths must be positive token counts, got {list(v)}")
        return v

    @field_validator("depths")
    @classmethod
    def _unit(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not (math.isfinite(d) and 0.0 <= d <= 1.0) for d in v):
            raise ValueError(f"depths must lie in [0, 1], got {list(v)}")
        return v

    @model_validator(mode="after")
    def _known(self) -> "BenchSuite":
        if self.kind == "probe":
            if len(self.tasks) != 1 or self.tasks[0] not in PROBES:
                raise ValueError(f"a probe suite runs one probe of {', '.join(PROBES)}; got {list(self.tasks)}")
        else:
            unknown = [t for t in self.tasks if t not in LONGBENCH_TASKS]
            if unknown:
                raise ValueError(f"unknown LongBench task(s) {unknown}; known: {', '.join(LONGBENCH_TASKS)}")
            if len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"LongBench tasks repeat: {list(self.tasks)}")
        if self.kind == "probe" and self.min_prompt_tokens is not None:
            raise ValueError("min_prompt_tokens selects LongBench rows; probes take their lengths from --lengths")
        if None not in (self.min_prompt_tokens, self.max_prompt_tokens) and self.min_prompt_tokens > self.max_prompt_tokens:  # type: ignore[operator]
            raise ValueError(
                f"min_prompt_tokens {self.min_prompt_tokens} exceeds max_prompt_tokens {self.max_prompt_tokens}: no row could be kept"
            )
        return self

    @classmethod
    def parse(cls, spec: str, **options: Any) -> "BenchSuite":
        """``passkey`` | ``multi_needle`` | ``multi_value`` | ``variable_tracking`` |
        ``longbench`` (the 13 LongBench-E tasks) | ``longbench:TASK[,TASK...]``, plus options."""
        spec = spec.strip()
        if spec in PROBES:
            kind, tasks = "probe", (spec,)
        elif spec == "longbench" or spec.startswith("longbench:"):
            names = spec.partition(":")[2]
            tasks = tuple(t.strip() for t in names.split(",") if t.strip()) if names else LONGBENCH_E_TASKS
            if not tasks:
                raise ValueError(f"suite {spec!r} names no LongBench task; e.g. longbench:qasper,hotpotqa")
            kind = "longbench"
        else:
            raise ValueError(
                f"unknown suite {spec!r}; suites: {', '.join(PROBES)}, longbench, longbench:TASK[,TASK...]"
            )
        data = {k: v for k, v in options.items() if v is not None}
        for key in ("lengths", "depths"):
            if key in data:
                data[key] = tuple(data[key])
        for key in ("haystack_dir", "data_dir"):
            if key in data:  # absolute, so a rerun from another folder is recognised as the same run
                data[key] = str(Path(data[key]).expanduser().absolute())
        try:
            return cls(kind=kind, tasks=tasks, **data)
        except ValidationError as exc:
            raise ValueError(f"suite {spec!r} is invalid:\n{format_validation_error(exc)}") from exc

    @property
    def label(self) -> str:
        """``passkey`` or ``longbench:qasper,hotpotqa``: the suite column of every row."""
        return self.tasks[0] if self.kind == "probe" else "longbench:" + ",".join(self.tasks)

    def identity(self) -> dict[str, Any]:
        """What defines an example's content; a run folder holds rows of one identity only."""
        if self.kind == "probe":
            keys = ("kind", "tasks", "lengths", "depths", "seed", "haystack_dir")
        else:
            keys = ("kind", "tasks", "data_dir", "longbench_e", "max_prompt_tokens")
        data = self.model_dump(mode="json")
        return {k: data[k] for k in keys}

    def check_inputs(self) -> None:
        """Refuse missing folders/files before the model is loaded."""
        if self.haystack_dir is not None and not Path(self.haystack_dir).is_dir():
            raise FileNotFoundError(f"--haystack-dir {self.haystack_dir} is not a folder")
        if self.kind == "longbench" and self.data_dir is not None:
            folder = Path(self.data_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"LongBench data folder not found: {folder}")
            suffix = "_e" if self.longbench_e else ""
            missing = [t for t in self.tasks if not (folder / f"{t}{suffix}.jsonl").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"LongBench data folder {folder} lacks " + ", ".join(f"{t}{suffix}.jsonl" for t in missing)
                )


@dataclass(frozen=True)
class BenchExample:
    """One prompt of the suite, ready for every config.

    Attributes:
        example_id: stable id within the suite (probes: ``passkey-L500-d0.5-i0``; LongBench:
            ``qasper-12``, the row number in the task's data).
        task: probe or LongBench task name.
        prompt: complete model input.
        question_span: character range ``[start, end)`` given to the scorer, or ``None``.
        max_new_tokens: tokens to generate.
        prompt_tokens: length of the prompt in tokens.
        source: the :class:`ProbeExample` or :class:`PreparedExample` it came from.
    """

    example_id: str
    task: str
    prompt: str
    question_span: tuple[int, int] | None
    max_new_tokens: int
    prompt_tokens: int
    source: ProbeExample | PreparedExample


# -- files ----------------------------------------------------------------------------------------
def config_hash(config: CompressionConfig) -> str:
    """12 hex digits of SHA-256 over the resolved config (defaults filled in, description left out)."""
    data = config.resolved().to_dict()
    data.pop("description", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def peer_hash(method: PeerMethod) -> str:
    """12 hex digits of SHA-256 over a peer's name and parameters (as given; the runner fills defaults)."""
    data = {"peer": method.to_json()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()[:12]


def row_key(row: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """``(config, suite, example_id, config_hash)``: what makes a result row unique."""
    return (str(row["config"]), str(row["suite"]), str(row["example_id"]), str(row["config_hash"]))


def read_results(path: str | os.PathLike[str], repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl``; a last line without its newline is a write that was cut off.

    Rows are only ever written whole (one ``write`` of the line and its newline), so the only
    damage an interruption can leave is an unterminated last line: it is ignored, and with
    ``repair=True`` cut from the file so appends start on a clean line. A complete line that is
    not JSON means the file was edited by hand: that is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(
            f"kvcomp bench: {path}: ignoring an unfinished last line ({len(data) - end} bytes, an interrupted write)",
            file=sys.stderr,
        )
        if repair:
            with path.open("r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
    rows = []
    for line_no, line in enumerate(data[:end].decode("utf-8").split("\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {line_no}: not a JSON result row ({exc.msg})") from exc
        if not isinstance(row, dict) or not {"config", "suite", "example_id", "config_hash"} <= row.keys():
            raise ValueError(f"{path}, line {line_no}: not a result row (needs config, suite, example_id, config_hash)")
        rows.append(row)
    return rows


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, so a row is never half written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


class _ResultsWriter:
    """Appends one JSON line per row: written whole, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
        with _sigint_deferred():
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def machine_info(device: str) -> dict[str, Any]:
    """Platform, CPU count, library versions and the device the run used."""
    import transformers

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_run_dir(out_dir: Path, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The folder's stored ``run.json`` (or ``None`` for a new folder); refuses another set-up."""
    run_file = out_dir / RUN_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a folder")
    if not run_file.is_file():
        if (out_dir / RESULTS_FILE).is_file():
            raise ValueError(f"{out_dir} has {RESULTS_FILE} but no {RUN_FILE}: not a folder this benchmark wrote")
        return None
    try:
        stored = json.loads(run_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{run_file} is not valid JSON ({exc.msg}); use another --out folder") from exc
    old = stored.get("identity", {})
    diffs = []
    for section in sorted(set(old) | set(identity)):
        a, b = old.get(section), identity.get(section)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs.append(f"{section}: {a!r} there, {b!r} now")
    if diffs:
        raise ValueError(
            f"{out_dir} holds results of a different run, so they cannot be resumed or mixed:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --out folder (or delete this one)."
        )
    return stored


# -- the pipeline as the evaluators' generator ---------------------------------------------------
class _Generator:
    """Adapts a pipeline to :class:`~kvcomp_eval.protocols.TextGenerator`, with a prompt-length cap."""

    def __init__(self, pipe: Any, max_prompt_tokens: int) -> None:
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer
        self.max_prompt_tokens = max_prompt_tokens

    def generate(
        self, prompt: str, *, question_span: tuple[int, int] | None = None, max_new_tokens: int = 32
    ) -> GenerationResult:
        return self.pipe.generate(prompt, question_span=question_span, max_new_tokens=max_new_tokens)


# -- the benchmark --------------------------------------------------------------------------------
@dataclass
class BenchOutcome:
    """What a run did: rows written now, rows found from earlier runs, and the report files."""

    written: int
    skipped: int
    summary: Path
    plots: list[Path] = field(default_factory=list)


class CompressionBenchmark:
    """Runs ``configs`` on ``suite`` against the uncompressed model; resumable.

    Parameters
    ----------
    configs:
        Ordered ``{name: CompressionConfig}``. ``full`` (the uncompressed reference) is added
        first when missing; the name ``full`` must not be given to a compressing config.
    suite:
        A :class:`BenchSuite` or a suite string (``passkey``, ``longbench:qasper``).
    out_dir:
        Folder for ``results.jsonl``, ``run.json``, ``summary.md`` and the plots.
    model:
        Model preset, folder, ``.gguf`` file or hub id, loaded once.
    max_new_tokens:
        Cap on generated tokens (default: the probe's / LongBench task's own number).
    use_question_span:
        Give the scorer the question's span (else it uses the last W prompt tokens).
    kl_steps:
        Teacher-forced positions K of the KL to the reference (the first K reference tokens).
    command:
        The command line, for the report.
    notes / variants:
        Extra lines and ablation variant descriptions for the report.
    pipeline:
        An already loaded :class:`~kvcore.pipeline.KVCompPipeline` for ``model`` (weights not
        quantised); loaded here when ``None``.
    device:
        ``cpu`` or ``cuda``.
    peers:
        Peer methods run as extra configs named ``peer:<label>`` (``peer:tova r=0.5``) in the
        peers' environment (``make peers-venv``); ``peer_threads`` caps its torch threads,
        ``peer_python`` names its interpreter (default: ``.venv-peers``, or ``$KVCOMP_PEERS_PYTHON``).
    progress, warmup:
        Show a progress bar; run each config once before timing (first calls pay one-off costs).
    """

    def __init__(
        self,
        configs: Mapping[str, CompressionConfig],
        suite: BenchSuite | str,
        out_dir: str | os.PathLike[str],
        *,
        model: str = DEFAULT_MODEL,
        max_new_tokens: int | None = None,
        use_question_span: bool = True,
        kl_steps: int = DEFAULT_KL_STEPS,
        command: str | None = None,
        experiment: str = "bench",
        notes: Sequence[str] = (),
        variants: Mapping[str, Mapping[str, Any]] | None = None,
        pipeline: Any = None,
        device: str = "cpu",
        peers: Sequence[PeerMethod] = (),
        peer_threads: int | None = None,
        peer_python: str | os.PathLike[str] | None = None,
        progress: bool = True,
        warmup: bool = True,
    ) -> None:
        if not configs and not peers:
            raise ValueError("no configs to benchmark: give at least one --preset, --config or --peer")
        for name, cfg in configs.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"config names must be non-empty strings, got {name!r}")
            if not isinstance(cfg, CompressionConfig):
                raise TypeError(f"config {name!r} must be a CompressionConfig, got {type(cfg).__name__}")
            if name == REFERENCE and not cfg.is_uncompressed:
                raise ValueError(f"the name {REFERENCE!r} is reserved for the uncompressed reference; rename that config")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
        if isinstance(kl_steps, bool) or not isinstance(kl_steps, int) or kl_steps < 1:
            raise ValueError(f"kl_steps must be a positive int, got {kl_steps!r}")
        self.suite = BenchSuite.parse(suite) if isinstance(suite, str) else suite
        self.reference_added = REFERENCE not in configs
        full = configs.get(REFERENCE, CompressionConfig.from_preset(REFERENCE))
        self.configs: dict[str, CompressionConfig] = {REFERENCE: full}
        self.configs.update({n: c for n, c in configs.items() if n != REFERENCE})
        for name, cfg in self.configs.items():
            try:
                cfg.validate_components()
            except ValueError as exc:
                raise ConfigError(f"config {name!r}: {exc}") from exc
        self.peers: dict[str, PeerMethod] = {}
        for method in peers:
            name = f"peer:{method.label}"
            if name in self.configs:
                raise ValueError(f"config name {name!r} is taken by a peer; rename the config")
            if name in self.peers:
                raise ValueError(f"peer {method.label!r} is given twice")
            self.peers[name] = method
        if peers and device != "cpu":
            raise ValueError("peers run on the CPU only (their environment holds torch's CPU build); drop --peer or use --device cpu")
        self.peer_threads = peer_threads
        self.peer_python = peer_python
        self._peer_gen: PeerGenerator | None = None
        self.hashes = {name: config_hash(cfg) for name, cfg in self.configs.items()}
        self.hashes.update({name: peer_hash(m) for name, m in self.peers.items()})
        self.out_dir = Path(out_dir)
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.use_question_span = use_question_span
        self.kl_steps = kl_steps
        self.command = command
        self.experiment = experiment
        self.notes = list(notes)
        self.variants = {k: dict(v) for k, v in (variants or {}).items()}
        self.device = device
        self.progress = progress
        self.warmup = warmup
        self._pipes: dict[str, Any] = {}
        if pipeline is not None:
            if pipeline.weights_applied != "none":
                raise ValueError("the given pipeline has quantised weights; the reference needs the original ones")
            self._pipes["none"] = pipeline
        self._evaluator: ProbeEvaluator | LongBenchEvaluator | None = None
        self._longbench_data: dict[str, list[LongBenchExample]] | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """Model, suite and generation settings: a run folder holds one identity only."""
        return {
            "model": self.model,
            "suite": self.suite.identity(),
            "generation": {
                "max_new_tokens": self.max_new_tokens,
                "use_question_span": self.use_question_span,
                "kl_steps": self.kl_steps,
            },
        }

    def check(self) -> None:
        """Every refusal that needs no model: inputs, the run folder, every LongBench row."""
        self.suite.check_inputs()
        check_run_dir(self.out_dir, self.identity())
        if self.peers:
            presses = any(m.name in PRESS_METHODS for m in self.peers.values())
            ok, reason = peers_available(self.peer_python, require_kvpress=presses)
            if not ok:
                raise PeersUnavailable(reason)
        if self.suite.kind == "longbench" and self._longbench_data is None:
            s = self.suite
            # With a length floor the rows kept are only known once their prompts are built: read them all.
            limit = s.limit if s.min_prompt_tokens is None else None
            loader = LongBenchDataLoader(s.data_dir, limit=limit, offset=s.offset, longbench_e=s.longbench_e)
            try:
                self._longbench_data = {task: loader.load(task) for task in s.tasks}
            except RuntimeError as exc:  # the hub could not be read; the message says what to do instead
                raise FileNotFoundError(str(exc)) from exc

    def pipeline(self, weights: str = "none") -> Any:
        """The pipeline whose model has ``weights`` applied (loaded on first use)."""
        if weights not in self._pipes:
            from kvcore.pipeline import KVCompPipeline

            print(f"kvcomp bench: loading {self.model} ...", file=sys.stderr, flush=True)
            pipe = KVCompPipeline.from_pretrained(self.model, REFERENCE, device=self.device)
            if weights != "none":
                pipe.set_config(CompressionConfig.from_preset(REFERENCE).with_overrides({"weights": weights}))
            self._pipes[weights] = pipe
        return self._pipes[weights]

    def _use(self, name: str) -> Any:
        cfg = self.configs[name]
        pipe = self.pipeline(cfg.weights)
        pipe.set_config(cfg)
        return pipe

    def _gen_budget(self, pipe: Any) -> int:
        # Room for the generated tokens (and the teacher-forced ones) inside the position limit.
        longest = max(DATASET2MAXLEN[t] for t in self.suite.tasks)
        if self.max_new_tokens is not None:
            longest = min(longest, self.max_new_tokens)
        limit = pipe.max_prompt_tokens - longest - self.kl_steps - 2
        cap = self.suite.max_prompt_tokens
        return min(limit, cap) if cap is not None else limit

    def evaluator(self) -> ProbeEvaluator | LongBenchEvaluator:
        """The suite's evaluator (prompts, scoring), bound to the reference pipeline."""
        if self._evaluator is None:
            pipe = self.pipeline("none")
            s = self.suite
            if s.kind == "probe":
                self._evaluator = ProbeEvaluator(
                    _Generator(pipe, pipe.max_prompt_tokens),
                    probe=s.tasks[0],
                    lengths=s.lengths,
                    depths=s.depths,
                    n_per_cell=self._n_per_cell(),
                    seed=s.seed,
                    use_question_span=self.use_question_span,
                    haystack_dir=s.haystack_dir,
                    max_new_tokens=self.max_new_tokens,
                    progress=False,
                )
            else:
                self._evaluator = LongBenchEvaluator(
                    _Generator(pipe, self._gen_budget(pipe)),
                    tasks=s.tasks,
                    data_dir=s.data_dir,
                    limit=s.limit,
                    offset=s.offset,
                    use_question_span=self.use_question_span,
                    longbench_e=s.longbench_e,
                    max_new_tokens=self.max_new_tokens,
                    progress=False,
                )
        return self._evaluator

    def _n_per_cell(self) -> int:
        s = self.suite
        if s.n_per_cell is not None:
            return s.n_per_cell
        if s.limit is None:
            return 1
        return max(1, math.ceil((s.offset + s.limit) / (len(s.lengths) * len(s.depths))))

    def examples(self) -> list[BenchExample]:
        """Every example of the suite, prompts built (all LongBench rows validated first)."""
        ev = self.evaluator()
        out: list[BenchExample] = []
        if isinstance(ev, ProbeEvaluator):
            c = ev.config
            # Index-major order: any prefix of the sweep (``--limit``) covers every cell evenly.
            probes = [
                build_probe(
                    c.probe, ev.generator.tokenizer, length, depth, index=index, seed=c.seed, filler=ev.filler,
                    use_chat_template=c.use_chat_template, n_needles=c.n_needles, n_values=c.n_values,
                    chain_length=c.chain_length, n_distractor_chains=c.n_distractor_chains,
                )
                for index in range(c.n_per_cell)
                for length in c.lengths
                for depth in c.depths
            ]
            stop = None if self.suite.limit is None else self.suite.offset + self.suite.limit
            for ex in probes[self.suite.offset : stop]:
                out.append(
                    BenchExample(
                        example_id=f"{ex.probe}-L{ex.length}-d{ex.depth:g}-i{ex.index}",
                        task=ex.probe,
                        prompt=ex.prompt,
                        question_span=ex.question_span if c.use_question_span else None,
                        max_new_tokens=ev.max_new_tokens,
                        prompt_tokens=ex.prompt_tokens,
                        source=ex,
                    )
                )
        else:
            if self._longbench_data is None:
                self.check()
            floor, kept = self.suite.min_prompt_tokens, dict.fromkeys(self.suite.tasks, 0)
            for prep in ev.iter_prepared(self._longbench_data):
                if floor is not None and (prep.prompt.prompt_tokens < floor or kept[prep.task] == self.suite.limit):
                    continue
                kept[prep.task] += 1
                out.append(
                    BenchExample(
                        example_id=f"{prep.task}-{prep.example.index}",
                        task=prep.task,
                        prompt=prep.prompt.text,
                        question_span=prep.prompt.question_span if ev.config.use_question_span else None,
                        max_new_tokens=prep.max_new_tokens,
                        prompt_tokens=prep.prompt.prompt_tokens,
                        source=prep,
                    )
                )
        if not out:
            raise ValueError(f"suite {self.suite.label} has no examples (check --limit/--offset)")
        return out

    # -- one example ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every config name in run order: ``full``, the kvcomp configs, then the peers."""
        return [*self.configs, *self.peers]

    def _peer(self, name: str) -> PeerGenerator:
        """The peers' process, switched to peer ``name`` (started on first use)."""
        if self._peer_gen is None:
            print("kvcomp bench: starting the peers' runner ...", file=sys.stderr, flush=True)
            self._peer_gen = PeerGenerator(
                self.peers[name], model=self.model, python=self.peer_python, threads=self.peer_threads, with_logprobs=False
            )
        self._peer_gen.method = self.peers[name]
        return self._peer_gen

    def _generate(self, name: str, ex: BenchExample) -> GenerationResult:
        ev = self.evaluator()
        if name in self.peers:
            return ev.run_prepared(ex.source, generator=self._peer(name))  # type: ignore[arg-type]
        self._use(name)
        return ev.run_prepared(ex.source, generator=_Generator(self.pipeline(self.configs[name].weights), 1 << 30))  # type: ignore[arg-type]

    def _generate_with_kl(
        self, name: str, ex: BenchExample, ref_ids: Sequence[int], ref_lp: torch.Tensor | None
    ) -> tuple[GenerationResult, list[float]]:
        """The config's generation and KL(full || name) in nats at each of the ``ref_lp.shape[0]``
        teacher-forced positions (none without reference tokens)."""
        if name in self.peers and ref_lp is not None:
            # One job: the runner teacher-forces on the prefilled cache, restores it, then decodes.
            teacher = list(ref_ids[: max(ref_lp.shape[0] - 1, 1)])  # it wants at least one token
            row = self._peer(name).run(
                ex.prompt, question_span=ex.question_span, max_new_tokens=ex.max_new_tokens,
                teacher_tokens=teacher, reference_logprobs=ref_lp,
            )
            if row.kl_steps is None:
                raise RuntimeError(f"the peers' runner returned no KL for {name} on {ex.example_id}")
            return row.to_generation_result(), [float(v) for v in row.kl_steps]
        result = self._generate(name, ex)
        if ref_lp is None:
            return result, []
        return result, [float(v) for v in next_token_kl(ref_lp, self._teacher_forced(name, ex, ref_ids))]

    def _teacher_forced(self, name: str, ex: BenchExample, ref_ids: Sequence[int]) -> torch.Tensor:
        """Log-probs ``[k, V]`` of the first ``k = min(K, len(ref_ids))`` reference positions."""
        pipe = self._use(name)
        k = min(self.kl_steps, len(ref_ids))
        return pipe.continuation_logprobs(ex.prompt, list(ref_ids[: k - 1]), question_span=ex.question_span)[:k]

    def _row(
        self,
        name: str,
        ex: BenchExample,
        result: GenerationResult,
        reference: Mapping[str, Any],
        kl: list[float] | None,
    ) -> dict[str, Any]:
        base = self.evaluator().score_row(ex.source, result)  # type: ignore[arg-type]
        ref_ids = list(reference["token_ids"])
        row: dict[str, Any] = {
            "config": name,
            "config_hash": self.hashes[name],
            "suite": self.suite.label,
            "task": ex.task,
            "example_id": ex.example_id,
        }
        row.update({k: v for k, v in base.items() if k not in ("probe",)})
        row["prompt_tokens"] = result.prompt_tokens
        row["kv_fraction"] = result.kv_bytes / result.kv_bytes_fp16_full
        row["token_ids"] = list(result.token_ids)
        row["kl_mean"] = float(statistics.fmean(kl)) if kl else 0.0
        row["kl_first"] = float(kl[0]) if kl else 0.0
        row["kl_per_step"] = kl if kl is not None else [0.0] * min(self.kl_steps, len(ref_ids))
        row["exact_match"] = greedy_exact_match(ref_ids, result.token_ids)
        row["prefix_agreement"] = prefix_agreement(ref_ids, result.token_ids)
        # Identical outputs agree fully even when they hold no word ROUGE could count.
        same_text = result.text == reference["prediction"]
        row["rouge_l_ref"] = 1.0 if same_text else output_rouge_l(str(reference["prediction"]), result.text)
        row["finished_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
        return row

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> BenchOutcome:
        """Run every missing (config, example), append the rows, then write the report."""
        from kvcomp_eval.report import write_report

        self.check()
        results_path = self.out_dir / RESULTS_FILE
        examples = self.examples()
        for name in self.configs:  # each config against the loaded model (layer counts, head dims)
            try:
                self._use(name)
            except ValueError as exc:
                raise ConfigError(f"config {name!r} does not fit model {self.model}: {exc}") from exc
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = read_results(results_path, repair=True)
        by_key = {row_key(r): r for r in existing}
        self._write_run_file()
        if self.reference_added:
            print(
                f"kvcomp bench: '{REFERENCE}' (the uncompressed model) is run first on every prompt as the "
                "reference for fidelity and TTFT (added: it was not among the configs)",
                file=sys.stderr,
            )

        def key(name: str, ex: BenchExample) -> tuple[str, str, str, str]:
            return (name, self.suite.label, ex.example_id, self.hashes[name])

        todo = [(ex, [n for n in self.names if key(n, ex) not in by_key]) for ex in examples]
        todo = [(ex, names) for ex, names in todo if names]
        n_todo = sum(len(names) for _, names in todo)
        skipped = len(examples) * len(self.names) - n_todo
        if skipped:
            print(f"kvcomp bench: {skipped} rows already in {results_path}; running the {n_todo} missing", file=sys.stderr)
        written = 0
        writer = _ResultsWriter(results_path)
        try:
            if todo and self.warmup:
                self._warm_up([n for n in self.names if any(n in names for _, names in todo)], todo[0][0])
            with tqdm(total=n_todo, desc=f"bench {self.suite.label}", unit="run", disable=not self.progress) as bar:
                for ex, names in todo:
                    ref_key = key(REFERENCE, ex)
                    if ref_key not in by_key:
                        bar.set_postfix_str(f"{ex.example_id} {REFERENCE}", refresh=False)
                        result = self._generate(REFERENCE, ex)
                        ref_row = self._row(REFERENCE, ex, result, {"token_ids": result.token_ids, "prediction": result.text}, None)
                        writer.write(ref_row)
                        by_key[ref_key] = ref_row
                        written += 1
                        bar.update(1)
                    reference = by_key[ref_key]
                    others = [n for n in names if n != REFERENCE]
                    if not others:
                        continue
                    ref_ids = list(reference["token_ids"])
                    ref_lp = self._teacher_forced(REFERENCE, ex, ref_ids) if ref_ids else None
                    for name in others:
                        bar.set_postfix_str(f"{ex.example_id} {name}", refresh=False)
                        result, kl = self._generate_with_kl(name, ex, ref_ids, ref_lp)
                        row = self._row(name, ex, result, reference, kl)
                        writer.write(row)
                        by_key[key(name, ex)] = row
                        written += 1
                        bar.update(1)
        finally:
            writer.close()
            if self._peer_gen is not None:
                if self._peer_gen.versions:
                    self._record_peer_versions(self._peer_gen.versions)
                self._peer_gen.close()
                self._peer_gen = None
        files = write_report(self.out_dir)
        return BenchOutcome(written=written, skipped=skipped, summary=files[0], plots=files[1:])

    def _warm_up(self, names: Sequence[str], ex: BenchExample) -> None:
        # The first forward of a model (and of each compressor set-up) pays one-off costs:
        # allocator growth, kernel selection. One short run each keeps them out of TTFT.
        for name in names:
            if name in self.peers:
                self._peer(name).generate(ex.prompt, question_span=ex.question_span, max_new_tokens=1)
                continue
            pipe = self._use(name)
            pipe.generate(ex.prompt, question_span=ex.question_span, max_new_tokens=1)

    def _record_peer_versions(self, versions: Mapping[str, str]) -> None:
        # Known only once the runner has answered; added to this run's entry in run.json.
        path = self.out_dir / RUN_FILE
        info = json.loads(path.read_text(encoding="utf-8"))
        info["runs"][-1]["peer_versions"] = dict(versions)
        _write_json_atomic(path, info)

    def _write_run_file(self) -> None:
        path = self.out_dir / RUN_FILE
        stored: dict[str, Any] = {}
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
        configs = dict(stored.get("configs", {}))
        for name, cfg in self.configs.items():
            configs[name] = {"hash": self.hashes[name], "config": cfg.to_dict()}
        for name, method in self.peers.items():
            configs[name] = {
                "hash": self.hashes[name],
                "config": {
                    "description": f"peer {method.label}: bench/peers/run_peer.py in the peers' environment",
                    **method.to_json(),
                },
            }
        # Keep the order of this run first (full, the configs as given, the peers), then older names.
        ordered = {n: configs[n] for n in self.names}
        ordered.update({n: v for n, v in configs.items() if n not in ordered})
        variants = dict(stored.get("variants", {}))
        variants.update(self.variants)
        runs = list(stored.get("runs", []))
        runs.append(
            {
                "command": self.command,
                "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                "machine": machine_info(self.device),
                "configs": self.names,
                "reference_added": self.reference_added,
                "limit": self.suite.limit,
                "offset": self.suite.offset,
                "n_per_cell": self.suite.n_per_cell,
                "min_prompt_tokens": self.suite.min_prompt_tokens,
            }
        )
        notes = list(stored.get("notes", []))
        notes += [n for n in self.notes if n not in notes]
        _write_json_atomic(
            path,
            {
                "format": 1,
                "experiment": self.experiment,
                "identity": self.identity(),
                "model": self.model,
                "suite": self.suite.model_dump(mode="json"),
                "configs": ordered,
                "variants": variants,
                "notes": notes,
                "runs": runs,
            },
        )


def parse_number_list(text: str, kind: Callable[[str], Any], what: str) -> list[Any]:
    """``"500,1000"`` -> ``[500, 1000]``; names the bad item otherwise."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    out = []
    for item in items:
        try:
            out.append(kind(item))
        except ValueError as exc:
            raise ValueError(f"{what}: {item!r} is not a {kind.__name__}") from exc
    return out
