"""The peers' runner's answer: JSON rows parsed and checked into :class:`PeerRow`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvcomp_eval.peers.methods import PEER_METHODS, PeerJobError, PeerRunnerError, _label
from kvcore.types import GenerationResult


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
        from kvcomp_eval.metrics.summary import generation_metrics

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
