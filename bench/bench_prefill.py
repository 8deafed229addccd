"""Prefill time, KV bytes, peak memory and decode speed of the presets on a LLaMA of a given *shape*.

The weights are random, initialised on the device (nothing is downloaded): prefill cost, KV bytes
and memory depend on the shapes and on the presets' fixed fractions (tier fractions, propagation
schedule), not on the weight values, so this tells what a 7B/8B model costs without its
checkpoint. It says nothing about quality: fidelity needs real weights (``kvcomp bench``,
``bench/model_targets.py``).

    python bench/bench_prefill.py --shape llama3-8b --tokens 4096 16384 --device cuda \\
        --presets full quant-only default fast propagate-only --json runs/prefill.json

Per (prompt length, preset): the median of ``--repeats`` timed prefills after one warm-up (the
device is synchronised around each), ``x full`` = that time over ``full``'s in the same run, KV
bytes over an fp16 cache of the same tokens, the peak device memory the prefill added on top of
the weights (CUDA only), and greedy decode tokens/s over ``--decode-tokens`` steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig

from kvcore.config import CompressionConfig, preset_names
from kvcore.model import CompressedLlamaForCausalLM

# Public architecture hyper-parameters of the checkpoints these shapes stand for.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=18,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_model(shape: str, dtype: torch.dtype, device: torch.device) -> CompressedLlamaForCausalLM:
    """A randomly initialised model of ``shape`` built directly on ``device`` in ``dtype``."""
    config = LlamaConfig(**SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CompressedLlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model: CompressedLlamaForCausalLM, ids: torch.Tensor) -> Any:
    cache = model.new_cache() if model.compressor is not None else DynamicCache(config=model.config)
    return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)  # as generate() does


@torch.no_grad()
def measure(model: CompressedLlamaForCausalLM, preset: str, ids: torch.Tensor, repeats: int, decode_tokens: int) -> dict[str, Any]:
    """One preset on one prompt ``ids [1, N]``: times, bytes and memory (see module docstring)."""
    device = ids.device
    model.set_compression(CompressionConfig.from_preset(preset))
    _prefill(model, ids)  # warm-up: kernels compiled, allocator primed
    times = []
    weights_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        out = None
        _sync(device)
        start = time.perf_counter()
        out = _prefill(model, ids)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - weights_bytes if device.type == "cuda" else None
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    n = ids.shape[1]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    fp16_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * n * head_dim * 2
    if model.compressor is not None:
        kv_bytes = cache.kv_bytes
    else:
        kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    start = time.perf_counter()
    for step in range(decode_tokens):
        position = torch.tensor([[n + step]], device=device)
        step_out = model(input_ids=token, cache=cache, position_ids=position, use_cache=True)
        token = step_out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    decode_s = time.perf_counter() - start
    return {
        "preset": preset,
        "tokens": n,
        "prefill_s": statistics.median(times),
        "prefill_runs_s": times,
        "kv_bytes": kv_bytes,
        "kv_frac_fp16": kv_bytes / fp16_bytes,
        "peak_prefill_bytes": peak,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_tokens else None,
    }


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows; ``x full`` is relative to ``full`` at the same length (``-`` if not run)."""
    full = {r["tokens"]: r for r in rows if r["preset"] == "full"}
    lines = [
        "| tokens | preset | prefill s | x full | KV / fp16 | prefill peak GiB | decode tok/s | x full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = full.get(r["tokens"])
        ratio = f"{r['prefill_s'] / base['prefill_s']:.2f}" if base else "-"
        peak = f"{r['peak_prefill_bytes'] / 2**30:.2f}" if r["peak_prefill_bytes"] is not None else "n/a"
        dec = r["decode_tokens_per_s"]
        dec_s = f"{dec:.1f}" if dec else "-"
        dec_ratio = f"{dec / base['decode_tokens_per_s']:.2f}" if base and dec and base["decode_tokens_per_s"] else "-"
        lines.append(
            f"| {r['tokens']} | {r['preset']} | {r['prefill_s']:.3f} | {ratio} | {r['kv_frac_fp16']:.3f} | {peak} | "
            f"{dec_s} | {dec_ratio} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="prompt lengths")
    parser.add_argument("--presets", nargs="+", default=["full", "quant-only", "default", "fast", "propagate-only"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the machine here")
    args = parser.parse_args(argv)

    unknown = [p for p in args.presets if p not in preset_names()]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; presets: {', '.join(preset_names())}")
    if args.repeats < 1 or args.decode_tokens < 0 or min(args.tokens) < 2:
        parser.error("--repeats must be >= 1, --decode-tokens >= 0 and every --tokens >= 2")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available here")
    limit = SHAPES[args.shape]["max_position_embeddings"]
    too_long = [t for t in args.tokens if t + args.decode_tokens > limit]
    if too_long:
        parser.error(f"--tokens {too_long} plus {args.decode_tokens} decode tokens exceed {args.shape}'s {limit} positions")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    torch.manual_seed(args.seed)
    model = build_model(args.shape, dtype, device)
    machine = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": args.shape,
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(machine), file=sys.stderr)
    rows = []
    for n in args.tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        for preset in args.presets:
            row = measure(model, preset, ids, args.repeats, args.decode_tokens)
            rows.append(row)
            print(f"{n} {preset}: prefill {row['prefill_s']:.3f} s, KV {row['kv_frac_fp16']:.3f}", file=sys.stderr)
    print("\n".join(table(rows)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
