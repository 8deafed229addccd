"""CompressedLlamaForCausalLM and CompressedKVCache on tiny random LLaMA models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config

from kvcore.cache import DENSE_SPARE_TOKENS, CompressedKVCache
from kvcore.compressor import RealTimePrefillCompressor
from kvcore.config import CompressionConfig
from kvcore.model import CompressedLlamaForCausalLM, check_llama_config
from kvcore.types import tensor_bytes

from tiny_models import SHORT_PROMPT_PROPAGATION, tiny_config

PROPAGATE = {"propagator.keep_ratio_by_layer": {1: 0.5, 2: 0.25}, **SHORT_PROMPT_PROPAGATION}


def _config(preset: str, **overrides) -> CompressionConfig:
    return CompressionConfig.from_preset(preset).with_overrides(overrides)


def _ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 98, (batch, n), generator=torch.Generator().manual_seed(seed))


def _teacher_forced_logprobs(model, ids: torch.Tensor, cont: torch.Tensor, cache=None) -> torch.Tensor:
    """Log-probs after the prompt and after each continuation token, read through the model's cache."""
    out = model(input_ids=ids, cache=cache, use_cache=True)
    n = ids.shape[1]
    pos = torch.arange(n, n + cont.shape[1])[None]
    out2 = model(input_ids=cont, cache=out.cache, position_ids=pos, use_cache=True)
    return torch.log_softmax(torch.cat([out.logits[:, -1:], out2.logits], dim=1).float(), dim=-1)


@torch.no_grad()
def test_identity_compressor_reproduces_the_stock_model(model_pair):
    ours, stock = model_pair
    ours.compressor = RealTimePrefillCompressor(window_size=8)  # every component none: fp16 storage only
    try:
        ids = _ids(120)
        ref = stock.generate(ids, max_new_tokens=12, do_sample=False)
        got = ours.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(ref, got)
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_the_last_layer_runs_its_mlp_on_the_last_token_only_and_keeps_the_logits(model_pair):
    ours, stock = model_pair
    ours.compressor = RealTimePrefillCompressor(window_size=8)
    seen: list[int] = []
    hook = ours.model.layers[-1].mlp.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    try:
        ids = _ids(120)
        got = ours(input_ids=ids, use_cache=True).logits[:, -1]
        ref = stock(input_ids=ids).logits[:, -1]
        assert seen == [1]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    finally:
        hook.remove()
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_the_trimmed_last_layer_stores_and_scores_what_the_whole_layer_would(model_pair, monkeypatch):
    import kvcore.model as model_module

    ours, _ = model_pair
    ours.set_compression(_config("default", **{"quantizer.residual_length": 16}))
    try:
        ids, window = _ids(300), torch.arange(280, 292)  # a question inside the prompt, a tail after it
        trimmed = ours(input_ids=ids, cache=ours.new_cache(window), use_cache=True)
        whole = lambda layer, hidden, window_idx, **kw: model_module._whole_layer(layer, hidden, **kw)[:, -1:]
        monkeypatch.setattr(model_module, "_last_token_layer", whole)
        ref = ours(input_ids=ids, cache=ours.new_cache(window), use_cache=True)
        torch.testing.assert_close(trimmed.logits, ref.logits, rtol=1e-4, atol=1e-4)
        got, want = trimmed.cache.layer(-1).compressed, ref.cache.layer(-1).compressed
        assert [t.bits for t in got.tiers] == [t.bits for t in want.tiers]
        for a, b in zip(got.tiers, want.tiers):
            assert torch.equal(a.positions, b.positions), "the window queries must pick the same tokens"
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_lossless8_logits_match_uncompressed(model_pair):
    ours, stock = model_pair
    ours.set_compression(_config("lossless8", **{"quantizer.residual_length": 16}))
    ids, cont = _ids(400), _ids(8, seed=7)
    ref = _teacher_forced_logprobs(stock, ids, cont)
    got = _teacher_forced_logprobs(ours, ids, cont)
    kl = (ref.exp() * (ref - got)).sum(-1)
    assert isinstance(ours.new_cache(), CompressedKVCache)
    assert float(kl.max()) < 1e-3, kl
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_padded_batch_generate_matches_stock_with_identity_compressor(model_pair):
    ours, stock = model_pair
    ours.compressor = RealTimePrefillCompressor(window_size=8)
    try:
        ids = _ids(60, batch=2)
        mask = torch.ones_like(ids)
        mask[0, :9] = 0
        ref = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(ref, got)
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_generate_samples_on_the_compressed_cache(model_pair):
    ours, _ = model_pair
    ours.set_compression(_config("default"))
    ids = _ids(200, batch=2)
    torch.manual_seed(3)
    a = ours.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(3)
    b = ours.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
    assert a.shape == (2, 206) and torch.equal(a, b)
    # A value check beside the determinism: sampling from the single most likely token is greedy decoding.
    greedy = ours.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=True, top_k=1), greedy)
    ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_propagation_thins_the_stream_and_keeps_original_positions(model_pair):
    ours, _ = model_pair
    ours.set_compression(_config("propagate-only", **PROPAGATE))
    n = 200
    out = ours(input_ids=_ids(n))
    cache = out.cache
    assert cache.prefill_stats["tokens_per_layer_in_stream"] == [n, n, n // 2, n // 4]
    assert cache.tokens_kept_per_layer() == [n, n, n // 2, n // 4]
    for idx in range(4):
        pos = cache.layer(idx).compressed.residual_positions[0, 0]
        assert torch.all(pos[1:] > pos[:-1]), "kept tokens stay sorted by original position"
        assert int(pos[-1]) == n - 1, "the last prompt token always continues"
        assert set(range(4)) <= set(pos.tolist()), "sinks always continue"
    ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_propagated_logits_equal_a_reference_forward_of_the_kept_tokens_at_their_positions(model_pair):
    ours, stock = model_pair
    ours.set_compression(_config("propagate-only", **PROPAGATE))
    try:
        n = 200
        ids = _ids(n)
        out = ours(input_ids=ids)
        # Reference: the stock model's own layers, run by hand; before layer l the stream is cut to
        # the tokens stored in layer l, each fed with its original position as explicit position_ids.
        hidden, pos = stock.model.embed_tokens(ids), torch.arange(n)
        for idx, layer in enumerate(stock.model.layers):
            kept = out.cache.layer(idx).compressed.residual_positions[0, 0].long()
            if kept.numel() < pos.numel():
                hidden, pos = hidden[:, torch.searchsorted(pos, kept)], kept
            position_ids = pos[None]
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                position_embeddings=stock.model.rotary_emb(hidden, position_ids=position_ids),
            )
        assert pos.numel() == n // 4, "the reference must see the thinned stream"
        ref = stock.lm_head(stock.model.norm(hidden[:, -1:])).float()
        assert torch.allclose(out.logits, ref, atol=1e-4, rtol=1e-4), (out.logits - ref).abs().max()
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_a_thinning_layer_runs_its_mlp_on_the_kept_tokens_only(model_pair, monkeypatch):
    import kvcore.model as model_module

    ours, _ = model_pair
    ours.set_compression(_config("propagate-only", **PROPAGATE))
    seen: dict[int, list[int]] = {1: [], 2: []}
    hooks = [
        ours.model.layers[i].mlp.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(args[0].shape[1]))
        for i in seen
    ]
    try:
        n, ids = 200, _ids(200)
        thinned = ours(input_ids=ids)
        assert seen == {1: [n // 2], 2: [n // 4]}, "a dropped token's MLP output is never read"
        # The same prefill with every layer whole and the stream gathered after it.
        monkeypatch.setattr(model_module, "_thinning_layer", model_module._whole_layer_then_thin)
        ref = ours(input_ids=ids)
        torch.testing.assert_close(thinned.logits, ref.logits, rtol=1e-5, atol=1e-5)
        for i in range(4):
            got, want = thinned.cache.layer(i).compressed, ref.cache.layer(i).compressed
            assert torch.equal(got.residual_positions, want.residual_positions)
            torch.testing.assert_close(got.residual_keys, want.residual_keys, rtol=1e-5, atol=1e-5)
    finally:
        for hook in hooks:
            hook.remove()
        ours.set_compression(CompressionConfig())


def _stored_tensors(cache: CompressedKVCache):
    for i in range(len(cache.layers)):
        layer = cache.layer(i)
        c = layer.compressed
        if layer.dense_keys is None:
            yield from (c.residual_keys, c.residual_values, c.residual_positions)
        else:  # decoding moved the residual into the dense store (views, not copies)
            assert c.residual_keys.untyped_storage().data_ptr() == layer.dense_keys.untyped_storage().data_ptr()
            yield from (layer.dense_keys, layer.dense_values, layer.dense_positions)
        for tier in [*c.tiers, *layer.flushed]:
            yield from (tier.positions, tier.keys.packed, tier.keys.scale, tier.keys.zero)
            yield from (tier.values.packed, tier.values.scale, tier.values.zero)


def _prefill_and_decode(model, n_prompt: int, steps: int) -> CompressedKVCache:
    """The cache after a random ``n_prompt``-token prompt and ``steps`` greedy decode steps."""
    out = model(input_ids=_ids(n_prompt))
    cache = out.cache
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=token, cache=cache, use_cache=True)
    return cache


@torch.no_grad()
@pytest.mark.parametrize("group_size, flushed_tiers", [(4, 1), (32, 3)])
def test_cache_bytes_are_the_tensors_nbytes_and_decode_flushes_into_tiers(model_pair, group_size, flushed_tiers):
    ours, _ = model_pair
    overrides = {"quantizer.residual_length": 8, "quantizer.flush_tokens": 4, "quantizer.group_size": group_size}
    ours.set_compression(_config("default", **overrides))
    cache = _prefill_and_decode(ours, n_prompt=150, steps=20)
    assert cache.get_seq_length() == 170
    flushed = [sum(t.n_tokens for t in cache.layer(i).flushed) for i in range(4)]
    assert flushed == [12] * 4, "generated tokens past R + flush - 1 were quantised, 4 at a time"
    # Flushes aligned with the per-channel key groups extend one tier; unaligned ones stay apart.
    assert all(len(cache.layer(i).flushed) == flushed_tiers for i in range(4))
    assert cache.kv_bytes == sum(tensor_bytes(t) for t in _stored_tensors(cache))
    # The dense store holds only a few free slots (they are counted), also after flushes freed some.
    assert all(0 < cache.layer(i).dense_keys.shape[-2] - cache.layer(i).n_dense <= DENSE_SPARE_TOKENS for i in range(4))
    assert cache.kv_bytes < cache.kv_bytes_fp16_full()
    ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_one_token_flushes_keep_decoded_tokens_at_8_bit_and_no_free_slot(model_pair):
    """R = 0, one-token flushes with per-token key groups, protected tokens at 8 bit: the dense
    store holds only the newest token, and the packed path reads the mixed key groupings exactly
    as the torch path that dequantises the flushed tier."""
    ours, _ = model_pair
    tiny = {"quantizer.residual_length": 0, "quantizer.flush_tokens": 1, "quantizer.flush_key_mode": "token",
            "quantizer.protected_bits": 8}
    logits = {}
    for backend in ("auto", "torch"):
        ours.set_compression(_config("default", **tiny, **{"quantizer.backend": backend}))
        out = ours(input_ids=_ids(150))
        cache, steps = out.cache, []
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(6):
            out = ours(input_ids=token, cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        logits[backend] = torch.stack(steps)
        for i in range(4):
            layer = cache.layer(i)
            # The newest token fills the one slot the store holds; the next step flushes it first.
            assert layer.n_residual == 0 and layer.n_dense == 1 and layer.dense_keys.shape[-2] == 1
            assert layer.compressed.tiers[0].bits == 8  # sinks and the prompt window
            (flushed,) = layer.flushed
            assert flushed.n_tokens == 5 and flushed.keys.axis == "token" and flushed.bits == 8
        assert cache.kv_bytes == sum(tensor_bytes(t) for t in _stored_tensors(cache))
    torch.testing.assert_close(logits["auto"], logits["torch"], rtol=1e-4, atol=1e-4)
    ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_same_inputs_give_the_same_cache_bytes(model_pair):
    ours, _ = model_pair
    ours.set_compression(_config("fast", **PROPAGATE))
    caches = [ours(input_ids=_ids(180)).cache for _ in range(2)]
    for a, b in zip(*(list(_stored_tensors(c)) for c in caches)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # ... and they are the right bytes: layer 0's full-precision keys are the stock model's keys at
    # those positions (a reference forward with a plain cache), stored as fp16.
    ours.set_compression(CompressionConfig())
    stock_keys = ours(input_ids=_ids(180), use_cache=True).cache.layers[0].keys
    layer0 = caches[0].layer(0).compressed
    pos = layer0.residual_positions.long()
    ref = stock_keys.gather(2, pos.unsqueeze(-1).expand(*pos.shape, stock_keys.shape[-1])).to(torch.float16)
    torch.testing.assert_close(layer0.residual_keys, ref, rtol=1e-3, atol=1e-3)


def test_non_llama_config_is_refused_with_its_architecture():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        check_llama_config(GPT2Config())


@torch.no_grad()
def test_bad_prompts_and_mismatched_caches_are_refused(model_pair):
    ours, _ = model_pair
    ours.set_compression(_config("default"))
    with pytest.raises(ValueError, match="exceeds the model's 2048 positions"):
        ours(input_ids=_ids(2049))
    other = CompressedLlamaForCausalLM(tiny_config(num_hidden_layers=2)).eval()
    other.set_compression(_config("default"))
    foreign = other(input_ids=_ids(50)).cache
    with pytest.raises(ValueError, match="belongs to another model"):
        ours(input_ids=_ids(1), cache=foreign, use_cache=True)
    with pytest.raises(ValueError, match="empty"):  # a prompt given as embeddings cannot be compressed
        ours(inputs_embeds=torch.zeros(1, 1, 128), cache=CompressedKVCache(4), use_cache=True)
    ids = _ids(30)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        ours(input_ids=ids, attention_mask=mask)
    ours.set_compression(CompressionConfig())


def test_a_schedule_naming_a_missing_layer_is_refused_before_any_work(model_pair):
    ours, _ = model_pair
    bad = _config("propagate-only", **{"propagator.keep_ratio_by_layer": {9: 0.5}})
    with pytest.raises(ValueError, match="9"):
        ours.set_compression(bad)
    assert ours.compressor is None, "a refused config leaves the model as it was"


def test_a_layer_budget_naming_a_missing_layer_is_refused_before_any_work(model_pair):
    ours, _ = model_pair  # 4 layers
    with pytest.raises(ValueError, match=r"budget_by_layer names layer\(s\) \[4\]"):
        ours.set_compression(_config("default", **{"quantizer.budget_by_layer": {0: 0.5, 4: 1.2}}))
    assert ours.compressor is None


@torch.no_grad()
def test_each_layer_stores_the_budget_of_its_range(model_pair):
    ours, _ = model_pair
    budget = {"quantizer.budget_by_layer": {1: 0.5, 3: 1.4}, "quantizer.residual_length": 16}
    try:
        ours.set_compression(_config("default", **{"quantizer.residual_length": 16}))
        flat = ours(input_ids=_ids(300), use_cache=True).cache.tokens_kept_per_layer()
        ours.set_compression(_config("default", **budget))
        kept = ours(input_ids=_ids(300), use_cache=True).cache.tokens_kept_per_layer()
        assert kept[0] == flat[0] and kept[1] == kept[2] < flat[1] and kept[3] > flat[3], (flat, kept)
    finally:
        ours.set_compression(CompressionConfig())


def test_a_group_size_that_does_not_divide_head_dim_is_refused_before_any_work(model_pair):
    ours, _ = model_pair  # head_dim 32
    with pytest.raises(ValueError, match="24"):
        ours.set_compression(_config("default", **{"quantizer.group_size": 24}))
    assert ours.compressor is None


@torch.no_grad()
def test_a_group_larger_than_the_head_is_read_as_the_head(model_pair):
    ours, _ = model_pair  # head_dim 32
    ours.set_compression(_config("default", **{"quantizer.group_size": 64, "quantizer.residual_length": 16}))
    try:
        tier = ours(input_ids=_ids(300), use_cache=True).cache.layer(0).compressed.tiers[0]
        assert (tier.keys.axis, tier.keys.group_size) == ("channel", 32)
        assert (tier.values.axis, tier.values.group_size) == ("token", 32)
        assert tier.values.scale.shape[-1] == 1, "one (scale, zero) per token and head"
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_tokens_after_the_question_always_continue_through_propagation(model_pair):
    ours, _ = model_pair
    ours.set_compression(_config("propagate-only", **PROPAGATE))
    n, question = 200, torch.arange(120, 140)  # the question sits before a 60-token tail
    cache = ours.new_cache(question)
    ours(input_ids=_ids(n), cache=cache)
    last = cache.layer(3).compressed.residual_positions[0, 0].tolist()
    assert len(last) == 4 + (n - 120), "thinned to the sinks, the question and its tail"
    assert set(range(120, n)) <= set(last), "the question and everything after it reach the last layer"
    ours.set_compression(CompressionConfig())


def _decode_logits(model, ids: torch.Tensor, mask: torch.Tensor, steps: torch.Tensor, cache=None) -> torch.Tensor:
    """Logits ``[B, 1 + T, V]``: after the prompt, then after each forced token of ``steps [B, T]``,
    through direct ``model(...)`` calls that pass the attention mask but no ``position_ids``."""
    out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
    rows = [out.logits[:, -1]]
    for t in range(steps.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=steps[:, t : t + 1], cache=out.cache, attention_mask=mask, use_cache=True)
        rows.append(out.logits[:, -1])
    return torch.stack(rows, dim=1).float()


@pytest.mark.parametrize("preset", ["default", "fast"])
@torch.no_grad()
def test_each_row_of_a_compressed_batch_equals_its_single_prompt_run(model_pair, preset):
    ours, _ = model_pair
    ours.set_compression(_config(preset, **(PROPAGATE if preset == "fast" else {})))
    try:
        ids, steps = _ids(150, batch=2, seed=4), _ids(5, batch=2, seed=9)
        got = _decode_logits(ours, ids, torch.ones_like(ids), steps)
        assert not torch.allclose(got[0], got[1]), "the rows must differ for the check to mean anything"
        for row in range(2):
            one = ids[row : row + 1]
            ref = _decode_logits(ours, one, torch.ones_like(one), steps[row : row + 1])
            assert torch.allclose(got[row], ref[0], atol=1e-4, rtol=1e-4), (row, (got[row] - ref[0]).abs().max())
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_direct_decode_calls_on_a_left_padded_batch_take_positions_from_the_mask(model_pair):
    # Tier sizes are shared by the batch, so a padded row equals its own run only when every
    # token is kept at a per-token precision: lossless8 with per-token keys.
    ours, _ = model_pair
    ours.set_compression(_config("lossless8", **{"quantizer.key_mode": "token", "quantizer.residual_length": 16}))
    try:
        long_, short = _ids(150, seed=1), _ids(110, seed=2)
        pad = long_.shape[1] - short.shape[1]
        ids = torch.cat([long_, torch.cat([torch.full((1, pad), 1), short], dim=1)])
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        steps = _ids(5, batch=2, seed=9)
        got = _decode_logits(ours, ids, mask, steps)
        for row, prompt in enumerate((long_, short)):
            ref = _decode_logits(ours, prompt, torch.ones_like(prompt), steps[row : row + 1])
            assert torch.allclose(got[row], ref[0], atol=1e-4, rtol=1e-4), (row, (got[row] - ref[0]).abs().max())
    finally:
        ours.set_compression(CompressionConfig())


@pytest.mark.parametrize("preset", ["default", "lossless8"])
@torch.no_grad()
def test_a_left_padded_batch_with_a_question_per_row_decodes_like_each_row_alone(model_pair, preset):
    # Rows of different lengths, each with its own question window: every row is compressed on
    # its own tokens (tier sizes from its own length), so its logits are those of its single run.
    ours, _ = model_pair
    ours.set_compression(_config(preset, **{"quantizer.residual_length": 16}))
    try:
        long_, short = _ids(160, seed=1), _ids(110, seed=2)
        questions = (torch.arange(120, 140), torch.arange(60, 70))  # in each row's own token indices
        pad = long_.shape[1] - short.shape[1]
        ids = torch.cat([long_, torch.cat([torch.full((1, pad), 1), short], dim=1)])
        mask = torch.ones_like(ids)
        mask[1, :pad] = 0
        window = torch.zeros_like(ids, dtype=torch.bool)
        window[0, questions[0]] = True
        window[1, questions[1] + pad] = True
        steps = _ids(5, batch=2, seed=9)
        got = _decode_logits(ours, ids, mask, steps, ours.new_cache(window))
        assert not torch.allclose(got[0], got[1])
        for row, (prompt, question) in enumerate(zip((long_, short), questions)):
            ref = _decode_logits(ours, prompt, torch.ones_like(prompt), steps[row : row + 1], ours.new_cache(question))
            assert torch.allclose(got[row], ref[0], atol=1e-4, rtol=1e-4), (row, (got[row] - ref[0]).abs().max())
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_a_batch_row_shorter_than_the_default_window_propagates(model_pair):
    ours, _ = model_pair
    ours.set_compression(_config("fast", **PROPAGATE))  # window_size 32
    try:
        long_, short = _ids(120, seed=1), _ids(20, seed=2)
        ids = torch.cat([long_, torch.cat([torch.full((1, 100), 1), short], dim=1)])
        mask = torch.ones_like(ids)
        mask[1, :100] = 0
        got = _decode_logits(ours, ids, mask, _ids(2, batch=2, seed=9))
        ref = _decode_logits(ours, short, torch.ones_like(short), _ids(2, batch=2, seed=9)[1:])
        assert torch.allclose(got[1], ref[0], atol=1e-4, rtol=1e-4)
    finally:
        ours.set_compression(CompressionConfig())


@pytest.mark.parametrize("preset", ["default", "fast"])
@torch.no_grad()
def test_a_one_token_prompt_fills_the_cache_and_decodes(model_pair, preset):
    ours, stock = model_pair
    ours.set_compression(_config(preset, **(PROPAGATE if preset == "fast" else {})))
    try:
        ids = _ids(1)
        out = ours(input_ids=ids)
        assert out.cache.tokens_kept_per_layer() == [1, 1, 1, 1]
        ref = stock.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(ours.generate(ids, max_new_tokens=4, do_sample=False), ref)
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_only_prefilled_caches_of_one_config_stack(model_pair):
    ours, _ = model_pair
    ours.set_compression(_config("default", **{"quantizer.residual_length": 16}))
    try:
        a = ours(input_ids=_ids(120, seed=1), cache=ours.new_cache(), use_cache=True).cache
        b = ours(input_ids=_ids(90, seed=2), cache=ours.new_cache(), use_cache=True).cache
        stacked = CompressedKVCache.stack([a, b])
        assert stacked.get_seq_length() == 120 and stacked.layer(0).next_position.tolist() == [120, 90]
        assert stacked.kv_bytes >= a.kv_bytes + b.kv_bytes, "fillers are stored and counted"
        with pytest.raises(ValueError, match="no caches"):
            CompressedKVCache.stack([])
        with pytest.raises(ValueError, match="filled by a prefill and not yet decoded"):
            CompressedKVCache.stack([a, ours.new_cache()])
        ours(input_ids=_ids(1, seed=3), cache=a, use_cache=True)  # a decodes one token
        with pytest.raises(ValueError, match="not yet decoded"):
            CompressedKVCache.stack([a, b])
        ours.set_compression(_config("lossless8"))
        other = ours(input_ids=_ids(60, seed=4), cache=ours.new_cache(), use_cache=True).cache
        with pytest.raises(ValueError, match="different models or configs"):
            CompressedKVCache.stack([b, other])
    finally:
        ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_a_cache_stores_tier_positions_as_int16_and_counts_two_bytes_each(model_pair):
    ours, _ = model_pair
    ours.set_compression(_config("default", **{"quantizer.residual_length": 8, "quantizer.flush_tokens": 4}))
    cache = _prefill_and_decode(ours, n_prompt=150, steps=12)
    for i in range(4):
        layer = cache.layer(i)
        prompt_positions = torch.cat([t.positions for t in layer.compressed.tiers], dim=-1)
        assert prompt_positions.dtype == torch.int16
        # Each head stores distinct prompt positions, all of them real ones.
        assert all(len(set(row.tolist())) == row.numel() for row in prompt_positions[0])
        assert int(prompt_positions.min()) >= 0 and int(prompt_positions.max()) < 150
        (flushed,) = layer.flushed
        assert flushed.positions.dtype == torch.int16
        assert flushed.positions[0, 0].tolist() == list(range(150, 150 + flushed.n_tokens))
    assert cache.kv_bytes == sum(tensor_bytes(t) for t in _stored_tensors(cache))
    ours.set_compression(CompressionConfig())


@torch.no_grad()
def test_decoded_positions_past_int16_are_stored_as_int32():
    """A flush at position 32766 still fits int16; the next one does not, and joining the two
    keeps every position (the tier becomes int32)."""
    from kvcomp_plugins.quantizers.mixed_precision import MixedPrecisionQuantizer

    quantizer = MixedPrecisionQuantizer(
        group_size=4, residual_length=0, flush_tokens=1, flush_key_mode="token", frac_8bit=0.0, frac_4bit=0.5,
        frac_2bit=0.0, frac_drop=0.5,
    )
    n, start = 16, 32766 - 16
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    positions = torch.arange(start, start + n).unsqueeze(0)
    layer = CompressedKVCache(1, quantizer).layer(0)
    compressed = quantizer.compress(keys, values, positions, torch.rand(1, 2, n, generator=g), torch.zeros(1, n, dtype=torch.bool))
    layer.store_prefill(compressed, n_prompt=start + n, next_position=torch.tensor([start + n]))
    assert layer.compressed.tiers[0].positions.dtype == torch.int16
    for _ in range(3):  # decoded tokens at 32766, 32767, 32768; the first two get flushed
        layer.update(torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g))
    (flushed,) = layer.flushed
    assert flushed.positions.dtype == torch.int32
    assert flushed.positions[0, 0].tolist() == [32766, 32767]
