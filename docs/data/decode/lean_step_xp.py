"""Experiment, not kvcomp code: how much of a CPU decode step is transformers' module machinery?

One `default` decode step of SmolLM2-135M through transformers' forward, against a hand-written
step that calls the same submodules and kvcomp's own cache directly (the prefill's LLaMA-block
helpers), on the same prompt; best of 3 rounds of 10 steps, then the two steps' logits compared,
and the time of the linear layers alone (each called on one token).

    .venv/bin/python docs/data/decode/lean_step_xp.py 1000
"""
import sys
import time

import torch
sys.path.insert(0, "bench")
import bench_decode as bd
from kvcore.config import CompressionConfig
from kvcore.loading import load_model, load_tokenizer, resolve_model
from kvcore.model import _heads, _keys_values, _rotate, _block_output
path = resolve_model("smollm2-135m")
model = load_model(path, device=torch.device("cpu"))
prompts = bd.real_text_prompts(load_tokenizer(path), [int(sys.argv[1])], bd.DEFAULT_DATA)
ids, window = prompts[int(sys.argv[1])]
model.set_compression(CompressionConfig.from_preset("default"))

def lean_step(tok, cache):
    h = model.model.embed_tokens(tok)
    b, q = tok.shape
    pos = (cache.layer(0).next_position[:, None] + torch.arange(q)[None])
    cos, sin = model.model.rotary_emb(h, position_ids=pos)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        qs = _rotate(_heads(attn.q_proj(x), attn.head_dim), cos, sin)
        k, v = _keys_values(attn, x, cos, sin)
        cl = cache.layer(i)
        cl.update(k, v)
        out = cl.attend(qs, attn.scaling)
        h = _block_output(layer, h, out.reshape(b, q, -1))
    return model.lm_head(model.model.norm(h[:, -1:]))

with torch.no_grad():
    for name, fn in [("transformers", lambda tok, c: model(input_ids=tok, cache=c, use_cache=True).logits), ("lean", lean_step)]:
        cache = model.new_cache(window)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(3): fn(tok, cache)
        best = 1e9
        for _ in range(3):
            s = time.perf_counter()
            for _ in range(10): fn(tok, cache)
            best = min(best, (time.perf_counter() - s) / 10)
        print(name, "step ms", round(best * 1e3, 2))
    # equality check on fresh caches
    c1, c2 = model.new_cache(window), model.new_cache(window)
    o1 = model(input_ids=ids, cache=c1, use_cache=True, logits_to_keep=1); model(input_ids=ids, cache=c2, use_cache=True, logits_to_keep=1)
    tok = o1.logits[:, -1].argmax(-1, keepdim=True)
    a = model(input_ids=tok, cache=c1, use_cache=True).logits[:, -1:]
    bl = lean_step(tok, c2)
    print("max diff", (a - bl).abs().max().item())
    # The linear layers alone, each called on one token as a decode step calls them.
    x, hidden = torch.randn(1, 1, model.config.hidden_size), torch.randn(1, 1, model.config.intermediate_size)
    linears = [(m, x) for layer in model.model.layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
               layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj)]
    linears += [(layer.mlp.down_proj, hidden) for layer in model.model.layers] + [(model.lm_head, x)]
    best = 1e9
    for _ in range(3):
        s = time.perf_counter()
        for _ in range(10):
            for m, inp in linears:
                m(inp)
        best = min(best, (time.perf_counter() - s) / 10)
    print("linear layers alone ms", round(best * 1e3, 2))
