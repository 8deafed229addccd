"""Peers side by side with kvcomp: kvpress presses and transformers' ``QuantizedCache``.

kvpress pins an older transformers than kvcomp's, so the peers live in their own virtual
environment (``make peers-venv`` builds ``.venv-peers``) and run in a subprocess:
``bench/peers/run_peer.py`` takes a JSON job and answers JSON lines (see its docstring for the
protocol). This module builds the job from the same prompts kvcomp gets, runs the subprocess
and turns its rows into the rows and :class:`~kvcore.types.GenerationResult` objects kvcomp's
own evaluation produces, so :class:`~kvcomp_eval.metrics_summary.CompressionMetrics` and
:class:`~kvcomp_eval.fidelity.FidelityMetrics` treat peers and kvcomp alike.

    runner = PeerRunner(model="smollm2-135m")
    methods = [PeerMethod("snapkv", {"compression_ratio": 0.5}),
               PeerMethod("quantized_cache", {"backend": "hqq", "nbits": 4})]
    for row in runner.iter_rows([PeerPrompt("p0", prompt, question_span)], methods, max_new_tokens=8):
        row.prediction, row.kv_fraction, row.to_generation_result()
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from kvcore.types import GenerationResult

__all__ = [
    "CACHE_BACKENDS",
    "PEER_METHODS",
    "PRESS_METHODS",
    "PEERS_PYTHON_ENV",
    "PEERS_RUNNER_ENV",
    "PeerGenerator",
    "PeerJobError",
    "PeerMethod",
    "PeerPrompt",
    "PeerRow",
    "PeerRunner",
    "PeerRunnerError",
    "PeersUnavailable",
    "default_peers_python",
    "default_runner_script",
    "parse_output",
    "parse_row",
    "parse_peer_spec",
    "peers_available",
]

PEER_METHODS: tuple[str, ...] = (
    "full",
    "snapkv",
    "streaming_llm",
    "expected_attention",
    "knorm",
    "tova",
    "quantized_cache",
)
"""Methods the runner knows; ``full`` is the uncompressed model in the peers' environment."""

PEERS_PYTHON_ENV = "KVCOMP_PEERS_PYTHON"
"""Environment variable naming the peers environment's Python (default ``<repo>/.venv-peers/bin/python``)."""
PEERS_RUNNER_ENV = "KVCOMP_PEERS_RUNNER"
"""Environment variable naming the runner script (default ``<repo>/bench/peers/run_peer.py``)."""

_REPO_ROOT = Path(__file__).resolve().parents[2]


class PeersUnavailable(RuntimeError):
    """The peers' environment or runner script is missing (build it with ``make peers-venv``)."""


class PeerRunnerError(RuntimeError):
    """The runner failed or answered something that does not follow the protocol."""


class PeerJobError(ValueError):
    """The runner refused the job before any work (bad method, params, prompt or model)."""


def default_peers_python() -> Path:
    """``$KVCOMP_PEERS_PYTHON``, else the repository's ``.venv-peers/bin/python``."""
    env = os.environ.get(PEERS_PYTHON_ENV)
    return Path(env) if env else _REPO_ROOT / ".venv-peers" / "bin" / "python"


def default_runner_script() -> Path:
    """``$KVCOMP_PEERS_RUNNER``, else the repository's ``bench/peers/run_peer.py``."""
    env = os.environ.get(PEERS_RUNNER_ENV)
    return Path(env) if env else _REPO_ROOT / "bench" / "peers" / "run_peer.py"


def peers_available(python: str | os.PathLike[str] | None = None, require_kvpress: bool = True) -> tuple[bool, str]:
    """Whether the peers' environment can run, and why not: ``(ok, reason)``.

    Checks that the interpreter and runner exist and that transformers (and kvpress, unless
    ``require_kvpress`` is false: the ``full`` peer needs transformers alone) import in it.
    """
    py = Path(python) if python is not None else default_peers_python()
    script = default_runner_script()
    if not py.exists():
        return False, f"peers environment not built: {py} is missing (run `make peers-venv`)"
    if not script.is_file():
        return False, f"peers runner {script} is missing"
    probe = subprocess.run(
        [str(py), str(script), "--versions"], capture_output=True, text=True, timeout=300, check=False
    )
    if probe.returncode != 0:
        return False, f"peers runner does not start under {py}: {probe.stderr.strip()[-500:]}"
    versions = json.loads(probe.stdout)
    needed = ("transformers", "kvpress") if require_kvpress else ("transformers",)
    missing = [d for d in needed if versions.get(d) == "not installed"]
    if missing:
        return False, f"{', '.join(missing)} not installed in {py} (run `make peers-venv`)"
    return True, "ok"


# ------------------------------------------------------------------------------------------------
# Job inputs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerMethod:
    """One peer configuration.

    Attributes:
        name: one of :data:`PEER_METHODS`.
        params: the method's hyperparameters: ``compression_ratio`` (fraction of the compressed
            tokens removed, ``[0, 1)``) and press options for kvpress presses; ``backend``
            (``"quanto"``/``"hqq"``), ``nbits``, ``q_group_size``, ``residual_length``,
            ``axis_key``/``axis_value`` for ``quantized_cache``; ``compress_question`` (bool) for
            all. The runner checks them strictly and fills in defaults.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in PEER_METHODS:
            raise ValueError(f"unknown peer method {self.name!r}; accepted: {', '.join(PEER_METHODS)}")
        if not isinstance(self.params, Mapping) or not all(isinstance(k, str) for k in self.params):
            raise ValueError(f"params of {self.name!r} must be a mapping with string keys, got {self.params!r}")

    @property
    def label(self) -> str:
        """Short name for tables: ``snapkv r=0.5``, ``snapkv+question r=0.5``, ``hqq 4-bit``."""
        return _label(self.name, dict(self.params))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


def _label(name: str, params: Mapping[str, Any]) -> str:
    q = "+question" if params.get("compress_question") else ""
    if name == "quantized_cache":
        return f"{params.get('backend', '?')}{q} {params.get('nbits', 4)}-bit"
    if "compression_ratio" in params:
        return f"{name}{q} r={params['compression_ratio']:g}"
    return f"{name}{q}"


PRESS_METHODS: tuple[str, ...] = ("snapkv", "streaming_llm", "expected_attention", "knorm", "tova")
"""The kvpress presses; their spec value is the compression ratio."""
CACHE_BACKENDS: tuple[str, ...] = ("quanto", "hqq")
"""``QuantizedCache`` backends; their spec value is the bit width."""


def parse_peer_spec(spec: str) -> PeerMethod:
    """A peer from its command-line spec.

    ``PRESS[+question]:RATIO`` (``tova:0.5``, ``snapkv+question:0.25``) for the kvpress presses,
    ``quanto:BITS`` / ``hqq:BITS`` (``hqq:4``) for ``QuantizedCache``, ``full`` for the
    uncompressed model in the peers' environment.
    """
    accepted = (
        f"accepted: PRESS[+question]:RATIO with PRESS in {', '.join(PRESS_METHODS)} and RATIO in [0, 1); "
        f"quanto:BITS or hqq:BITS (quanto 2 or 4, hqq 1, 2, 3, 4 or 8); full"
    )
    text = str(spec).strip()
    head, _, value = text.partition(":")
    name, plus, flag = head.partition("+")
    if plus and flag != "question":
        raise ValueError(f"peer {spec!r}: unknown option '+{flag}' ({accepted})")
    params: dict[str, Any] = {"compress_question": True} if plus else {}
    if name == "full" and not value and not plus:
        return PeerMethod("full")
    if name in PRESS_METHODS:
        try:
            ratio = float(value)
        except ValueError:
            raise ValueError(f"peer {spec!r}: {name} needs a compression ratio, e.g. {name}:0.5 ({accepted})") from None
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"peer {spec!r}: compression ratio {ratio:g} is outside [0, 1)")
        return PeerMethod(name, {"compression_ratio": ratio, **params})
    if name in CACHE_BACKENDS:
        bits = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}[name]
        if not value.isdigit() or int(value) not in bits:
            raise ValueError(f"peer {spec!r}: {name} takes a bit width in {bits}, e.g. {name}:{bits[-1]} ({accepted})")
        return PeerMethod("quantized_cache", {"backend": name, "nbits": int(value), **params})
    raise ValueError(f"unknown peer {spec!r} ({accepted})")


@dataclass(frozen=True)
class PeerPrompt:
    """A complete prompt (template applied) with the question's character span, as kvcomp gets it."""

    id: str
    text: str
    question_span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("prompt id must be a non-empty string")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"prompt {self.id!r} is empty")
        if self.question_span is not None:
            start, end = self.question_span
            if not 0 <= start < end <= len(self.text):
                raise ValueError(
                    f"question_span {self.question_span} of prompt {self.id!r} is not a character range inside "
                    f"its {len(self.text)} characters"
                )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text}
        if self.question_span is not None:
            out["question_span"] = [int(self.question_span[0]), int(self.question_span[1])]
        return out


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------
@dataclass
class PeerRow:
    """One (method, prompt) result of the runner, in kvcomp's terms.

    Byte fields are counted as kvcomp counts them: ``kv_bytes`` is what the cache holds at the
    end of generation with float tensors at fp16 size (integer codes at real size, scales/zeros
    at fp16), ``kv_bytes_fp16_full`` an fp16 cache of the same tokens; ``kv_bytes_actual`` the
    real bytes in the peers' process (fp32 model). ``*_prefill`` are the same after the prompt.
    ``first_token_logprobs`` is ``[V]`` float32 when the job asked for it. ``kl_first`` /
    ``kl_mean`` / ``kl_steps`` (nats) are set when teacher tokens were given.
    """

    id: str
    method: str
    params: dict[str, Any]
    prediction: str
    token_ids: list[int]
    prompt_tokens: int
    compressed_tokens: int
    kv_bytes: int
    kv_bytes_actual: int
    kv_bytes_fp16_full: int
    avg_bits: float
    tokens_kept_per_layer: list[int]
    kv_bytes_prefill: int
    kv_bytes_prefill_actual: int
    kv_bytes_fp16_full_prefill: int
    ttft_s: float
    decode_tokens_per_s: float
    peak_rss_bytes: int
    first_token_logprobs: Tensor | None = None
    reference: str | None = None
    kl_first: float | None = None
    kl_mean: float | None = None
    kl_steps: list[float] | None = None
    teacher_argmax_agreement: float | None = None

    @property
    def label(self) -> str:
        return _label(self.method, self.params)

    @property
    def kv_fraction(self) -> float:
        """Stored bytes over fp16 bytes of the same tokens, at the end of generation."""
        return self.kv_bytes / max(self.kv_bytes_fp16_full, 1)

    @property
    def kv_fraction_prefill(self) -> float:
        """Stored bytes over fp16 bytes of the prompt, right after prefill."""
        return self.kv_bytes_prefill / max(self.kv_bytes_fp16_full_prefill, 1)

    def to_generation_result(self) -> GenerationResult:
        """The row as kvcomp's :class:`~kvcore.types.GenerationResult`."""
        return GenerationResult(
            text=self.prediction,
            token_ids=list(self.token_ids),
            prompt_tokens=self.prompt_tokens,
            kv_bytes=self.kv_bytes,
            kv_bytes_fp16_full=self.kv_bytes_fp16_full,
            avg_bits=self.avg_bits,
            tokens_kept_per_layer=list(self.tokens_kept_per_layer),
            ttft_s=self.ttft_s,
            decode_tokens_per_s=self.decode_tokens_per_s,
            peak_rss_bytes=self.peak_rss_bytes,
            first_token_logprobs=self.first_token_logprobs,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row with kvcomp's field names (those of ``generation_metrics``) plus the peer's extras."""
        from kvcomp_eval.metrics_summary import generation_metrics

        return {
            "id": self.id,
            "method": self.method,
            "label": self.label,
            "params": dict(self.params),
            "prediction": self.prediction,
            "token_ids": list(self.token_ids),
            "prompt_tokens": self.prompt_tokens,
            "compressed_tokens": self.compressed_tokens,
            **generation_metrics(self.to_generation_result()),
            "kv_bytes_actual": self.kv_bytes_actual,
            "kv_bytes_prefill": self.kv_bytes_prefill,
            "kv_bytes_prefill_actual": self.kv_bytes_prefill_actual,
            "kv_bytes_fp16_full_prefill": self.kv_bytes_fp16_full_prefill,
            "kv_fraction": self.kv_fraction,
            "kv_fraction_prefill": self.kv_fraction_prefill,
            "reference": self.reference,
            "kl_first": self.kl_first,
            "kl_mean": self.kl_mean,
            "kl_steps": self.kl_steps,
            "teacher_argmax_agreement": self.teacher_argmax_agreement,
        }


_ROW_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "method": str,
    "params": dict,
    "text": str,
    "token_ids": list,
    "prompt_tokens": int,
    "compressed_tokens": int,
    "kv_bytes": int,
    "kv_bytes_actual": int,
    "kv_bytes_fp16_full": int,
    "avg_bits": (int, float),
    "tokens_kept_per_layer": list,
    "kv_bytes_prefill": int,
    "kv_bytes_prefill_actual": int,
    "kv_bytes_fp16_full_prefill": int,
    "ttft_s": (int, float),
    "decode_tokens_per_s": (int, float),
    "peak_rss_bytes": int,
}


def parse_row(obj: Mapping[str, Any], load_logprobs: bool = True) -> PeerRow:
    """Turn one ``{"event": "row", ...}`` object into a :class:`PeerRow`.

    Raises :class:`PeerRunnerError` naming the first missing or ill-typed field. With
    ``load_logprobs`` the ``first_token_logprobs_path`` file (if any) is read into memory.
    """
    for key, kind in _ROW_FIELDS.items():
        if key not in obj:
            raise PeerRunnerError(f"peer row lacks {key!r}: {_brief(obj)}")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise PeerRunnerError(f"peer row field {key!r} should be {kind}, got {value!r:.80}")
    if obj["method"] not in PEER_METHODS:
        raise PeerRunnerError(f"peer row has unknown method {obj['method']!r}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in obj["token_ids"]):
        raise PeerRunnerError("peer row token_ids must be integers")
    logprobs = None
    path = obj.get("first_token_logprobs_path")
    if path is not None and load_logprobs:
        logprobs = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(logprobs, Tensor) and logprobs.dim() == 1):
            raise PeerRunnerError(f"{path} does not hold a [V] log-prob tensor")
    kl_steps = obj.get("kl_steps")
    return PeerRow(
        id=obj["id"],
        method=obj["method"],
        params=dict(obj["params"]),
        prediction=obj["text"],
        token_ids=[int(t) for t in obj["token_ids"]],
        prompt_tokens=obj["prompt_tokens"],
        compressed_tokens=obj["compressed_tokens"],
        kv_bytes=obj["kv_bytes"],
        kv_bytes_actual=obj["kv_bytes_actual"],
        kv_bytes_fp16_full=obj["kv_bytes_fp16_full"],
        avg_bits=float(obj["avg_bits"]),
        tokens_kept_per_layer=[int(n) for n in obj["tokens_kept_per_layer"]],
        kv_bytes_prefill=obj["kv_bytes_prefill"],
        kv_bytes_prefill_actual=obj["kv_bytes_prefill_actual"],
        kv_bytes_fp16_full_prefill=obj["kv_bytes_fp16_full_prefill"],
        ttft_s=float(obj["ttft_s"]),
        decode_tokens_per_s=float(obj["decode_tokens_per_s"]),
        peak_rss_bytes=obj["peak_rss_bytes"],
        first_token_logprobs=logprobs,
        reference=obj.get("reference"),
        kl_first=_opt_float(obj.get("kl_first")),
        kl_mean=_opt_float(obj.get("kl_mean")),
        kl_steps=[float(v) for v in kl_steps] if kl_steps is not None else None,
        teacher_argmax_agreement=_opt_float(obj.get("teacher_argmax_agreement")),
    )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _brief(obj: Any) -> str:
    text = json.dumps(obj, default=str) if not isinstance(obj, str) else obj
    return text if len(text) <= 200 else text[:200] + "..."


@dataclass
class _JobState:
    started: dict[str, Any] | None = None
    done: bool = False


def parse_output(
    lines: Iterable[str], state: _JobState | None = None, load_logprobs: bool = True
) -> Iterator[PeerRow]:
    """Rows of one job's output lines, yielded as they arrive; stops after its ``done`` line.

    Raises :class:`PeerJobError` for a refused job, :class:`PeerRunnerError` for a failure during
    the run, a line that is not JSON, an unknown event, or output that ends without ``done``.
    """
    state = state if state is not None else _JobState()
    for line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise PeerRunnerError(f"peer runner printed a line that is not JSON: {_brief(line)}") from None
        event = obj.get("event") if isinstance(obj, dict) else None
        if event == "row":
            yield parse_row(obj, load_logprobs=load_logprobs)
        elif event == "start":
            state.started = obj
        elif event == "done":
            state.done = True
            return
        elif event == "error":
            message = str(obj.get("message", "(no message)"))
            if obj.get("during") == "run":
                raise PeerRunnerError(f"peer runner failed: {message}")
            raise PeerJobError(f"peer runner refused the job: {message}")
        else:
            raise PeerRunnerError(f"peer runner printed an unknown event: {_brief(line)}")
    raise PeerRunnerError("peer runner output ended before its 'done' line")


# ------------------------------------------------------------------------------------------------
# Running the subprocess
# ------------------------------------------------------------------------------------------------
def _model_path(model: str) -> str:
    from kvcore.loading import resolve_model

    path = resolve_model(model)
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"peers need a local model folder; {model!r} resolved to {path!r}")
    return path


class PeerRunner:
    """Runs peer methods on prompts in the peers' environment.

    Args:
        model: what kvcomp would load (preset name such as ``"smollm2-135m"``, folder or
            ``.gguf``); it must resolve to a local Hugging Face folder, which both sides load.
        python: the peers environment's interpreter (default :func:`default_peers_python`).
        runner: the runner script (default :func:`default_runner_script`).
        threads: torch threads in the runner (``None``: torch's default).
        dtype: model dtype in the runner (``"float32"`` as kvcomp's default).
        log: where the runner's progress goes (``None``: this process's stderr).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        python: str | os.PathLike[str] | None = None,
        runner: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        dtype: str = "float32",
        log: IO[str] | None = None,
    ) -> None:
        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.model_path = _model_path(model)
        self.python = Path(python) if python is not None else default_peers_python()
        self.runner = Path(runner) if runner is not None else default_runner_script()
        self.threads = threads
        self.dtype = dtype
        self.log = log
        self.versions: dict[str, str] | None = None

    def check_available(self) -> None:
        """Raise :class:`PeersUnavailable` if the interpreter or runner script is missing."""
        if not self.python.exists():
            raise PeersUnavailable(f"peers environment not built: {self.python} is missing (run `make peers-venv`)")
        if not self.runner.is_file():
            raise PeersUnavailable(f"peers runner {self.runner} is missing")

    def build_job(
        self,
        prompts: Sequence[PeerPrompt],
        methods: Sequence[PeerMethod],
        max_new_tokens: int = 32,
        teacher_tokens: Mapping[str, Sequence[int]] | None = None,
        reference_files: Mapping[str, str] | None = None,
        logprobs_dir: str | None = None,
    ) -> dict[str, Any]:
        """The JSON job for the runner (checks what can be checked here)."""
        if not prompts:
            raise ValueError("no prompts to run")
        if not methods:
            raise ValueError("no peer methods to run")
        ids = [p.id for p in prompts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"prompt ids must be unique, got {ids}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        job: dict[str, Any] = {
            "model_path": self.model_path,
            "prompts": [p.to_json() for p in prompts],
            "methods": [m.to_json() for m in methods],
            "max_new_tokens": max_new_tokens,
            "dtype": self.dtype,
        }
        if self.threads is not None:
            job["threads"] = self.threads
        if teacher_tokens:
            job["teacher_tokens"] = {k: [int(t) for t in v] for k, v in teacher_tokens.items()}
        if reference_files:
            job["reference_logprobs"] = dict(reference_files)
        if logprobs_dir is not None:
            job["logprobs_dir"] = logprobs_dir
        return job

    def iter_rows(
        self,
        prompts: Sequence[PeerPrompt],
        methods: Sequence[PeerMethod],
        *,
        max_new_tokens: int = 32,
        teacher_tokens: Mapping[str, Sequence[int]] | None = None,
        reference_logprobs: Mapping[str, Tensor] | None = None,
        with_logprobs: bool = False,
    ) -> Iterator[PeerRow]:
        """Run every method on every prompt; yield rows (method-major) as the runner finishes them.

        Args:
            teacher_tokens: per prompt id, token ids to teacher-force for KL (usually the
                uncompressed model's greedy output).
            reference_logprobs: per prompt id, ``[R, V]`` log-probs of the reference after the
                prompt and each of ``teacher[:R - 1]`` (e.g. kvcomp's ``continuation_logprobs``);
                prompts without one are compared with the runner's own uncompressed model.
            with_logprobs: also return each row's first-token log-probs ``[V]``.
        """
        self.check_available()
        workdir = tempfile.mkdtemp(prefix="kvcomp-peers-")
        try:
            files: dict[str, str] = {}
            for pid, tensor in (reference_logprobs or {}).items():
                if not isinstance(tensor, Tensor) or tensor.dim() != 2:
                    raise ValueError(f"reference_logprobs[{pid!r}] must be a [R, V] tensor")
                files[pid] = os.path.join(workdir, f"ref-{len(files)}.pt")
                torch.save(tensor.detach().float().cpu().contiguous(), files[pid])
            job = self.build_job(
                prompts,
                methods,
                max_new_tokens,
                teacher_tokens,
                files or None,
                os.path.join(workdir, "logprobs") if with_logprobs else None,
            )
            proc = subprocess.Popen(
                [str(self.python), str(self.runner)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log if self.log is not None else None,
                text=True,
            )
            try:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(job))
                proc.stdin.close()
                state = _JobState()
                try:
                    yield from parse_output(proc.stdout, state)
                except PeerRunnerError as exc:
                    code = proc.wait()
                    raise PeerRunnerError(f"{exc} (runner exit status {code})") from None
                if state.started is not None:
                    self.versions = state.started.get("versions")
                code = proc.wait()
                if code != 0:
                    raise PeerRunnerError(f"peer runner exited with status {code} after its last row")
            finally:
                if proc.poll() is None:  # the caller stopped early: end our own child
                    proc.kill()
                    proc.wait()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def run(self, prompts: Sequence[PeerPrompt], methods: Sequence[PeerMethod], **kwargs: Any) -> list[PeerRow]:
        """All rows of :meth:`iter_rows` as a list."""
        return list(self.iter_rows(prompts, methods, **kwargs))


class PeerGenerator:
    """A peer method as a :class:`~kvcomp_eval.protocols.TextGenerator` (for the evaluators).

    Keeps one runner process (``--serve``) with the model loaded; each :meth:`generate` /
    :meth:`run` is one job of :attr:`method`, which may be reassigned between calls to run
    another peer on the same process. Close it (or use it as a context manager) to end the
    process.
    """

    def __init__(
        self,
        method: PeerMethod,
        model: str = "smollm2-135m",
        python: str | os.PathLike[str] | None = None,
        runner: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        with_logprobs: bool = True,
        log: IO[str] | None = None,
    ) -> None:
        from transformers import AutoConfig

        from kvcore.loading import load_tokenizer

        self.method = method
        self._runner = PeerRunner(model=model, python=python, runner=runner, threads=threads, log=log)
        self._runner.check_available()
        self.tokenizer = load_tokenizer(self._runner.model_path)
        self.max_prompt_tokens = int(AutoConfig.from_pretrained(self._runner.model_path).max_position_embeddings)
        self.with_logprobs = with_logprobs
        self._workdir = tempfile.mkdtemp(prefix="kvcomp-peer-gen-")
        self._count = 0
        self._proc: subprocess.Popen[str] | None = subprocess.Popen(
            [str(self._runner.python), str(self._runner.runner), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log if log is not None else None,
            text=True,
        )

    def generate(
        self, prompt: str, *, question_span: tuple[int, int] | None = None, max_new_tokens: int = 32
    ) -> GenerationResult:
        """Prefill ``prompt`` through :attr:`method` and decode greedily."""
        return self.run(prompt, question_span=question_span, max_new_tokens=max_new_tokens).to_generation_result()

    def run(
        self,
        prompt: str,
        *,
        question_span: tuple[int, int] | None = None,
        max_new_tokens: int = 32,
        teacher_tokens: Sequence[int] | None = None,
        reference_logprobs: Tensor | None = None,
    ) -> PeerRow:
        """One job of one prompt through :attr:`method` (set it to switch methods; the model stays loaded).

        Args:
            teacher_tokens: ids to teacher-force through the peer's cache for KL (the row's ``kl_steps``).
            reference_logprobs: ``[R, V]`` reference log-probs after the prompt and each of
                ``teacher_tokens[:R - 1]`` (``R <= len(teacher_tokens) + 1``); without them the
                runner compares with its own uncompressed model.
        """
        if self._proc is None:
            raise RuntimeError("this PeerGenerator is closed")
        if reference_logprobs is not None and not teacher_tokens:
            raise ValueError("reference_logprobs need the teacher_tokens they were computed on")
        self._count += 1
        pid = f"g{self._count}"
        teacher = {pid: list(teacher_tokens)} if teacher_tokens else None
        files = None
        if reference_logprobs is not None:
            if not isinstance(reference_logprobs, Tensor) or reference_logprobs.dim() != 2:
                raise ValueError("reference_logprobs must be a [R, V] tensor")
            files = {pid: os.path.join(self._workdir, f"ref-{self._count}.pt")}
            torch.save(reference_logprobs.detach().float().cpu().contiguous(), files[pid])
        job = self._runner.build_job(
            [PeerPrompt(pid, prompt, question_span)],
            [self.method],
            max_new_tokens,
            teacher,
            files,
            logprobs_dir=os.path.join(self._workdir, str(self._count)) if self.with_logprobs else None,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise PeerRunnerError(f"peer runner is gone (exit status {self._proc.poll()})") from None
        state = _JobState()
        rows = list(parse_output(self._proc.stdout, state))
        if state.started is not None and self._runner.versions is None:
            self._runner.versions = state.started.get("versions")
        if files:
            os.unlink(files[pid])
        if len(rows) != 1:
            raise PeerRunnerError(f"expected one row for one prompt, got {len(rows)}")
        return rows[0]

    @property
    def versions(self) -> dict[str, str] | None:
        """Package versions the runner reported (kvpress, transformers, ...) after the first job."""
        return self._runner.versions

    def close(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> PeerGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


if __name__ == "__main__":  # pragma: no cover
    ok, reason = peers_available()
    print(reason)
    sys.exit(0 if ok else 1)
