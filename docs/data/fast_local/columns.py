"""Experiment (not part of kvcomp): how much of each layer's prefill attention lies beyond the first
64 tokens, the WINDOW tokens before each query, and C more key positions per KV head chosen by
the attention of the prompt's last 64 queries (mean over the KV head's query heads), the
"columns" a dynamic sparse attention would add to local_xp.py's pattern.

The embedded model, stock forward, the two multi_news prompts of locality.py (4000 and 3000
tokens), queries at positions 1024, 1088, ... (every 64th, up to 200 before the end); one line per
layer, one column per C: the mass beyond the pattern averaged over query heads (and its maximum
over query heads).

    .venv/bin/python docs/data/fast_local/columns.py 512 0,128,256,512
"""
import sys
from pathlib import Path
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from bench_decode import DEFAULT_DATA, real_text_prompts
from kvcore.loading import load_model, load_tokenizer, resolve_model

WINDOW, SINKS = int(sys.argv[1]), 64
CS = [int(c) for c in sys.argv[2].split(",")]
EST = int(sys.argv[3]) if len(sys.argv) > 3 else 64
path = resolve_model("smollm2-135m")
model = load_model(path).eval()
res = {}

def attention(module, q, k, v, mask, **kw):
    n = q.shape[2]
    sc = kw.get("scaling", q.shape[-1] ** -0.5)
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    pos = torch.arange(n)
    # estimate: last EST queries
    erows = torch.arange(n - EST, n)
    el = (q[:, :, erows] @ keys.transpose(-1, -2)) * sc
    ep = el.masked_fill(pos[None, None, None, :] > erows[None, None, :, None], float("-inf")).softmax(-1).mean(2)[0]  # [H, n]
    rows = torch.arange(1024, n - 200, 64)
    logits = (q[:, :, rows] @ keys.transpose(-1, -2)) * sc
    probs = logits.masked_fill(pos[None, None, None, :] > rows[None, None, :, None], float("-inf")).softmax(-1)[0]  # H,R,n
    local = (pos[None, :] < SINKS) | (pos[None, :] >= rows[:, None] - WINDOW)  # R,n
    out = []
    for C in CS:
        # columns: top-C by estimate, per head (KV head: mean over its group)
        g = q.shape[1] // k.shape[1]
        est_kv = ep.view(k.shape[1], g, n).mean(1)
        est_kv[:, :SINKS] = -1
        idx = est_kv.topk(C, -1).indices
        col = torch.zeros(k.shape[1], n, dtype=torch.bool)
        col.scatter_(1, idx, True)
        col = col.repeat_interleave(g, 0)  # H, n
        cov = local[None] | col[:, None, :]
        out.append((probs * (~cov)).sum(-1).mean(-1))
    res.setdefault(module.layer_idx, []).append(torch.stack(out))
    return sdpa_attention_forward(module, q, k, v, mask, **kw)

AttentionInterface.register("vert", attention)
model.set_attn_implementation("vert")
tok = load_tokenizer(path)
for n in (4000, 3000):
    ids, _ = real_text_prompts(tok, [n], DEFAULT_DATA)[n]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
print("layer", " ".join(f"C={c}" for c in CS))
for layer in sorted(res):
    s = torch.stack(res[layer]).mean(0)  # [len(CS), H]
    print(layer, " ".join(f"{x.mean():.3f}(max {x.max():.2f})" for x in s))
