#!/usr/bin/env python3
"""Run the peers of kvcomp on prompts: kvpress presses and transformers' ``QuantizedCache``.

Runs inside the peers virtual environment (``make peers-venv`` builds ``.venv-peers``:
kvpress 0.5.5 pins ``transformers<5.3``, so it cannot share kvcomp's environment). It imports
nothing from kvcomp; ``integrations/kvcomp_eval/peers/`` drives it in a subprocess.

Protocol
--------
Input: one JSON job (stdin, or ``--input FILE``)::

    {"model_path": "/path/to/hf/folder",
     "prompts": [{"id": "p0", "text": "...", "question_span": [start, end],    # span optional
                  "stop": ["\\n"]}],                                          # optional stop strings
     "methods": [{"name": "snapkv", "params": {"compression_ratio": 0.5}}],
     "max_new_tokens": 8,
     "teacher_tokens": {"p0": [ids...]},            # optional: fidelity by teacher forcing
     "reference_logprobs": {"p0": "/path/ref.pt"},  # optional: [R, V] float32 reference rows
     "logprobs_dir": "/tmp/dir"}                     # optional: save first-token log-probs

Output: JSON lines on stdout, flushed one by one: ``{"event": "start", ...}``, then one
``{"event": "row", ...}`` per (method, prompt) in method-major order, then
``{"event": "done", "n_rows": N}``. A refused job prints ``{"event": "error", "message": ...}``
and exits with status 2 before any model work. Progress goes to stderr.

``--serve`` keeps the model loaded and reads one job per stdin line (each answered the same
way, ending with its ``done`` or ``error`` line) until stdin closes.

What a method compresses
------------------------
With a ``question_span`` (character offsets of the question in the prompt), the tokens before
the question are the *context*: the method's cache is filled with the context alone (the
kvpress press compresses it, the ``QuantizedCache`` quantises it), then the question and
everything after it (chat-template tail, answer prefix) is fed on top of that cache without
compression, as kvpress's own pipeline does. ``compress_question: true`` instead runs the whole
prompt through the method in one forward pass. Without a span the whole prompt is compressed.

KV bytes
--------
Counted like kvcomp counts them (``kvcore.pipeline``): the bytes the cache holds at the end of
generation (prompt + generated tokens but the last, which is never fed back), against an fp16
cache of the same tokens (``2 x layers x H_kv x tokens x head_dim x 2``). ``kv_bytes`` is the
fp16-equivalent: kept float tensors at 2 bytes per element (the model runs in fp32 here; in
fp16 a deployment would store exactly that), integer code tensors (quanto/HQQ packed codes) at
their real size, quantisation scales/zeros at 2 bytes per element. ``kv_bytes_actual`` is the
real ``nbytes`` in this process. ``*_prefill`` fields are the same after the prompt alone.

Fidelity
--------
With ``teacher_tokens[id]`` (T ids, usually the uncompressed model's greedy output), the
runner teacher-forces them through the compressed cache and returns KL(reference || peer) per
step: row ``k`` is the next-token distribution after the prompt and ``teacher[:k]``,
``k = 0..R-1``. The reference rows come from ``reference_logprobs[id]`` (a ``.pt`` float32
``[R, V]`` tensor of log-probs, ``R <= T + 1``, e.g. kvcomp's ``continuation_logprobs``) or,
when no file is given, from this runner's own uncompressed model (``R = T + 1``). Rows report
``kl_first`` (k = 0, the next-token KL at the end of prefill), ``kl_mean`` and ``kl_steps``.
Full log-prob rows never travel as JSON; ``logprobs_dir`` saves each row's first-token
log-probs ``[V]`` as a ``.pt`` file instead.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

# Loading bars of transformers/huggingface_hub would pollute stderr on every job.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402

PROTOCOL_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Method parameters: one strict model per method; the fields are the method's hyperparameters.
# ----------------------------------------------------------------------------------------------
class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    compress_question: bool = False
    """Run the whole prompt (question included) through the method in one pass."""


class FullParams(_Params):
    """The uncompressed model (a plain ``DynamicCache``)."""


class _PressParams(_Params):
    compression_ratio: float = Field(ge=0.0, lt=1.0)
    """Fraction of the compressed tokens' KV pairs that kvpress removes, in [0, 1)."""


class SnapKVParams(_PressParams):
    window_size: int = Field(default=64, ge=1)
    kernel_size: int = Field(default=5, ge=1)


class StreamingLLMParams(_PressParams):
    n_sink: int = Field(default=4, ge=0)


class ExpectedAttentionParams(_PressParams):
    n_future_positions: int = Field(default=512, ge=1)
    n_sink: int = Field(default=4, ge=0)
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = Field(default=0.0, ge=0.0)


class KnormParams(_PressParams):
    pass


class TOVAParams(_PressParams):
    pass


_BACKEND_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}
_BACKEND_AXES = {"quanto": (0, -1), "hqq": (0, 1)}


class QuantizedCacheParams(_Params):
    """transformers' ``QuantizedCache``; defaults are transformers' own."""

    backend: Literal["quanto", "hqq"]
    nbits: int = 4
    axis_key: int = 0
    axis_value: int = 0
    q_group_size: int = Field(default=64, ge=1)
    residual_length: int = Field(default=128, ge=0)

    def model_post_init(self, _: Any) -> None:
        bits = _BACKEND_BITS[self.backend]
        if self.nbits not in bits:
            raise ValueError(f"nbits={self.nbits} is not supported by backend {self.backend!r}; accepted: {bits}")
        axes = _BACKEND_AXES[self.backend]
        for name in ("axis_key", "axis_value"):
            if getattr(self, name) not in axes:
                raise ValueError(f"{name}={getattr(self, name)} is not accepted by backend {self.backend!r}; accepted: {axes}")


PARAM_MODELS: dict[str, type[_Params]] = {
    "full": FullParams,
    "snapkv": SnapKVParams,
    "streaming_llm": StreamingLLMParams,
    "expected_attention": ExpectedAttentionParams,
    "knorm": KnormParams,
    "tova": TOVAParams,
    "quantized_cache": QuantizedCacheParams,
}
PRESS_CLASSES = {
    "snapkv": "SnapKVPress",
    "streaming_llm": "StreamingLLMPress",
    "expected_attention": "ExpectedAttentionPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
}


class PromptSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: Annotated[str, Field(min_length=1)]
    text: str
    question_span: tuple[int, int] | None = None
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    """Decoding ends once the decoded text holds one of these; the text is cut before it."""

    @field_validator("text")
    @classmethod
    def _non_empty(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("the prompt text is empty")
        return text

    def model_post_init(self, _: Any) -> None:
        if self.question_span is not None:
            start, end = self.question_span
            if not 0 <= start < end <= len(self.text):
                raise ValueError(
                    f"question_span {list(self.question_span)} is not a character range inside the "
                    f"{len(self.text)}-character prompt {self.id!r}"
                )


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    def resolved(self) -> _Params:
        """The validated parameter model (defaults filled in)."""
        if self.name not in PARAM_MODELS:
            raise ValueError(f"unknown method {self.name!r}; accepted: {', '.join(PARAM_MODELS)}")
        try:
            return PARAM_MODELS[self.name].model_validate(self.params)
        except ValidationError as exc:
            raise ValueError(f"method {self.name!r}: bad params {self.params}: {_short_errors(exc)}") from None


class Job(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model_path: str
    prompts: list[PromptSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    max_new_tokens: int = Field(default=32, ge=1)
    teacher_tokens: dict[str, list[int]] | None = None
    reference_logprobs: dict[str, str] | None = None
    logprobs_dir: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    threads: int | None = Field(default=None, ge=1)


def _short_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors(include_url=False)
    )


def parse_job(text: str) -> Job:
    """Parse and check a job's JSON (everything that needs no model); ``ValueError`` names the problem."""
    try:
        job = Job.model_validate_json(text)
    except ValidationError as exc:
        raise ValueError(f"bad job: {_short_errors(exc)}") from None
    ids = [p.id for p in job.prompts]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"prompt ids must be unique; repeated: {dupes}")
    for method in job.methods:
        method.resolved()
    for field in ("teacher_tokens", "reference_logprobs"):
        unknown = sorted(set(getattr(job, field) or {}) - set(ids))
        if unknown:
            raise ValueError(f"{field} names prompts that are not in the job: {unknown}")
    for pid, tokens in (job.teacher_tokens or {}).items():
        if not tokens:
            raise ValueError(f"teacher_tokens[{pid!r}] is empty")
        if min(tokens) < 0:
            raise ValueError(f"teacher_tokens[{pid!r}] holds a negative token id")
    for pid, path in (job.reference_logprobs or {}).items():
        if pid not in (job.teacher_tokens or {}):
            raise ValueError(f"reference_logprobs[{pid!r}] needs teacher_tokens[{pid!r}] (the tokens it was computed on)")
        if not Path(path).is_file():
            raise ValueError(f"reference_logprobs[{pid!r}]: file {path} does not exist")
    config = Path(job.model_path) / "config.json"
    if not config.is_file():
        raise ValueError(f"model_path {job.model_path} is not a Hugging Face model folder (no config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != "llama":
        raise ValueError(f"model_path {job.model_path} holds a {model_type!r} model; only LLaMA-architecture models are compared")
    return job


# ----------------------------------------------------------------------------------------------
# Tokenisation: the same rule as kvcomp's kvcore.text (special tokens added only when the text lacks
# the BOS). A copy, since this file cannot import kvcomp: tests/integrations/test_peer_runner_copies.py
# holds it, the span rule and fp16_full_bytes (kvcore.accounting) equal to the originals.
# ----------------------------------------------------------------------------------------------
def encode(tokenizer: Any, prompt: PromptSpec) -> tuple[list[int], int | None]:
    """Token ids of the prompt and the index of the question's first token (``None`` without a span)."""
    bos = tokenizer.bos_token
    add_special = not (bool(bos) and prompt.text.startswith(bos))
    enc = tokenizer(prompt.text, add_special_tokens=add_special, return_offsets_mapping=prompt.question_span is not None)
    ids = list(enc["input_ids"])
    if prompt.question_span is None:
        return ids, None
    start, end = prompt.question_span
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not hits:
        raise ValueError(f"question_span of prompt {prompt.id!r} covers no token")
    return ids, hits[0]


# ----------------------------------------------------------------------------------------------
# Byte counting
# ----------------------------------------------------------------------------------------------
def _plain_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The plain tensors a cache entry really holds (quanto's wrapper subclasses are unwrapped)."""
    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor:
            for name in flatten()[0]:
                yield from _plain_tensors(getattr(obj, name))
        else:
            yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _plain_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _plain_tensors(item)


def _bytes(tensors: Iterator[torch.Tensor]) -> tuple[int, int]:
    """(real bytes, fp16-equivalent bytes): float tensors count 2 bytes/element in the latter."""
    actual = fp16 = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        actual += n
        fp16 += t.numel() * 2 if t.is_floating_point() else n
    return actual, fp16


def cache_bytes(cache: Any) -> tuple[int, int, list[int]]:
    """``(actual_bytes, fp16_equivalent_bytes, tokens_per_layer)`` of a Dynamic or Quantized cache."""
    actual = fp16 = 0
    kept: list[int] = []
    for layer in cache.layers:
        tensors: list[Any] = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        if hasattr(layer, "_quantized_keys"):
            tensors += [layer._quantized_keys, layer._quantized_values]
            kept.append(int(layer.cumulative_length))
        else:
            keys = layer.keys
            kept.append(int(keys.shape[-2]) if keys is not None and keys.dim() == 4 else 0)
        a, f = _bytes(_plain_tensors(tensors))
        actual += a
        fp16 += f
    return actual, fp16, kept


def fp16_full_bytes(config: Any, n_tokens: int) -> int:
    """Bytes of an uncompressed fp16 cache of ``n_tokens`` tokens."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * n_tokens * head_dim * 2


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "kvpress", "optimum-quanto", "hqq"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _snapshot(cache: Any) -> list[dict[str, Any]]:
    # Cache layers replace their tensors on update (torch.cat, re-quantisation) and never write
    # into them, so a shallow copy of each layer's attributes is a complete snapshot.
    return [dict(vars(layer)) for layer in cache.layers]


def _restore(cache: Any, snapshot: list[dict[str, Any]]) -> None:
    for layer, state in zip(cache.layers, snapshot):
        vars(layer).clear()
        vars(layer).update(state)


def _kl(ref: torch.Tensor, cmp: torch.Tensor) -> list[float]:
    """KL(ref || cmp) per row of ``[R, V]`` log-probs, nats."""
    ref = ref.double()
    cmp = cmp.double()
    p = ref.exp()
    terms = torch.where(p > 0, p * (ref - cmp), torch.zeros_like(ref))
    return [float(v) for v in terms.sum(-1).clamp_min(0.0)]


class PeerRunner:
    """Holds one model; runs jobs on it."""

    def __init__(self, model_path: str, dtype: str, attn_implementation: str, log: TextIO = sys.stderr) -> None:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.key = (model_path, dtype, attn_implementation)
        self.log = log
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        ).eval()
        self.device = next(self.model.parameters()).device
        # transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache``; kvpress's
        # pinned transformers (< 5.3) only knows the old name.
        forward_args = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in forward_args else "past_key_values"
        eos: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(int(x) for x in source)
        self.eos = eos
        self._self_reference: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    # -- one job -----------------------------------------------------------------------------
    def check(self, job: Job) -> list[tuple[PromptSpec, list[int], int | None]]:
        """Tokenise every prompt and check every (method, prompt) pair fits; raises ``ValueError``."""
        limit = int(self.model.config.max_position_embeddings)
        encoded = []
        for prompt in job.prompts:
            ids, q0 = encode(self.tokenizer, prompt)
            teacher = (job.teacher_tokens or {}).get(prompt.id, [])
            need = len(ids) + max(job.max_new_tokens, len(teacher) + 1)
            if need > limit:
                raise ValueError(
                    f"prompt {prompt.id!r} has {len(ids)} tokens; with the tokens to generate or teacher-force it "
                    f"needs {need} positions, the model has {limit}"
                )
            vocab = int(self.model.config.vocab_size)
            if teacher and max(teacher) >= vocab:
                raise ValueError(f"teacher_tokens[{prompt.id!r}] holds an id >= vocab size {vocab}")
            for method in job.methods:
                params = method.resolved()
                n_compressed = len(ids) if (q0 is None or params.compress_question or q0 == 0) else q0
                window = getattr(params, "window_size", None)
                if window is not None and n_compressed <= window:
                    raise ValueError(
                        f"snapkv needs more than window_size={window} tokens to compress; prompt {prompt.id!r} "
                        f"gives it {n_compressed}"
                    )
                sinks = getattr(params, "n_sink", None)
                if method.name == "streaming_llm" and sinks is not None and n_compressed <= sinks:
                    raise ValueError(f"streaming_llm needs more than n_sink={sinks} tokens; prompt {prompt.id!r} gives {n_compressed}")
                _check_installed(method.name, params)
            encoded.append((prompt, ids, q0))
        for pid, path in (job.reference_logprobs or {}).items():
            ref = torch.load(path, map_location="cpu", weights_only=True)
            rows_max = len((job.teacher_tokens or {})[pid]) + 1
            if not (isinstance(ref, torch.Tensor) and ref.dim() == 2 and 1 <= ref.shape[0] <= rows_max):
                shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
                raise ValueError(f"reference_logprobs[{pid!r}] must be a [R, V] tensor with 1 <= R <= {rows_max}; got {shape}")
            if ref.shape[1] != self.model.config.vocab_size:
                raise ValueError(f"reference_logprobs[{pid!r}] has {ref.shape[1]} columns; the model's vocabulary has {self.model.config.vocab_size}")
        return encoded

    def run(self, job: Job, emit: Any) -> int:
        encoded = self.check(job)
        if job.logprobs_dir:
            Path(job.logprobs_dir).mkdir(parents=True, exist_ok=True)
        n_rows = 0
        total = len(job.methods) * len(encoded)
        for m_idx, method in enumerate(job.methods):
            params = method.resolved()
            for prompt, ids, q0 in encoded:
                t0 = time.perf_counter()
                row = self.generate(method.name, params, prompt, ids, q0, job)
                if job.logprobs_dir:
                    path = Path(job.logprobs_dir) / f"{m_idx:03d}-{_safe(prompt.id)}.pt"
                    torch.save(row.pop("_first_logprobs"), path)
                    row["first_token_logprobs_path"] = str(path)
                else:
                    row.pop("_first_logprobs")
                row["method_index"] = m_idx
                emit(row)
                n_rows += 1
                print(
                    f"[{n_rows}/{total}] {method.name} {prompt.id}: {len(ids)} tok, "
                    f"kv {row['kv_bytes'] / row['kv_bytes_fp16_full']:.3f}, {time.perf_counter() - t0:.1f}s, "
                    f"{row['text']!r:.40}",
                    file=self.log,
                    flush=True,
                )
        return n_rows

    # -- one (method, prompt) ------------------------------------------------------------------
    def _new_cache(self, name: str, params: _Params) -> Any:
        from transformers import DynamicCache, QuantizedCache

        if isinstance(params, QuantizedCacheParams):
            return QuantizedCache(
                backend=params.backend,
                config=self.model.config,
                nbits=params.nbits,
                axis_key=params.axis_key,
                axis_value=params.axis_value,
                q_group_size=params.q_group_size,
                residual_length=params.residual_length,
            )
        return DynamicCache(config=self.model.config)

    def _press(self, name: str, params: _Params) -> Any:
        if name not in PRESS_CLASSES:
            return None
        import kvpress

        fields = params.model_dump(exclude={"compress_question"})
        return getattr(kvpress, PRESS_CLASSES[name])(**fields)

    def _positions(self, start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, device=self.device)[None]

    @torch.no_grad()
    def _prefill(self, name: str, params: _Params, ids: list[int], q0: int | None) -> tuple[Any, torch.Tensor]:
        """Fill a fresh cache with the prompt through the method; returns the cache and last logits ``[V]``."""
        cache = self._new_cache(name, params)
        press = self._press(name, params)
        input_ids = torch.tensor([ids], device=self.device)
        split = q0 is not None and q0 > 0 and not params.compress_question
        method_ctx = press(self.model) if press is not None else contextlib.nullcontext()
        if split:
            with method_ctx:
                # No LM head for the context: only its cache is needed (what kvpress's pipeline does).
                self.model.model(input_ids=input_ids[:, :q0], **{self.cache_kw: cache}, use_cache=True)
            out = self.model(
                input_ids=input_ids[:, q0:],
                **{self.cache_kw: cache},
                position_ids=self._positions(q0, len(ids) - q0),
                use_cache=True,
                logits_to_keep=1,
            )
        else:
            with method_ctx:
                out = self.model(input_ids=input_ids, **{self.cache_kw: cache}, use_cache=True, logits_to_keep=1)
        return cache, out.logits[0, -1].float()

    @torch.no_grad()
    def _teacher_rows(self, cache: Any, first_logits: torch.Tensor, n_prompt: int, teacher: list[int], rows: int) -> torch.Tensor:
        """Log-probs ``[rows, V]`` after the prompt and after each of ``teacher[:rows - 1]``."""
        out_rows = [first_logits[None]]
        if rows > 1:
            fed = torch.tensor([teacher[: rows - 1]], device=self.device)
            out = self.model(
                input_ids=fed, **{self.cache_kw: cache}, position_ids=self._positions(n_prompt, rows - 1), use_cache=True
            )
            out_rows.append(out.logits[0].float())
        return torch.log_softmax(torch.cat(out_rows), dim=-1).cpu()

    def _reference(self, prompt: PromptSpec, ids: list[int], teacher: list[int], path: str | None) -> tuple[torch.Tensor, str]:
        if path is not None:
            return torch.load(path, map_location="cpu", weights_only=True).float(), "file"
        key = (prompt.id, tuple(ids) + (-1,) + tuple(teacher))
        if key not in self._self_reference:
            cache, logits = self._prefill("full", FullParams(compress_question=True), ids, None)
            self._self_reference[key] = self._teacher_rows(cache, logits, len(ids), teacher, len(teacher) + 1)
        return self._self_reference[key], "self"

    def _stopped(self, generated: list[int], stop: list[str]) -> bool:
        # The whole text each step, as kvcomp does: a stop string may span tokens.
        return bool(stop) and _stop_index(self.tokenizer.decode(generated, skip_special_tokens=True), stop) is not None

    @torch.no_grad()
    def generate(self, name: str, params: _Params, prompt: PromptSpec, ids: list[int], q0: int | None, job: Job) -> dict[str, Any]:
        n_prompt = len(ids)
        start = time.perf_counter()
        cache, logits = self._prefill(name, params, ids, q0)
        token = int(logits.argmax())
        ttft = time.perf_counter() - start
        first_logprobs = torch.log_softmax(logits, dim=-1).cpu()
        pre_actual, pre_fp16, pre_kept = cache_bytes(cache)

        fidelity: dict[str, Any] = {}
        teacher = (job.teacher_tokens or {}).get(prompt.id)
        if teacher:
            ref, source = self._reference(prompt, ids, teacher, (job.reference_logprobs or {}).get(prompt.id))
            snapshot = _snapshot(cache)
            peer = self._teacher_rows(cache, logits, n_prompt, teacher, ref.shape[0])
            _restore(cache, snapshot)
            steps = _kl(ref, peer)
            fidelity = {
                "reference": source,
                "teacher_steps": len(steps),
                "kl_first": steps[0],
                "kl_mean": sum(steps) / len(steps),
                "kl_steps": steps,
                "teacher_argmax_agreement": float((peer.argmax(-1) == ref.argmax(-1)).double().mean()),
            }

        generated = [token]
        decode_start = time.perf_counter()
        while len(generated) < job.max_new_tokens and generated[-1] not in self.eos and not self._stopped(generated, prompt.stop):
            step = len(generated) - 1
            out = self.model(
                input_ids=torch.tensor([[generated[-1]]], device=self.device),
                **{self.cache_kw: cache},
                position_ids=self._positions(n_prompt + step, 1),
                use_cache=True,
            )
            generated.append(int(out.logits[0, -1].argmax()))
        decode_s = time.perf_counter() - decode_start
        n_decoded = len(generated) - 1
        actual, fp16, kept = cache_bytes(cache)
        full = fp16_full_bytes(self.model.config, n_prompt + n_decoded)
        full_prefill = fp16_full_bytes(self.model.config, n_prompt)
        text_ids = [t for t in generated if t not in self.eos]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        cut = _stop_index(text, prompt.stop)
        split = q0 is not None and q0 > 0 and not params.compress_question
        return {
            "event": "row",
            "id": prompt.id,
            "method": name,
            "params": params.model_dump(),
            "text": text if cut is None else text[:cut],
            "token_ids": generated,
            "prompt_tokens": n_prompt,
            "compressed_tokens": q0 if split else n_prompt,
            "ttft_s": ttft,
            "decode_tokens_per_s": n_decoded / decode_s if n_decoded and decode_s > 0 else 0.0,
            "kv_bytes": fp16,
            "kv_bytes_actual": actual,
            "kv_bytes_fp16_full": full,
            "avg_bits": 16.0 * fp16 / full,
            "tokens_kept_per_layer": kept,
            "kv_bytes_prefill": pre_fp16,
            "kv_bytes_prefill_actual": pre_actual,
            "kv_bytes_fp16_full_prefill": full_prefill,
            "kv_fraction_prefill": pre_fp16 / full_prefill,
            "tokens_kept_prefill_mean": sum(pre_kept) / len(pre_kept),
            "peak_rss_bytes": _peak_rss(),
            **fidelity,
            "_first_logprobs": first_logprobs,
        }


def _stop_index(text: str, stop: list[str]) -> int | None:
    """Index of the earliest stop string in ``text`` (kvcore.pipeline.cut_at_stop's rule), or ``None``."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _check_installed(name: str, params: _Params) -> None:
    """Refuse a method whose package is missing before any model work."""
    import importlib.util

    needs = "kvpress" if name in PRESS_CLASSES else None
    if isinstance(params, QuantizedCacheParams):
        needs = {"quanto": "optimum.quanto", "hqq": "hqq"}[params.backend]
    if needs is not None:
        try:
            found = importlib.util.find_spec(needs) is not None
        except ModuleNotFoundError:  # a missing parent package (``optimum``)
            found = False
        if not found:
            raise ValueError(f"method {name!r} needs the package {needs!r}, which is not installed in {sys.prefix}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def _peak_rss() -> int:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak_kib * (1 if sys.platform == "darwin" else 1024))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _emit(obj: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(obj, allow_nan=True) + "\n")
    out.flush()


class Session:
    """Runs jobs, reusing a loaded model while jobs name the same one."""

    def __init__(self, out: TextIO = sys.stdout, log: TextIO = sys.stderr) -> None:
        self.out = out
        self.log = log
        self.runner: PeerRunner | None = None

    def handle(self, text: str) -> bool:
        """Run one job's JSON; returns False if it was refused."""
        emit = lambda obj: _emit(obj, self.out)  # noqa: E731
        try:
            job = parse_job(text)
            if job.threads:
                torch.set_num_threads(job.threads)
            key = (job.model_path, job.dtype, job.attn_implementation)
            if self.runner is None or self.runner.key != key:
                self.runner = PeerRunner(*key, log=self.log)
            self.runner.check(job)
        except (ValueError, OSError) as exc:  # OSError: a model folder transformers cannot read
            emit({"event": "error", "message": f"{exc}"})
            return False
        emit({"event": "start", "protocol": PROTOCOL_VERSION, "versions": _versions(), "model_path": job.model_path,
              "n_prompts": len(job.prompts), "n_methods": len(job.methods), "threads": torch.get_num_threads()})
        try:
            n = self.runner.run(job, emit)
        except Exception as exc:  # a failure mid-run ends this job only; rows already sent stay valid
            emit({"event": "error", "message": f"{type(exc).__name__}: {exc}", "during": "run"})
            return False
        emit({"event": "done", "n_rows": n})
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, help="job JSON file (default: read the job from stdin)")
    parser.add_argument("--serve", action="store_true", help="read one job per stdin line until stdin closes")
    parser.add_argument("--versions", action="store_true", help="print the installed peer packages as JSON and exit")
    args = parser.parse_args(argv)
    if args.versions:
        print(json.dumps(_versions()))
        return 0
    session = Session()
    if args.serve:
        if args.input is not None:
            parser.error("--serve reads jobs from stdin; drop --input")
        ok = True
        for line in sys.stdin:
            if line.strip():
                ok = session.handle(line) and ok
        return 0 if ok else 2
    text = args.input.read_text() if args.input is not None else sys.stdin.read()
    return 0 if session.handle(text) else 2


if __name__ == "__main__":
    sys.exit(main())
