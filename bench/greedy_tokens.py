"""Greedy tokens of the presets on real prompts, to compare two versions of the decode path.

Writes ``{preset: [[32 token ids] per prompt]}`` for 10 LongBench multi_news prompts cut to ~1k
tokens with the question as prompt window; EOS does not stop decoding. Run it once on each
checkout and compare the files with ``--compare``::

    git worktree add /tmp/old v0.1.0          # any older commit
    .venv/bin/python bench/greedy_tokens.py --checkout /tmp/old --out old.json
    .venv/bin/python bench/greedy_tokens.py --out new.json
    .venv/bin/python bench/greedy_tokens.py --compare old.json new.json

``--checkout`` runs the older code on this venv: its folders go first on ``sys.path`` and the
editable install's import finder (which would otherwise win over ``PYTHONPATH``) is removed; if
that code reads plugins from an entry-point group this install no longer declares, the built-in
plugin modules are registered by hand below.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench" / "multi_news.jsonl"
QUESTION = "\n\nNow, write a one-page summary of all the news above.\nSummary:"


def use_checkout(root: Path) -> None:
    """Import ``kvcore`` and the plugins from the checkout at ``root`` instead of this install."""
    if not (root / "kvcore" / "__init__.py").is_file():
        raise SystemExit(f"--checkout {root}: no kvcore/ package there; give the root folder of a kvcomp checkout")
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    sys.path[:0] = [str(root), str(root / "plugins"), str(root / "integrations")]


def _register_builtin_plugins() -> None:
    import kvcore.plugins as plugins
    import kvcomp_plugins.propagators
    import kvcomp_plugins.quantizers
    import kvcomp_plugins.scorers

    pm = plugins.get_plugin_manager()
    loaded = {getattr(p, "__name__", "") for p in pm.get_plugins()}
    for module in (kvcomp_plugins.scorers, kvcomp_plugins.quantizers, kvcomp_plugins.propagators):
        if module.__name__ not in loaded:
            pm.register(module, name=module.__name__.rsplit(".", 1)[-1])


def greedy(presets: list[str], n_prompts: int, tokens: int, prompt_tokens: int) -> dict[str, list[list[int]]]:
    import torch

    _register_builtin_plugins()
    from kvcore.config import CompressionConfig
    from kvcore.loading import load_model, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m")
    model, tok = load_model(path), load_tokenizer(path)
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()][:n_prompts]
    question = tok(QUESTION, add_special_tokens=False)["input_ids"]
    result: dict[str, list[list[int]]] = {}
    for preset in presets:
        model.set_compression(CompressionConfig.from_preset(preset))
        outs = []
        for row in rows:
            body = tok(row["context"], add_special_tokens=False)["input_ids"][: prompt_tokens - len(question)]
            ids = torch.tensor([body + question])
            window = torch.arange(len(body), len(body) + len(question))
            with torch.no_grad():
                out = model(input_ids=ids, cache=model.new_cache(window), use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                ids_out = [int(token)]
                for _ in range(tokens - 1):
                    out = model(input_ids=token, cache=out.cache, use_cache=True)
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    ids_out.append(int(token))
            outs.append(ids_out)
        result[preset] = outs
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"))
    parser.add_argument("--presets", nargs="+", default=["lossless8", "default"])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--checkout", type=Path, help="root of an older kvcomp checkout whose code should run")
    args = parser.parse_args(argv)
    if args.checkout is not None:
        use_checkout(args.checkout.resolve())
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        for preset in a:
            same = sum(x == y for x, y in zip(a[preset], b[preset]))
            print(f"{preset}: {same}/{len(a[preset])} prompts with identical greedy tokens")
        return 0
    if args.out is None:
        parser.error("give --out FILE (or --compare A B)")
    if not DATA.is_file():
        parser.error(f"{DATA} is missing: these prompts come from the shared LongBench data")
    args.out.write_text(json.dumps(greedy(args.presets, args.prompts, args.tokens, args.prompt_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
