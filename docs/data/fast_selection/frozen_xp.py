"""Experiment wrapper (not part of kvcomp): tokens that propagation drops keep a K/V in later layers,
computed from their residual stream frozen at the layer that dropped them (CALM-style state copying).
Batch 1 only. XP_FROZEN_DROP=f: the quantizer's frac_drop for the frozen tokens is raised to f
(by scoring frozen tokens lower: they compete for slots with everything else)."""
import os, sys, functools
import torch
import kvcore.model as M
from kvcore import compressor as comp
from kvcore.types import LayerObservation
from kvcomp_plugins.propagators import selective as sel  # noqa: F401

S = {}
_thin_layer = M._thinning_layer
def thinning_layer(layer, hidden, *, thin, **kw):
    S["hidden_in"] = hidden
    try:
        return _thin_layer(layer, hidden, thin=thin, **kw)
    finally:
        S.pop("hidden_in", None)
M._thinning_layer = thinning_layer

_init = M.CompressedLlamaForCausalLM.compressed_prefill
def compressed_prefill(self, input_ids, attention_mask, cache):
    S.clear(); S["model"] = self
    try:
        return _init(self, input_ids, attention_mask, cache)
    finally:
        S.clear()
M.CompressedLlamaForCausalLM.compressed_prefill = compressed_prefill

_compress = comp.RealTimePrefillCompressor.compress_layer_kv_cache
def compress(self, obs):
    model = S.get("model")
    frozen = S.get("frozen")  # (hidden [1, F, D], positions [1, F])
    if model is None or frozen is None:
        result = _compress(self, obs)
    else:
        layer = model.model.layers[obs.layer_idx]
        attn = layer.self_attn
        h, pos = frozen
        x = layer.input_layernorm(h)
        cos, sin = model.model.rotary_emb(h, position_ids=pos)
        f = h.shape[1]
        k = M._rotate(attn.k_proj(x).view(1, f, -1, attn.head_dim).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(1, f, -1, attn.head_dim).transpose(1, 2)
        positions = torch.cat([obs.positions, pos], dim=1)
        order = positions.argsort(dim=1)
        idx4 = order[:, None, :, None]
        keys = torch.cat([obs.keys, k.to(obs.keys.dtype)], dim=2)
        values = torch.cat([obs.values, v.to(obs.values.dtype)], dim=2)
        keys = keys.gather(2, idx4.expand(-1, keys.shape[1], -1, keys.shape[3]))
        values = values.gather(2, idx4.expand(-1, values.shape[1], -1, values.shape[3]))
        positions = positions.gather(1, order)
        win = obs.window_mask
        win_m = torch.cat([win, torch.zeros_like(pos, dtype=torch.bool)], dim=1).gather(1, order)
        merged = LayerObservation(
            layer_idx=obs.layer_idx, keys=keys, values=values, queries=obs.queries,
            keys_pre_rope=lambda: (_ for _ in ()).throw(RuntimeError("not in this experiment")),
            queries_pre_rope=lambda: (_ for _ in ()).throw(RuntimeError("not in this experiment")),
            window_idx=win_m.any(dim=0).nonzero().flatten(), positions=positions,
            n_original=obs.n_original, n_sink=obs.n_sink, window_rows=win_m,
        )
        stream = _compress(self, obs)  # for the stream's keep indices
        scores = self.scorer.score(merged)
        q = self.quantizer.for_layer(obs.layer_idx) if hasattr(self.quantizer, "for_layer") else self.quantizer
        compressed = q.compress(merged.keys, merged.values, merged.positions, scores, merged.protected_mask)
        result = comp.LayerResult(compressed=compressed, keep_idx=stream.keep_idx, scores=None, timings_s=stream.timings_s)
    keep = result.keep_idx
    if keep is not None and model is not None and "hidden_in" in S and keep.shape[1] < obs.positions.shape[1]:
        n = obs.positions.shape[1]
        dropped = torch.ones(n, dtype=torch.bool); dropped[keep[0]] = False
        d_idx = dropped.nonzero().flatten()
        h_new = S["hidden_in"][:, d_idx]
        p_new = obs.positions[:, d_idx]
        if frozen is not None:
            h_new = torch.cat([frozen[0], h_new], dim=1); p_new = torch.cat([frozen[1], p_new], dim=1)
        S["frozen"] = (h_new, p_new)
    return result
comp.RealTimePrefillCompressor.compress_layer_kv_cache = compress
from kvcore.cli import main
sys.exit(main(sys.argv[1:]))
