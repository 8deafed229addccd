"""Experiment wrapper (not part of kvcomp): other token choices for selective propagation.

XP_LAST=N   protect the N tokens before the prompt window (recency) in propagation.
XP_AGG=raw  rank by raw window attention (pooled, mean over KV heads), no per-head min-max.
XP_STRIDE=s protect every s-th position (coverage of the whole prompt).
XP_VNORM=1  weight the window attention by each token's value norm before pooling.
"""
import os, sys
import torch
from kvcore import compressor as comp
from kvcomp_plugins.propagators import selective as sel
from kvcomp_plugins.scorers import _common

LAST = int(os.environ.get("XP_LAST", "0"))
AGG = os.environ.get("XP_AGG", "")
VNORM = os.environ.get("XP_VNORM", "") == "1"
STRIDE = int(os.environ.get("XP_STRIDE", "0"))
STASH = {}
_compress = comp.RealTimePrefillCompressor.compress_layer_kv_cache
def compress(self, obs):
    STASH["obs"] = obs
    try:
        return _compress(self, obs)
    finally:
        STASH.pop("obs", None)
comp.RealTimePrefillCompressor.compress_layer_kv_cache = compress

_select = sel.SelectivePropagator.select
def select(self, layer_idx, scores, positions, protected, n_original):
    obs = STASH.get("obs")
    if obs is not None and self.acts_after(layer_idx):
        if LAST:
            qpos = obs.window_query_positions
            start = torch.where(qpos >= 0, qpos, torch.iinfo(qpos.dtype).max).amin(dim=1, keepdim=True)
            protected = protected.bool() | ((positions >= start - LAST) & (positions >= 0))
        if STRIDE:
            protected = protected.bool() | ((positions % STRIDE == 0) & (positions >= 0))
        if AGG or VNORM:
            cand = _common.candidate_mask(obs)
            attn = _common.window_attention(obs)
            if VNORM:
                attn = attn * obs.values.float().norm(dim=-1)
            attn = _common.pool_tokens(attn, cand, 7, "max")
            if AGG != "raw":
                attn = _common.minmax_normalise(attn, cand)
            scores = _common.finalise(attn, obs)
    return _select(self, layer_idx, scores, positions, protected, n_original)
sel.SelectivePropagator.select = select
from kvcore.cli import main
sys.exit(main(sys.argv[1:]))
