"""``KVCompPipeline``: text in, text out, with the cache's cost measured.

    pipe = KVCompPipeline.from_pretrained("smollm2-135m", config="default")
    result = pipe.generate(prompt, question_span=(start, end), max_new_tokens=32)
    result.text, result.kv_bytes, result.ttft_s
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from transformers import DynamicCache

from kvcore.cache import CompressedKVCache
from kvcore.accounting import kv_bytes_fp16_for_model
from kvcore.config import CompressionConfig, load_config, preset_names
from kvcore.loading import DEFAULT_MODEL, check_device, load_model, load_tokenizer, resolve_model
from kvcore.text import encode_prompt, encode_prompt_with_offsets, tokens_in_char_span, truncate_middle_ids
from kvcore.types import GenerationResult, tensor_bytes
from kvcore.weights import quantize_linear_weights

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
"""What ``from_pretrained`` reads as a config file rather than a preset name."""


class KVCompPipeline:
    """A model, its tokenizer and a compression config, ready to generate.

    Args:
        model: a :class:`~kvcore.model.CompressedLlamaForCausalLM`.
        tokenizer: its tokenizer.
        config: the compression config (``full`` = uncompressed).
    """

    def __init__(self, model: Any, tokenizer: Any, config: CompressionConfig) -> None:
        _check_config_type(config)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.weights_applied = "none"
        self.set_config(config)

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        config: CompressionConfig | str | Path = "default",
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> "KVCompPipeline":
        """Load ``model`` (preset name, folder, ``.gguf`` or hub id) with a config: a
        :class:`CompressionConfig`, a preset name or the path of a ``.yaml``/``.yml``/``.json`` file.

        Arguments, the config's components included, are checked before the weights load, so a
        bad one costs no loading time.
        """
        if isinstance(config, Path) or (isinstance(config, str) and config.endswith(CONFIG_SUFFIXES)):
            cfg = CompressionConfig.from_file(config)
        elif isinstance(config, str):
            cfg = load_config(preset=config)
        else:
            cfg = _check_config_type(config)
        cfg.check_components()
        check_device(device)
        source = resolve_model(model)
        return cls(load_model(source, dtype=dtype, device=device), load_tokenizer(source), cfg)

    @property
    def max_prompt_tokens(self) -> int:
        """The model's position limit (prompt plus generated tokens must fit in it)."""
        return int(self.model.config.max_position_embeddings)

    def set_config(self, config: CompressionConfig) -> None:
        """Switch compression without reloading the weights (weight quantisation cannot be undone)."""
        _check_config_type(config)
        if config.weights != self.weights_applied:
            if self.weights_applied != "none":
                raise ValueError("weights were already quantised in this pipeline; load the model again to change them")
            quantize_linear_weights(self.model, config.weights)
            self.weights_applied = config.weights
        self.model.set_compression(config)
        self.config = config

    # -- prompt handling -------------------------------------------------------------------------
    def encode(
        self,
        prompt: str,
        question_span: tuple[int, int] | None = None,
        max_new_tokens: int = 0,
        truncate: Literal["error", "middle"] = "error",
    ) -> tuple[Tensor, Tensor | None]:
        """Tokenise ``prompt``; returns ``input_ids [1, N]`` and the question's token indices (or ``None``).

        ``question_span`` is a character range ``[start, end)`` of ``prompt``. With
        ``truncate="middle"`` an over-long prompt keeps its first and last halves.
        """
        check_prompt(prompt, question_span)
        _check_int("max_new_tokens", max_new_tokens, minimum=0)
        if truncate not in ("error", "middle"):
            raise ValueError(f"truncate must be 'error' or 'middle', got {truncate!r}")
        if question_span is not None:
            start, end = question_span
            if not (0 <= start < end <= len(prompt)):
                raise ValueError(f"question_span {question_span} is not a character range inside the {len(prompt)}-character prompt")
        window = None
        if question_span is None:
            ids = torch.tensor(encode_prompt(self.tokenizer, prompt), dtype=torch.long)
        else:
            token_ids, offsets = encode_prompt_with_offsets(self.tokenizer, prompt)
            ids = torch.tensor(token_ids, dtype=torch.long)
            window = torch.tensor(tokens_in_char_span(offsets, question_span), dtype=torch.long)
        budget = self.max_prompt_tokens - max_new_tokens
        if budget < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {self.max_prompt_tokens} positions"
            )
        if ids.numel() > budget:
            if truncate != "middle":
                raise ValueError(
                    f"prompt has {ids.numel()} tokens; with {max_new_tokens} new tokens the model allows "
                    f"{budget}. Shorten it or use middle truncation (truncate='middle', --truncate middle)"
                )
            ids, window = truncate_middle_ids(ids, window, budget)
        if window is not None and window.numel() == 0:
            window = None
        return ids[None], window

    # -- generation ------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        *,
        question_span: tuple[int, int] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        truncate: Literal["error", "middle"] = "error",
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (stops at EOS or a stop string).

        ``stop``: strings that end decoding as soon as the decoded text contains one; the text is
        cut before the earliest of them (``token_ids`` keep every generated token). For several
        prompts at once see :meth:`generate_batch`.
        """
        check_prompt(prompt, question_span)
        return self.generate_batch(
            [prompt],
            question_spans=[question_span],
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            truncate=truncate,
            stop=stop,
        )[0]

    @torch.no_grad()
    def generate_batch(
        self,
        prompts: Sequence[str],
        *,
        question_spans: Sequence[tuple[int, int] | None] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        truncate: Literal["error", "middle"] = "error",
        stop: Sequence[str] = (),
    ) -> list[GenerationResult]:
        """:meth:`generate` for several prompts at once: one decode step per token serves every
        row; each row keeps its own question span and stops on its own.

        Each prompt is prefilled alone and the caches are stacked (compressed ones with masked
        filler slots, :meth:`CompressedKVCache.stack`; uncompressed ones left-padded), so a
        row's cache is exactly that of its single run. Greedy rows give what
        :meth:`generate` gives for each prompt alone, up to floating-point summation order.
        Sampling draws from one generator for the batch, so a seeded batch does not reproduce the
        same prompts sampled one at a time.

        Cost fields per row: ``ttft_s`` is the batch's prefill; ``decode_tokens_per_s`` the row's
        tokens over the time until it finished; ``kv_bytes`` the batch's cache divided by the rows
        (padding and filler slots are stored, so this is what a row really costs in the batch);
        ``kv_bytes_fp16_full`` an fp16 cache of the row's own tokens.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise TypeError(f"prompts must be a non-empty list of str, got {prompts!r:.60}")
        spans = list(question_spans) if question_spans is not None else [None] * len(prompts)
        if len(spans) != len(prompts):
            raise ValueError(f"got {len(spans)} question spans for {len(prompts)} prompts")
        for prompt, span in zip(prompts, spans):
            check_prompt(prompt, span)
        _check_int("max_new_tokens", max_new_tokens, minimum=1)
        stop = check_stop_strings(stop)
        if seed is not None:
            _check_int("seed", seed, minimum=0)
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        encoded = [self.encode(p, span, max_new_tokens, truncate) for p, span in zip(prompts, spans)]
        device = next(self.model.parameters()).device
        b = len(encoded)
        mask = _left_pad_mask([ids.shape[1] for ids, _ in encoded]).to(device)
        lengths = mask.sum(dim=1)  # [B] real prompt tokens
        # Without padding no mask is passed: SDPA then takes its causal kernel, as a plain model does.
        padded = not bool(mask.all())
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

        start = time.perf_counter()
        cache, logits = self._prefill_rows(encoded, device)
        token = _next_token(logits, do_sample, temperature, top_p, generator)
        ttft = time.perf_counter() - start
        first_logprobs = torch.log_softmax(logits, dim=-1).cpu()

        eos = _eos_ids(self.tokenizer, self.model)
        rows = [_Row(self.tokenizer, eos, stop, max_new_tokens, int(t)) for t in token.tolist()]
        decode_start = time.perf_counter()
        step = 0
        while not all(row.done for row in rows):
            # Finished rows are fed their last token again (their output is no longer read): one
            # forward serves the whole batch.
            feed = torch.tensor([[row.last] for row in rows], dtype=torch.long, device=device)
            if padded:
                mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            out = self.model(
                input_ids=feed,
                attention_mask=mask if padded else None,
                position_ids=(lengths + step)[:, None] if padded else None,
                cache=cache,
                use_cache=True,
            )
            token = _next_token(out.logits[:, -1].float(), do_sample, temperature, top_p, generator)
            now = time.perf_counter() - decode_start
            for row, t in zip(rows, token.tolist()):
                row.push(int(t), now)
            step += 1

        kv_bytes = _cache_bytes(cache) // b
        kept = cache.tokens_kept_per_layer() if isinstance(cache, CompressedKVCache) else [layer.keys.shape[-2] for layer in cache.layers]
        peak = peak_memory_bytes(device)
        results = []
        for i, row in enumerate(rows):
            n_prompt, n_decoded = int(lengths[i]), len(row.generated) - 1
            kv_fp16_full = kv_bytes_fp16_for_model(self.model.config, n_prompt + n_decoded)
            results.append(
                GenerationResult(
                    text=row.text(),
                    token_ids=row.generated,
                    prompt_tokens=n_prompt,
                    kv_bytes=kv_bytes,
                    kv_bytes_fp16_full=kv_fp16_full,
                    avg_bits=16.0 * kv_bytes / kv_fp16_full,
                    tokens_kept_per_layer=kept,
                    ttft_s=ttft,
                    decode_tokens_per_s=n_decoded / row.finished_s if n_decoded and row.finished_s > 0 else 0.0,
                    peak_rss_bytes=peak,
                    first_token_logprobs=first_logprobs[i].clone(),
                )
            )
        return results

    def _prefill_rows(self, encoded: list[tuple[Tensor, Tensor | None]], device: torch.device) -> tuple[Any, Tensor]:
        """Prefill each prompt alone, then stack the caches into one batch; last logits ``[B, V]``.

        Prefill is compute-bound, so a padded batch would only add work over its padding (and
        SDPA's causal kernel takes no padding mask); decode is bound by reading weights and cache,
        which one batched step does once for every row. Each row's cache is that of its single
        run: compressed caches are stacked with masked filler slots
        (:meth:`CompressedKVCache.stack`), uncompressed ones left-padded (masked in decode).
        """
        compressed = self.model.compressor is not None
        caches, logits = [], []
        for ids, question in encoded:
            cache = self.model.new_cache(question) if compressed else DynamicCache(config=self.model.config)
            # Only the last position's logits are needed; without logits_to_keep=1 the uncompressed
            # model would run its LM head over the whole prompt, inflating the baseline's TTFT.
            out = self.model(input_ids=ids.to(device), cache=cache, use_cache=True, logits_to_keep=1)
            caches.append(out.cache)
            logits.append(out.logits[:, -1].float())
        if len(caches) == 1:
            return caches[0], logits[0]
        stacked = CompressedKVCache.stack(caches) if compressed else _stack_left_padded(caches, self.model.config)
        return stacked, torch.cat(logits)

    @torch.no_grad()
    def continuation_logprobs(
        self,
        prompt: str,
        continuation_ids: list[int],
        *,
        question_span: tuple[int, int] | None = None,
        truncate: Literal["error", "middle"] = "error",
    ) -> Tensor:
        """Log-probabilities ``[T + 1, V]`` float32 of the next token after the prompt and after each
        of the ``T`` given continuation tokens, read through this pipeline's cache.

        The prompt is prefilled (and compressed); the continuation is then fed as ordinary decode
        tokens, so every row after the first shows what the *compressed* cache lets the model see.
        Teacher-forcing the uncompressed model's own output this way is how fidelity (KL) is measured.
        """
        input_ids, window = self.encode(prompt, question_span, len(continuation_ids) + 1, truncate)
        device = next(self.model.parameters()).device
        cache: Any = self.model.new_cache(window) if self.model.compressor is not None else DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids.to(device), cache=cache, use_cache=True, logits_to_keep=1)
        rows = [out.logits[:, -1].float()]
        if continuation_ids:
            cont = torch.tensor([continuation_ids], dtype=torch.long, device=device)
            n = input_ids.shape[1]
            positions = torch.arange(n, n + cont.shape[1], device=device)[None]
            out = self.model(input_ids=cont, cache=out.cache, position_ids=positions, use_cache=True)
            rows.append(out.logits[0].float())
        return torch.log_softmax(torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]), dim=-1).cpu()


class _Row:
    """One prompt's generated tokens in a batch, and when it stopped."""

    def __init__(self, tokenizer: Any, eos: set[int], stop: tuple[str, ...], max_new_tokens: int, first: int) -> None:
        self.tokenizer, self.eos, self.stop, self.max_new_tokens = tokenizer, eos, stop, max_new_tokens
        self.generated = [first]
        self.finished_s = 0.0
        self.done = self._finished()

    @property
    def last(self) -> int:
        return self.generated[-1]

    def push(self, token: int, elapsed_s: float) -> None:
        if self.done:
            return
        self.generated.append(token)
        self.finished_s = elapsed_s
        self.done = self._finished()

    def _finished(self) -> bool:
        if len(self.generated) >= self.max_new_tokens or self.generated[-1] in self.eos:
            return True
        # The whole text is decoded each step: a stop string may span tokens, and a token's
        # text can depend on its neighbours. Cheap next to a decode step.
        return bool(self.stop) and cut_at_stop(self.tokenizer.decode(self.generated, skip_special_tokens=True), self.stop) is not None

    def text(self) -> str:
        text = self.tokenizer.decode([t for t in self.generated if t not in self.eos], skip_special_tokens=True)
        cut = cut_at_stop(text, self.stop)
        return text if cut is None else text[:cut]


def _stack_left_padded(caches: list[DynamicCache], config: Any) -> DynamicCache:
    """One ``DynamicCache`` of the rows' caches, each left-padded with zeros to the longest
    (the decode steps' attention mask hides the padding)."""
    n = max(cache.get_seq_length() for cache in caches)
    out = DynamicCache(config=config)
    for i in range(len(caches[0].layers)):
        keys, values = [], []
        for cache in caches:
            k, v = cache.layers[i].keys, cache.layers[i].values
            keys.append(torch.nn.functional.pad(k, (0, 0, n - k.shape[-2], 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, n - v.shape[-2], 0)))
        out.update(torch.cat(keys), torch.cat(values), i)
    return out


def _left_pad_mask(lengths: list[int]) -> Tensor:
    """``attention_mask [B, max(lengths)]`` of left-padded rows: 0 for padding, 1 for tokens."""
    n = max(lengths)
    return (torch.arange(n)[None, :] >= torch.tensor([n - k for k in lengths])[:, None]).long()


def _cache_bytes(cache: Any) -> int:
    if isinstance(cache, CompressedKVCache):
        return cache.kv_bytes
    return sum(tensor_bytes(layer.keys, layer.values) for layer in cache.layers)


def check_prompt(prompt: Any, question_span: Any = None) -> None:
    """Refuse, before any model work, a prompt that is not one non-empty ``str`` and a
    ``question_span`` that is not two ``int`` character offsets (its range is checked on encoding)."""
    if isinstance(prompt, (list, tuple)):
        raise TypeError(
            f"prompt must be one str, got a {type(prompt).__name__} of {len(prompt)} items: several prompts go "
            "to generate_batch(prompts), or call generate once per prompt"
        )
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__} {prompt!r:.60}")
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if question_span is not None:
        if (
            not isinstance(question_span, (tuple, list))
            or len(question_span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in question_span)
        ):
            raise TypeError(f"question_span must be a (start, end) pair of int character offsets, got {question_span!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    # bool is an int subclass and 2.5 would round silently in range(): both are refused by name.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_config_type(config: Any) -> CompressionConfig:
    if not isinstance(config, CompressionConfig):
        raise TypeError(
            f"config must be a CompressionConfig, a preset name ({', '.join(preset_names())}) or a "
            f"{'/'.join(CONFIG_SUFFIXES)} file; got {type(config).__name__} {config!r:.60} (a mapping: "
            "CompressionConfig.from_dict(mapping))"
        )
    return config


def _next_token(logits: Tensor, do_sample: bool, temperature: float, top_p: float, generator: Any) -> Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(x) for x in source)
    return ids


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory so far: CUDA allocator peak on GPU, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak_kib * (1 if sys.platform == "darwin" else 1024))


def check_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings; a bare string is refused (it would stop at each character)."""
    if isinstance(stop, str) or not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a sequence of non-empty strings, got {stop!r:.80}")
    return tuple(stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index of the earliest occurrence in ``text`` of any of the ``stop`` strings, or ``None``."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None
