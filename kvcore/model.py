"""``CompressedLlamaForCausalLM``: transformers' LLaMA with compressed, propagating prefill.

The class *is* ``LlamaForCausalLM`` (same weights, same ``generate``); only two things change:

- a prompt (the first forward on an empty cache) runs through :meth:`compressed_prefill`, a loop
  over the model's own decoder layers in which every layer's K/V is compressed right after the
  layer ran and the propagator may thin the residual stream before the next layer;
- later forwards (decoding) run the stock model on the :class:`CompressedKVCache`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import rotate_half
from transformers.utils.deprecation import deprecate_kwarg

from kvcore.attention import ATTN_IMPLEMENTATION, PrefillCapture, capture_prefill, decoding_on, kvcomp_attention_forward
from kvcore.cache import CompressedKVCache
from kvcore.compressor import RealTimePrefillCompressor
from kvcore.config import CompressionConfig
from kvcore.types import PADDING_POSITION, LayerObservation

SUPPORTED_MODEL_TYPES = ("llama",)


def check_llama_config(config: Any) -> None:
    """Refuse anything that is not LLaMA-architecture, naming what it is."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        raise ValueError(
            f"kvcomp supports LLaMA-architecture models (model_type 'llama'); this checkpoint is "
            f"model_type {model_type!r} ({', '.join(archs)})"
        )


class CompressedLlamaForCausalLM(LlamaForCausalLM):
    """LLaMA causal LM whose prefill compresses the KV cache layer by layer.

    Use :meth:`set_compression` (or ``from_pretrained(..., kvcomp_config=...)``) to choose the
    components; with the ``full`` config (all components ``none``) it is the plain model.
    """

    def __init__(self, config: LlamaConfig) -> None:
        check_llama_config(config)
        super().__init__(config)
        self.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.compressor: RealTimePrefillCompressor | None = None
        self.kvcomp_config = CompressionConfig()

    @classmethod
    def from_pretrained(cls, *args: Any, kvcomp_config: CompressionConfig | None = None, **kwargs: Any):  # type: ignore[override]
        kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION)
        if kvcomp_config is not None:
            kvcomp_config.check_components()  # a bad parameter costs no loading time
        model = super().from_pretrained(*args, **kwargs)
        if kvcomp_config is not None:
            model.set_compression(kvcomp_config)
        return model

    def set_compression(self, config: CompressionConfig) -> None:
        """Build the components of ``config``; validated against this model before any prefill."""
        compressor = None if config.is_uncompressed else RealTimePrefillCompressor.from_config(config)
        if compressor is not None:
            compressor.check_model(num_layers=self.config.num_hidden_layers, head_dim=self._head_dim)
        self.compressor, self.kvcomp_config = compressor, config
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            self.set_attn_implementation(ATTN_IMPLEMENTATION)

    @property
    def _head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def new_cache(self, window_token_idx: Tensor | None = None) -> CompressedKVCache:
        """An empty compressed cache for this model; ``window_token_idx`` marks the question tokens:
        indices ``[W]`` shared by the batch, or a bool mask ``[B, N]`` with each row's own."""
        quantizer = self.compressor.quantizer if self.compressor is not None else None
        return CompressedKVCache(self.config.num_hidden_layers, quantizer, window_token_idx)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        is_prompt = cache is None or cache.get_seq_length() == 0
        compressing = self.compressor is not None and use_cache is not False and labels is None
        # A one-token prompt takes this path too: it has nothing to compress, but it must fill the cache.
        if compressing and is_prompt and input_ids is not None:
            if not isinstance(cache, CompressedKVCache):
                cache = self.new_cache()  # generate() made a DynamicCache; ours replaces it
            return self.compressed_prefill(input_ids, attention_mask, cache)
        if isinstance(cache, CompressedKVCache):
            if len(cache.layers) != self.config.num_hidden_layers:
                raise ValueError(
                    f"this CompressedKVCache has {len(cache.layers)} layers but the model has "
                    f"{self.config.num_hidden_layers}: the cache belongs to another model"
                )
            if not cache.is_filled:
                raise ValueError("this CompressedKVCache is empty: run a prompt (prefill) through the model first")
            q = input_ids.shape[1] if input_ids is not None else 0
            if position_ids is None and attention_mask is not None and attention_mask.shape[-1] == cache.get_seq_length() + q:
                # transformers would number the new tokens from the padded length; a left-padded
                # row's true positions are its count of real tokens (what generate() passes too).
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q:]
        with decoding_on(cache if isinstance(cache, CompressedKVCache) else None):
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )

    @torch.no_grad()
    def compressed_prefill(
        self, input_ids: Tensor, attention_mask: Tensor | None, cache: CompressedKVCache
    ) -> CausalLMOutputWithPast:
        """Run the prompt ``input_ids [B, N]`` layer by layer, compressing as it goes.

        ``attention_mask [B, N]`` (1 = token, 0 = left padding). Returns the logits ``[B, 1, V]`` of
        the last prompt token and the filled ``cache``.
        """
        assert self.compressor is not None
        if cache.get_seq_length() != 0:
            raise ValueError("compressed prefill needs an empty cache; this one already holds a prompt")
        if len(cache.layers) != self.config.num_hidden_layers:
            raise ValueError(
                f"cache has {len(cache.layers)} layers, model has {self.config.num_hidden_layers}: mismatched cache"
            )
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {n} tokens exceeds the model's {self.config.max_position_embeddings} positions; "
                "shorten it or ask for middle truncation"
            )
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool((attention_mask[:, -1] == 1).all()):
            raise ValueError("compressed prefill needs left padding (the last column of attention_mask must be 1)")
        valid = attention_mask.bool()
        positions = torch.where(valid, attention_mask.long().cumsum(-1) - 1, PADDING_POSITION)  # [B, N]
        is_window = self._window_mask(cache.window_token_idx, b, n, device)
        compressor = self.compressor
        started = time.perf_counter()
        stats_tokens: list[int] = []

        # Host-device syncs are paid once here, not per layer: on a GPU each one stalls the launch
        # queue. Padding never appears later (propagation only drops tokens), and the window
        # indices change only when propagation thins the stream.
        padded = not bool(valid.all())
        window_idx = is_window.any(dim=0).nonzero().flatten()
        hidden = self.model.embed_tokens(input_ids)
        # The rotary tables and the padded batch's mask depend only on the positions in the
        # stream: computed again only after propagation has thinned it, not once per layer.
        def stream_tables(hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
            rope_pos = positions.clamp(min=0)
            cos, sin = self.model.rotary_emb(hidden, position_ids=rope_pos)
            return rope_pos, cos, sin, _prefill_mask(positions) if padded else None

        rope_pos, cos, sin, mask = stream_tables(hidden, positions)
        last_layer = self.config.num_hidden_layers - 1
        propagator = compressor.propagator
        # The protected mask of the tokens in the stream, shared by its layers: a quantizer reads
        # the size of its residual from it (a host read on a GPU) once per stream, not per layer.
        stream_protected: Tensor | None = None
        for layer_idx, decoder_layer in enumerate(self.model.layers[: self.config.num_hidden_layers]):
            n_cur = hidden.shape[1]
            capture = PrefillCapture(window_idx=window_idx)

            def compress(layer_idx: int = layer_idx, capture: PrefillCapture = capture) -> Tensor | None:
                """Compress and store this layer from ``capture``; the tokens that continue, or ``None``.

                Called once, within this iteration, so the stream's tables it reads are this layer's.
                """
                nonlocal stream_protected
                assert capture.keys is not None and capture.values is not None and capture.queries is not None
                obs = LayerObservation(
                    layer_idx=layer_idx,
                    keys=capture.keys,
                    values=capture.values,
                    queries=capture.queries,
                    # Computed only if a scorer reads them (the default one does not).
                    keys_pre_rope=functools.partial(_unrotate, capture.keys, cos, sin),
                    queries_pre_rope=functools.partial(_unrotate, capture.queries, cos[:, window_idx], sin[:, window_idx]),
                    window_idx=window_idx,
                    positions=positions,
                    n_original=n,
                    n_sink=compressor.n_sink,
                    window_rows=is_window,
                    protected=stream_protected,
                )
                stream_protected = obs.protected_mask  # one mask object until the stream thins
                result = compressor.compress_layer_kv_cache(obs)
                cache.layer(layer_idx).store_prefill(result.compressed, n_prompt=n, next_position=valid.sum(-1))
                capture.clear()  # the full-precision K/V of this layer can go now
                keep = result.keep_idx
                if keep is None or keep.shape[1] >= n_cur or layer_idx == last_layer:
                    return None
                return keep.to(device)

            layer_kwargs: dict[str, Any] = dict(
                attention_mask=mask, position_ids=rope_pos, position_embeddings=(cos, sin), cache=None, use_cache=False
            )
            keep: Tensor | None = None
            with capture_prefill(capture):
                if layer_idx == last_layer:
                    # Nothing reads the last layer's output but at the last token (its K/V, what the
                    # cache stores, come from the layer's input): it runs on the window and one token.
                    hidden = _last_token_layer(decoder_layer, hidden, window_idx=window_idx, **layer_kwargs)
                    compress()
                elif propagator is not None and propagator.acts_after(layer_idx):
                    hidden, keep = _thinning_layer(decoder_layer, hidden, thin=compress, **layer_kwargs)
                else:
                    hidden = _whole_layer(decoder_layer, hidden, **layer_kwargs)
                    compress()
            stats_tokens.append(n_cur)
            if keep is not None:
                stream_protected = None
                positions = positions.gather(1, keep)
                rope_pos, cos, sin, mask = stream_tables(hidden, positions)
                if cache.window_token_idx is None:
                    # The default window is the last W columns. A row shorter than W has padding
                    # there, which propagation may drop, so the gathered masks would differ per
                    # row; the kept window tokens are still the tail of every row (order is kept).
                    is_window = self._window_mask(None, b, keep.shape[1], device)
                else:
                    is_window = is_window.gather(1, keep)
                window_idx = is_window.any(dim=0).nonzero().flatten()

        hidden = self.model.norm(hidden[:, -1:])
        logits = self.lm_head(hidden).float()
        cache.prefill_stats = {"prefill_s": time.perf_counter() - started, "tokens_per_layer_in_stream": stats_tokens}
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def _window_mask(self, window: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
        """``[B, N]`` bool marking each row's prompt-window tokens.

        ``window``: ``None`` (the last ``window_size`` columns), int indices ``[W]`` shared by the
        batch, or a bool mask ``[B, N]`` with one row per prompt (a row without any marked token
        takes the last ``window_size`` columns).
        """
        assert self.compressor is not None
        default = torch.zeros(b, n, dtype=torch.bool, device=device)
        default[:, max(0, n - self.compressor.window_size) :] = True
        if window is None:
            return default
        window = window.to(device)
        if window.dtype == torch.bool:
            if tuple(window.shape) != (b, n):
                raise ValueError(f"a per-row prompt window must be a bool mask [B={b}, N={n}], got shape {tuple(window.shape)}")
            mask = window.clone()
        else:
            if window.dim() != 1 or window.numel() == 0 or int(window.min()) < 0 or int(window.max()) >= n:
                raise ValueError(f"prompt window indices must be a non-empty [W] within [0, {n}), got {window.tolist()[:8]}...")
            mask = torch.zeros(b, n, dtype=torch.bool, device=device)
            mask[:, window] = True
        # Everything after the question too: the answer prefix or a chat template's assistant
        # header scores nothing (window attention is causal, they come last) yet is what the
        # next token reads first; unprotected, propagation would drop it. The last token
        # produces the next-token logits: it must reach the top in any case.
        column = torch.arange(n, device=device)
        last = torch.where(mask, column, -1).amax(dim=1, keepdim=True)  # [B, 1]; -1: no window
        mask |= column > last
        return torch.where(last >= 0, mask, default)


def _whole_layer(layer: torch.nn.Module, hidden: Tensor, **kwargs: Any) -> Tensor:
    """``layer`` on every token of ``hidden [B, N, D]`` -> ``[B, N, D]``."""
    return layer(hidden, **kwargs)


def _is_llama_block(layer: torch.nn.Module) -> bool:
    """True for transformers' pre-norm LLaMA block, which the partial layers below re-trace."""
    attn = getattr(layer, "self_attn", None)
    return all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp")) and all(
        hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")
    )


def _thinning_layer(
    layer: torch.nn.Module, hidden: Tensor, *, thin: Callable[[], Tensor | None], **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """A layer after which propagation thins the stream: ``[B, N, D]`` -> ``([B, n_keep, D], keep)``.

    ``thin`` compresses the layer from the prefill capture and returns the indices ``[B, n_keep]``
    of the tokens that continue (``None``: all of them). A dropped token's output of this layer is
    never read, so the output projection and the MLP, ~84% of a layer's matrix work on the
    embedded model, run on the kept tokens only; attention still runs on all ``N`` (the causal
    kernel over every row costs less than a masked one over the kept rows). A layer built
    otherwise than the LLaMA block runs whole and is gathered after.
    """
    if not _is_llama_block(layer):
        return _whole_layer_then_thin(layer, hidden, thin=thin, **kwargs)
    attn = layer.self_attn
    b, n, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    cos, sin = kwargs["position_embeddings"]
    q = _rotate(_heads(attn.q_proj(x), attn.head_dim), cos, sin)
    k, v = _keys_values(attn, x, cos, sin)
    out, _ = kvcomp_attention_forward(attn, q, k, v, kwargs["attention_mask"], scaling=getattr(attn, "scaling", None))
    out = out.reshape(b, n, -1)
    del q, k, v, x
    keep = thin()
    if keep is not None:
        hidden, out = _gather_tokens(hidden, keep), _gather_tokens(out, keep)
    return _block_output(layer, hidden, out), keep


def _whole_layer_then_thin(
    layer: torch.nn.Module, hidden: Tensor, *, thin: Callable[[], Tensor | None], **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """:func:`_thinning_layer`'s contract the plain way: the whole layer on all ``N`` tokens, then
    the kept rows of its output (for layers that are not LLaMA blocks, and as the reference)."""
    out, keep = _whole_layer(layer, hidden, **kwargs), thin()
    return (out if keep is None else _gather_tokens(out, keep)), keep


def _gather_tokens(x: Tensor, keep: Tensor) -> Tensor:
    """Rows ``keep [B, k]`` of ``x [B, N, D]`` -> ``[B, k, D]``."""
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))


def _last_token_layer(
    layer: torch.nn.Module, hidden: Tensor, *, window_idx: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> Tensor:
    """The last decoder layer, computed only as far as anything reads it: ``[B, N, D]`` -> ``[B, 1, D]``.

    The cache needs the layer's K/V for all ``N`` tokens and the scorer the window's queries, but
    the next-token logits read only the last token's output: queries, attention, output
    projection and MLP run on the window and the last token, not on all ``N``. Follows the
    pre-norm LLaMA block of transformers (``input_layernorm``, ``self_attn`` with
    ``q/k/v/o_proj``, ``post_attention_layernorm``, ``mlp``); a layer built otherwise runs whole.
    """
    if not _is_llama_block(layer):
        return layer(hidden, attention_mask=attention_mask, **kwargs)[:, -1:]
    attn = layer.self_attn
    b, n, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    # Ascending (the window indices are, and n - 1 is the largest); n - 1 may appear twice, harmlessly.
    window_idx = window_idx.to(hidden.device)
    rows = torch.cat([window_idx, torch.full((1,), n - 1, dtype=window_idx.dtype, device=hidden.device)])
    cos, sin = kwargs["position_embeddings"]
    q = _rotate(_heads(attn.q_proj(x[:, rows]), attn.head_dim), cos[:, rows], sin[:, rows])
    k, v = _keys_values(attn, x, cos, sin)
    # The selected rows keep their causal view of the stream (and a padded batch its mask).
    if attention_mask is None:
        mask = (torch.arange(n, device=hidden.device)[None, :] <= rows[:, None])[None, None]
    else:
        mask = attention_mask[:, :, rows]
    # Through the registered attention function, so the prefill capture sees this layer too; the
    # window's queries are the first W selected rows.
    window_rows = torch.arange(window_idx.numel(), device=hidden.device)
    out, _ = kvcomp_attention_forward(attn, q, k, v, mask, scaling=getattr(attn, "scaling", None), window_rows=window_rows)
    return _block_output(layer, hidden[:, -1:], out[:, -1:].reshape(b, 1, -1))


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """A projection ``[B, n, h * d]`` as heads ``[B, h, n, d]``."""
    b, n, _ = x.shape
    return x.view(b, n, -1, head_dim).transpose(1, 2)


def _keys_values(attn: torch.nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The rotated keys and the values ``[B, H_kv, n, d]`` of the normed stream ``x [B, n, D]``."""
    return _rotate(_heads(attn.k_proj(x), attn.head_dim), cos, sin), _heads(attn.v_proj(x), attn.head_dim)


def _block_output(layer: torch.nn.Module, residual: Tensor, attn_out: Tensor) -> Tensor:
    """The rest of a pre-norm LLaMA block after attention: ``residual + o_proj(attn_out)``, then the
    MLP's residual branch (``[B, k, D]`` for the ``k`` rows given)."""
    h = residual + layer.self_attn.o_proj(attn_out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE: ``x [B, h, n, d]`` with ``cos/sin [B, n, d]`` (the inverse of :func:`_unrotate`)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def _prefill_mask(positions: Tensor) -> Tensor:
    """Causal mask ``[B, 1, N, N]`` over the tokens now in the stream (sorted by position) of a
    left-padded batch; without padding the caller passes ``None`` so that SDPA uses its causal
    kernel. Padding rows attend to themselves to stay finite."""
    valid = positions >= 0
    n = positions.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril()
    mask = causal[None] & valid[:, None, :]
    mask |= torch.eye(n, dtype=torch.bool, device=positions.device)[None]
    return mask[:, None]  # [B, 1, N, N]


def _unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Undo RoPE: ``x [B, h, n, d]`` post-rotation, ``cos/sin [B, n, d]`` -> pre-rotation (up to the
    rope's attention scaling, which cosine-based scores ignore): the rotation by the opposite angle."""
    return _rotate(x, cos, -sin)
