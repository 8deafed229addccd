"""Experiment wrapper (not part of kvcomp): other token choices for selective propagation.

XP_LAST=N   protect the N tokens before the prompt window (recency) in propagation.
XP_AGG=raw  rank by raw window attention (pooled, mean over KV heads), no per-head min-max.
XP_STRIDE=s protect every s-th position (coverage of the whole prompt).
XP_SAMPLE=k attention from k queries spread over the prompt, weight XP_SAMPLE_W (0.5) against the window's.
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
SAMPLE = int(os.environ.get("XP_SAMPLE", "0"))
SAMPLE_W = float(os.environ.get("XP_SAMPLE_W", "0.5"))
import kvcore.model as M
_attn = M.kvcomp_attention_forward
def attn_fwd(module, q, k, v, mask, **kw):
    STASH["q_all"] = q
    return _attn(module, q, k, v, mask, **kw)
M.kvcomp_attention_forward = attn_fwd


def sampled_attention(obs, q_all, k_rows):
    """Mean attention each token receives from k_rows queries spread over the prompt before the window
    (each token averaged over the sampled queries that can see it), [B, H_kv, N]."""
    keys = obs.keys.float()
    b, h_kv, n, d = keys.shape
    first_window = int(obs.window_idx.min())
    rows = torch.linspace(0, first_window - 1, k_rows + 1)[1:].round().long().unique()
    q = q_all[:, :, rows].float()  # [B, H, k, d]
    g = q.shape[1] // h_kv
    q = q.view(b, h_kv, g, rows.numel(), d)
    logits = torch.einsum("bhgkd,bhnd->bhgkn", q, keys) / d ** 0.5
    qpos = obs.positions[:, rows]  # [B, k]
    sees = obs.positions[:, None, :] <= qpos[:, :, None]  # [B, k, N]
    sees &= obs.positions[:, None, :] >= 0
    logits = logits.masked_fill(~sees[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).mean(dim=2)  # [B, H_kv, k, N]
    count = sees.sum(dim=1).clamp_min(1)  # [B, N]
    return probs.sum(dim=2) / count[:, None, :]
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
        if SAMPLE and "q_all" in STASH and STASH["q_all"].shape[2] == obs.keys.shape[2]:
            cand = _common.candidate_mask(obs)
            extra = _common.minmax_normalise(_common.pool_tokens(sampled_attention(obs, STASH["q_all"], SAMPLE), cand, 7, "max"), cand)
            base = torch.where(cand[:, None, :], scores, torch.zeros_like(scores))
            scores = _common.finalise((1 - SAMPLE_W) * base + SAMPLE_W * extra, obs)
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
