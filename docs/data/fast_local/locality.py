"""Experiment (not part of kvcomp): how much of each head's prefill attention lies beyond the
local pattern of local_xp.py (the first 64 tokens and the WINDOW tokens before each query), and,
given a list of column counts C, beyond that pattern plus C positions per KV head: those the
prompt's last 64 queries attend to most (softmax mass averaged over the KV head's query heads),
the "columns" of fast_columns/columns_xp.py.

The embedded model, stock forward, two multi_news prompts of 4000 and 3000 tokens; for queries
at positions 1024, 1088, ... (every 64th, up to 200 before the end) the softmax mass on the other
keys, averaged over those queries and the two prompts. Without columns: one line per layer, one
column per query head, then their mean. With them: one line per layer, per C the mean over query
heads and the maximum.

    .venv/bin/python docs/data/fast_local/locality.py 512                  # locality_512.txt
    .venv/bin/python docs/data/fast_local/locality.py 512 0,128,256,512    # columns_512.txt
"""
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from bench_decode import DEFAULT_DATA, real_text_prompts  # noqa: E402
from kvcore.loading import load_model, load_tokenizer, resolve_model  # noqa: E402

WINDOW, SINKS, EST = int(sys.argv[1]), 64, 64
COLUMNS = [int(c) for c in sys.argv[2].split(",")] if len(sys.argv) > 2 else None
path = resolve_model("smollm2-135m")
model = load_model(path).eval()
beyond: dict[int, list[torch.Tensor]] = {}


def softmax_rows(q, keys, rows, scaling):
    """Causal softmax of the query rows ``rows`` over every key: ``[B, H, len(rows), n]``."""
    logits = (q[:, :, rows] @ keys.transpose(-1, -2)) * scaling
    pos = torch.arange(keys.shape[2])
    return logits.masked_fill(pos[None, None, None, :] > rows[None, None, :, None], float("-inf")).softmax(-1)


def columns(q, k, keys, scaling, c):
    """``[H, n]`` bool: the ``c`` positions (>= SINKS) the last EST queries attend to most, per KV
    head, repeated for its query heads."""
    n, group = k.shape[2], q.shape[1] // k.shape[1]
    mass = softmax_rows(q, keys, torch.arange(n - EST, n), scaling).mean(2)[0]  # [H, n]
    mass = mass.view(k.shape[1], group, n).mean(1)
    mass[:, :SINKS] = -1
    chosen = torch.zeros(k.shape[1], n, dtype=torch.bool)
    chosen.scatter_(1, mass.topk(c, -1).indices, True)
    return chosen.repeat_interleave(group, 0)


def attention(module, q, k, v, mask, **kw):
    n = q.shape[2]
    scaling = kw.get("scaling", q.shape[-1] ** -0.5)
    rows = torch.arange(1024, n - 200, 64)
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    probs = softmax_rows(q, keys, rows, scaling)[0]  # [H, R, n]
    pos = torch.arange(n)
    local = (pos[None, :] < SINKS) | (pos[None, :] >= rows[:, None] - WINDOW)  # [R, n]
    if COLUMNS is None:
        beyond.setdefault(module.layer_idx, []).append((probs * ~local).sum(-1).mean(-1))
    else:
        outside = [(probs * ~(local[None] | columns(q, k, keys, scaling, c)[:, None])).sum(-1).mean(-1) for c in COLUMNS]
        beyond.setdefault(module.layer_idx, []).append(torch.stack(outside))
    return sdpa_attention_forward(module, q, k, v, mask, **kw)


AttentionInterface.register("locality", attention)
model.set_attn_implementation("locality")
tokenizer = load_tokenizer(path)
for n in (4000, 3000):
    ids, _ = real_text_prompts(tokenizer, [n], DEFAULT_DATA)[n]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
if COLUMNS is not None:
    print("layer", " ".join(f"C={c}" for c in COLUMNS))
for layer in sorted(beyond):
    share = torch.stack(beyond[layer]).mean(0)
    if COLUMNS is None:
        print(layer, " ".join(f"{x:.2f}" for x in share.tolist()), f" mean {share.mean():.3f}")
    else:
        print(layer, " ".join(f"{x.mean():.3f}(max {x.max():.2f})" for x in share))
