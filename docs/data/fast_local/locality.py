"""Experiment (not part of kvcomp): how much of each head's prefill attention lies beyond the
local pattern of local_xp.py (the first 64 tokens and the WINDOW tokens before each query).

The embedded model, stock forward, two multi_news prompts of 4000 and 3000 tokens; for queries
at positions 1024, 1088, ... (every 64th, up to 200 before the end) the softmax mass on the other
keys, averaged over those queries and the two prompts; one line per layer, one column per query
head, then their mean.

    .venv/bin/python docs/data/fast_local/locality.py 512
"""
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from bench_decode import DEFAULT_DATA, real_text_prompts  # noqa: E402
from kvcore.loading import load_model, load_tokenizer, resolve_model  # noqa: E402

WINDOW, SINKS = int(sys.argv[1]), 64
path = resolve_model("smollm2-135m")
model = load_model(path).eval()
beyond: dict[int, list[torch.Tensor]] = {}


def attention(module, q, k, v, mask, **kw):
    n = q.shape[2]
    rows = torch.arange(1024, n - 200, 64)
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    logits = (q[:, :, rows] @ keys.transpose(-1, -2)) * kw.get("scaling", q.shape[-1] ** -0.5)
    pos = torch.arange(n)
    probs = logits.masked_fill(pos[None, None, None, :] > rows[None, None, :, None], float("-inf")).softmax(-1)
    local = (pos[None, :] < SINKS) | (pos[None, :] >= rows[:, None] - WINDOW)
    beyond.setdefault(module.layer_idx, []).append((probs * (~local)[None, None]).sum(-1).mean(-1)[0])
    return sdpa_attention_forward(module, q, k, v, mask, **kw)


AttentionInterface.register("locality", attention)
model.set_attn_implementation("locality")
tokenizer = load_tokenizer(path)
for n in (4000, 3000):
    ids, _ = real_text_prompts(tokenizer, [n], DEFAULT_DATA)[n]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
for layer in sorted(beyond):
    share = torch.stack(beyond[layer]).mean(0)
    print(layer, " ".join(f"{x:.2f}" for x in share.tolist()), f" mean {share.mean():.3f}")
