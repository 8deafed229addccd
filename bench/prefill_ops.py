"""Torch ops per prefill layer, by the function that issued them: what a GPU prefill launches.

On a GPU every small torch op of the compression path is a kernel launch (microseconds of host
time, and a few of device time however small its tensors), so their count is what the
per-layer cost of compression scales with at short prompts. This script counts them without a
GPU: one prefill of a random Llama of ``bench_prefill.py``'s ``tiny`` shape per config, through the quantizer backend a GPU
uses (``triton``, run by Triton's interpreter on a CPU, or ``torch``) and without the CPU's C
kernels (``KVCOMP_NATIVE=0``, so the scorer runs the torch ops a GPU runs), under a torch dispatch
mode that records every op except views and the interpreter's own copies. Triton kernel
launches are not torch ops and are not counted.

    .venv/bin/python bench/prefill_ops.py --configs default fast --layers 20 --tokens 256
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
os.environ.setdefault("KVCOMP_NATIVE", "0")  # no C kernels, as on a GPU: the scorer runs its torch ops

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from bench_prefill import SHAPES  # noqa: E402
from kvcore.config import CompressionConfig  # noqa: E402
from kvcore.model import CompressedLlamaForCausalLM  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[1]) + os.sep
VIEWS = {"view", "_unsafe_view", "as_strided", "slice", "select", "unsqueeze", "squeeze", "transpose", "t", "expand",
         "permute", "alias", "detach", "empty", "empty_strided", "_reshape_alias", "unbind", "split", "split_with_sizes",
         "lift_fresh"}
"""Ops that launch no kernel (views, allocations)."""


class CountOps(TorchDispatchMode):
    """Non-view ops by op name and by the innermost function of this repository that issued them."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: collections.Counter[str] = collections.Counter()
        self.by_caller: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.__name__.split(".")[0]
        if name not in VIEWS:
            stack = traceback.extract_stack()
            if not any("triton" + os.sep in f.filename for f in stack):  # the interpreter's own copies
                ours = [f for f in stack if f.filename.startswith(ROOT) and "site-packages" not in f.filename
                        and not f.filename.endswith("prefill_ops.py")]
                self.by_op[name] += 1
                self.by_caller[f"{ours[-1].filename[len(ROOT):]}:{ours[-1].name}" if ours else "(elsewhere)"] += 1
        return func(*args, **(kwargs or {}))


def count(config: CompressionConfig, layers: int, tokens: int) -> CountOps:
    """Ops of one prefill (after a warm-up one) of the ``tiny`` shape with ``layers`` layers."""
    torch.manual_seed(0)
    shape = {**SHAPES["tiny"], "num_hidden_layers": layers,
             "max_position_embeddings": max(SHAPES["tiny"]["max_position_embeddings"], tokens)}
    model = CompressedLlamaForCausalLM(LlamaConfig(**shape)).eval()
    model.set_compression(config)
    ids = torch.randint(0, shape["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(1))
    window = torch.arange(tokens - 16, tokens)
    with torch.no_grad():
        model(input_ids=ids, cache=model.new_cache(window), use_cache=True, logits_to_keep=1)
        with CountOps() as ops:
            model(input_ids=ids, cache=model.new_cache(window), use_cache=True, logits_to_keep=1)
    return ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["default"], help="preset names or .yaml/.json config files")
    parser.add_argument("--backend", choices=["triton", "torch"], default="triton",
                        help="the quantizer backend (default: triton, the one a GPU runs)")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=256, help="prompt tokens (>= 32)")
    parser.add_argument("--top", type=int, default=12, help="callers and ops listed per config")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.tokens < 32:
        parser.error("--layers must be >= 1 and --tokens >= 32")
    for name in args.configs:
        config = CompressionConfig.from_file(name) if Path(name).suffix in (".yaml", ".yml", ".json") \
            else CompressionConfig.from_preset(name)
        if config.is_uncompressed:
            parser.error(f"{name!r} compresses nothing; give a compressing config")
        if config.to_dict()["quantizer"]["name"] == "mixed_precision":
            config = config.with_overrides({"quantizer.backend": args.backend})
        ops = count(config, args.layers, args.tokens)
        per = args.layers
        print(f"## {name}: {sum(ops.by_op.values()) / per:.1f} non-view torch ops per layer "
              f"({args.layers} layers, {args.tokens} tokens, {args.backend} quantizer backend); "
              f"sorts per layer {(ops.by_op['sort'] + ops.by_op['topk']) / per:.2f}")
        for caller, n in ops.by_caller.most_common(args.top):
            print(f"{n / per:7.2f}  {caller}")
        print("   ops: " + ", ".join(f"{op} {n / per:.2f}" for op, n in ops.by_op.most_common(args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
