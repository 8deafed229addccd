"""What the stored token positions cost: KV bytes with the cache's int16 positions and with int32.

Usage::

    python bench/position_bytes.py [--presets tiny,default,compact,hifi] [--lengths 500,2000]

Runs each preset on one built-in passkey prompt per length (seed 3, fact at half depth), greedily
generates 12 tokens, and prints the cache's bytes over an fp16 cache of the same tokens, the
bytes the same tiers would take with int32 positions, and the share int16 positions save.
Presets may also be config files (``.yaml``/``.json``, named by their stem).
"""

from __future__ import annotations

import argparse

import torch

from bench_decode import resolve_configs
from kvcore.pipeline import KVCompPipeline
from kvcomp_eval.data.probes import build_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,default,compact,hifi")
    parser.add_argument("--lengths", default="500,2000")
    args = parser.parse_args()
    try:  # presets and files checked before the model loads
        configs = resolve_configs(args.presets.split(","), baseline=False)
    except ValueError as exc:
        parser.error(str(exc))
    pipe = KVCompPipeline.from_pretrained(config="full")
    for name, config in configs.items():
        pipe.set_config(config)
        for length in (int(x) for x in args.lengths.split(",")):
            ex = build_probe("passkey", pipe.tokenizer, length, 0.5, index=0, seed=3)
            ids, window = pipe.encode(ex.prompt, ex.question_span)
            n = ids.shape[1]
            with torch.no_grad():
                out = pipe.model(input_ids=ids, cache=pipe.model.new_cache(window), use_cache=True, logits_to_keep=1)
                for step in range(12):
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    out = pipe.model(input_ids=token, cache=out.cache, position_ids=torch.tensor([[n + step]]), use_cache=True)
            cache = out.cache
            tiers = [t for i in range(len(cache.layers)) for t in (*cache.layer(i).compressed.tiers, *cache.layer(i).flushed)]
            wide = cache.kv_bytes + sum(t.positions.numel() * (4 - t.positions.element_size()) for t in tiers)
            full = cache.kv_bytes_fp16_full()
            print(
                f"{name:>10} {n:5d} tokens: KV/fp16 {cache.kv_bytes / full:.4f}, with int32 positions "
                f"{wide / full:.4f} (int16 saves {1 - cache.kv_bytes / wide:.1%})"
            )


if __name__ == "__main__":
    main()
