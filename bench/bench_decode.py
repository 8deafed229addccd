"""Time to first token and decode speed: kvcomp presets against plain transformers, same weights.

Every config runs in this one process on the same prompts, in alternation (``full``, ``default``,
..., then again), and the best of ``--repeats`` counts, so load from elsewhere on the machine hits
all configs alike; ratios are against ``full`` measured in the same run.

- ``transformers`` is stock ``LlamaForCausalLM.forward`` with SDPA attention and a
  ``DynamicCache``, on the very same model object (the same weights): the baseline that kvcomp's
  own uncompressed path (``full``) has to match.
- TTFT = prompt forward (compression included) + the first greedy token; decode = ``--decode-tokens``
  greedy steps on the cache the prompt left (EOS does not stop them, so every config decodes
  the same number of tokens).

Embedded model, real text (LongBench multi_news rows from ``../shared/data`` when present, else
the demo's generated text)::

    .venv/bin/python bench/bench_decode.py --lengths 1000 2000 4000 --repeats 3

A config file (YAML/JSON, named by its stem in the table) times like a preset::

    .venv/bin/python bench/bench_decode.py --lengths 4000 --decode-tokens 1 --configs full fast my_fast.yaml

Random weights of a real shape on a GPU (batch 1 and 8)::

    python bench/bench_decode.py --shape llama3-8b --device cuda --lengths 4096 32768 --batch 1 8

``--profile FILE`` then runs each config once more at the last length and batch, its prefill and
its decode steps each under ``torch.profiler`` (CPU and CUDA), and writes their op tables (on CUDA
also sorted by kernel time, which names the Triton kernels) with wall time, kernel time and kernel
launches of the prefill and per decode step. ``--no-cudnn-attention`` keeps SDPA off cuDNN (see the flag's help).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaForCausalLM

from kvcore.config import ComponentError, CompressionConfig, ConfigError, preset_names
from kvcore.model import ATTN_IMPLEMENTATION, CompressedLlamaForCausalLM

BASELINE = "transformers"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench" / "multi_news.jsonl"
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
QUESTION = "\n\nNow, write a one-page summary of all the news above.\nSummary:"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_text_prompts(tokenizer: Any, lengths: list[int], data: Path | None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per length, ``input_ids [1, n]`` (context cut to fit, then the question) and the question's
    token indices (the prompt window)."""
    if data is not None and data.is_file():
        contexts = [json.loads(line)["context"] for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
        text = "\n".join(contexts)
    else:
        from kvcore.demo import build_prompt

        text = build_prompt(4 * max(lengths)).text
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = {}
    for n in lengths:
        if len(body) + len(question) < n:
            raise SystemExit(f"the text has only {len(body)} tokens; --lengths {n} cannot be built from it")
        ids = body[: n - len(question)] + question
        window = torch.arange(n - len(question), n)
        prompts[n] = (torch.tensor([ids]), window)
    return prompts


def random_prompts(vocab: int, lengths: list[int], seed: int) -> dict[int, tuple[torch.Tensor, None]]:
    gen = torch.Generator().manual_seed(seed)
    return {n: (torch.randint(0, vocab, (1, n), generator=gen), None) for n in lengths}


def resolve_configs(names: list[str], *, baseline: bool = True) -> dict[str, CompressionConfig | None]:
    """``--configs`` as ``{table name: config}``: ``transformers`` (``None``), a preset name, or a
    YAML/JSON file named by its stem. Raises ``ValueError`` naming what is neither, and naming
    ``transformers`` where ``baseline`` is false (scripts that need a compression config)."""
    out: dict[str, CompressionConfig | None] = {}
    unknown = []
    for name in names:
        path = Path(name)
        if name == BASELINE:
            if not baseline:
                raise ValueError(f"{BASELINE!r} (stock transformers) has no compression config here; name presets or config files")
            key, config = name, None
        elif name in preset_names():
            key, config = name, CompressionConfig.from_preset(name)
        elif path.suffix in (".yaml", ".yml", ".json") and path.is_file():
            try:
                key, config = path.stem, CompressionConfig.from_file(path)
                config.validate_components()  # a bad parameter fails here, not after the model loads
            except (ConfigError, ComponentError) as exc:
                raise ValueError(f"config file {name}: {exc}") from exc
        else:
            unknown.append(name)
            continue
        if key in out:
            raise ValueError(f"two configs are named {key!r}; rename one file")
        out[key] = config
    if unknown:
        raise ValueError(
            f"unknown config(s) {unknown}; use {f'{BASELINE!r}, ' if baseline else ''}a preset ({', '.join(preset_names())}) "
            "or a .yaml/.json config file"
        )
    return out


@torch.no_grad()
def run_once(
    model: CompressedLlamaForCausalLM,
    config: CompressionConfig | None,
    ids: torch.Tensor,
    window: torch.Tensor | None,
    decode_tokens: int,
    decode_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    prefill_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """One prompt through one config (``None``: stock transformers): TTFT, decode time, KV bytes
    and the greedy tokens. The prompt's forward and first token run inside ``prefill_context()``,
    the decode steps inside ``decode_context()`` (a profiler, say)."""
    device = ids.device
    stock = config is None
    model.set_compression(CompressionConfig() if stock else config)
    if stock:
        model.set_attn_implementation("sdpa")
    try:
        def forward(**kwargs: Any) -> Any:
            return LlamaForCausalLM.forward(model, **kwargs) if stock else model(**kwargs)

        cache: Any = model.new_cache(window) if model.compressor is not None else DynamicCache(config=model.config)
        _sync(device)
        with prefill_context():
            start = time.perf_counter()
            out = forward(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            ttft = time.perf_counter() - start
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        tokens = [token]
        with decode_context():
            start = time.perf_counter()
            for _ in range(decode_tokens):
                out = forward(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
            _sync(device)
            decode_s = time.perf_counter() - start
    finally:
        if stock:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
    kv_bytes = cache.kv_bytes if hasattr(cache, "kv_bytes") else sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
    return {"ttft_s": ttft, "decode_s": decode_s, "kv_bytes": kv_bytes, "tokens": torch.cat(tokens, dim=1)[0].tolist()}


def measure(model, configs: dict[str, CompressionConfig | None], prompts, batches, repeats, decode_tokens) -> list[dict[str, Any]]:
    """Alternate the configs (name -> config, see :func:`resolve_configs`) ``repeats`` times per
    (length, batch); keep each config's best run."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rows = []
    for n, (ids, window) in prompts.items():
        for batch in batches:
            batch_ids = ids.expand(batch, -1).contiguous().to(next(model.parameters()).device)
            best: dict[str, dict[str, Any]] = {}
            # Warm-up, not timed. On a GPU it decodes as long as the timed runs: a kernel variant is
            # compiled on first use, and a decode-time flush (a new tier) comes only after some steps.
            warm = decode_tokens if batch_ids.device.type == "cuda" else min(decode_tokens, 2)
            for config in configs:
                run_once(model, configs[config], batch_ids, window, warm)
            for rep in range(repeats):
                for config in configs:
                    got = run_once(model, configs[config], batch_ids, window, decode_tokens)
                    prev = best.get(config)
                    if prev is None:
                        best[config] = {**got, "ttft_runs_s": [got["ttft_s"]], "decode_runs_s": [got["decode_s"]]}
                    else:
                        prev["ttft_runs_s"].append(got["ttft_s"])
                        prev["decode_runs_s"].append(got["decode_s"])
                        prev["ttft_s"] = min(prev["ttft_s"], got["ttft_s"])
                        prev["decode_s"] = min(prev["decode_s"], got["decode_s"])
                    print(f"{n} tokens x{batch} rep {rep + 1} {config}: TTFT {got['ttft_s']:.3f} s, "
                          f"decode {decode_tokens / got['decode_s']:.2f} tok/s", file=sys.stderr)
            fp16 = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * batch * n * head_dim * 2
            reference = best.get("full", {}).get("tokens")
            for config in configs:
                r = best[config]
                rows.append({
                    "tokens": n, "batch": batch, "config": config,
                    "ttft_s": r["ttft_s"], "ttft_runs_s": r["ttft_runs_s"],
                    "decode_tokens_per_s": batch * decode_tokens / r["decode_s"] if decode_tokens else None,
                    "decode_runs_s": r["decode_runs_s"],
                    "kv_frac_fp16": r["kv_bytes"] / fp16,
                    "same_tokens_as_full": r["tokens"] == reference if reference is not None else None,
                })
    return rows


def profile_configs(model, configs: dict[str, CompressionConfig | None], ids: torch.Tensor, window: torch.Tensor | None,
                    decode_tokens: int, path: Path) -> list[str]:
    """Each config's prefill and decode steps once more, each under its own ``torch.profiler``;
    writes their op tables to ``path`` (on CUDA a second table per phase, sorted by kernel time,
    names the kernels, Triton's included) and returns one line per config: wall time, device time
    and kernel launches of the prefill and of a decode step. Wall time far above device time means
    the phase is bound by the host (launches, planning, syncs), not by the device."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sections, summary = [], []
    for name, config in configs.items():
        run_once(model, config, ids, window, 1)  # warm-up
        prefill, decode = profile(activities=activities), profile(activities=activities)
        got = run_once(model, config, ids, window, decode_tokens, decode_context=lambda: decode,
                       prefill_context=lambda: prefill)
        line = []
        for phase, prof, wall_s, steps in (("prefill", prefill, got["ttft_s"], 1),
                                           ("decode", decode, got["decode_s"], decode_tokens)):
            events = prof.key_averages()
            device_ms, launches = _device_ms(events, cuda), sum(e.count for e in events if e.key in LAUNCH_CALLS)
            per = "per decode step " if phase == "decode" else "prefill "
            line.append(f"{per}{1000 * wall_s / steps:.2f} ms wall (profiled), {device_ms / steps:.2f} ms device, "
                        f"{launches / steps:.0f} kernel launches")
            head = f"## {name} {phase} ({ids.shape[1]} tokens, batch {ids.shape[0]}" + (
                f", {steps} decode steps)" if phase == "decode" else ")")
            sections.append(head + ", by host time\n" + events.table(sort_by="self_cpu_time_total", row_limit=30))
            if cuda:
                sections.append(head + ", by kernel time\n" + events.table(sort_by="self_device_time_total", row_limit=30))
        summary.append(f"{name}: " + "; ".join(line))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(summary) + "\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    return summary


def _device_ms(events: Any, cuda: bool) -> float:
    """Kernel time (ms) of a profile's averaged events: kernels only, as the table's "Self CUDA
    time total" (ops report their kernels' time too); NaN without CUDA."""
    from torch.autograd import DeviceType

    if not cuda:
        return float("nan")
    return sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1000


def paired_ttft(row: dict[str, Any], full: dict[str, Any]) -> tuple[float, int]:
    """Median of ``row``'s TTFT over ``full``'s in the same alternation, and in how many
    alternations it was at most ``full``'s. On a shared machine the best-of ratio can ride on one
    lucky run; the pairs say whether the difference holds run after run."""
    ratios = sorted(a / b for a, b in zip(row["ttft_runs_s"], full["ttft_runs_s"]))
    return statistics.median(ratios), sum(r <= 1.0 for r in ratios)


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown; ratios are against ``full`` at the same length and batch (best against best, then
    the median of the per-alternation ratios and how many of them were <= 1)."""
    full = {(r["tokens"], r["batch"]): r for r in rows if r["config"] == "full"}
    lines = [
        "| tokens | batch | config | KV / fp16 | TTFT s | TTFT / full | TTFT / full, pairs (<= 1) | decode tok/s | decode / full "
        "| greedy = full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = full.get((r["tokens"], r["batch"]))
        kv = "-" if r["config"] in ("full", BASELINE) else f"{r['kv_frac_fp16']:.3f}"
        ttft_ratio = f"{r['ttft_s'] / base['ttft_s']:.2f}" if base else "-"
        pairs = "-"
        if base:
            median, at_most = paired_ttft(r, base)
            pairs = f"{median:.2f} ({at_most}/{len(r['ttft_runs_s'])})"
        dec = r["decode_tokens_per_s"]
        dec_ratio = f"{dec / base['decode_tokens_per_s']:.2f}" if base and dec else "-"
        same = {True: "yes", False: "no", None: "-"}[r["same_tokens_as_full"]]
        lines.append(f"| {r['tokens']} | {r['batch']} | {r['config']} | {kv} | {r['ttft_s']:.3f} | {ttft_ratio} | {pairs} | "
                     f"{dec:.2f} | {dec_ratio} | {same} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model preset, folder or .gguf (real weights)")
    parser.add_argument("--shape", default=None, help="random weights of this shape instead (see bench_prefill.py)")
    parser.add_argument("--configs", nargs="+", default=[BASELINE, "full", "default", "fast", "lossless8"],
                        help=f"{BASELINE!r}, preset names or .yaml/.json config files (named by their stem)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000], help="prompt tokens")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LongBench JSONL whose contexts make the prompts")
    parser.add_argument("--json", type=Path, default=None, help="also write rows and machine here")
    parser.add_argument("--profile", type=Path, default=None,
                        help="then profile each config once at the last length and batch; op tables go here")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="keep torch's SDPA off its cuDNN backend (CUDA): a profile on torch 2.11 (2026-11-26) "
                             "saw it plan anew for every KV length, ~2 ms of host time per decode call; the "
                             "flag makes the baselines' decode independent of that")
    args = parser.parse_args(argv)

    try:
        configs = resolve_configs(args.configs)
    except ValueError as exc:
        parser.error(str(exc))
    if "full" not in configs:
        parser.error("--configs must include 'full': every ratio is against it")
    if args.repeats < 1 or args.decode_tokens < 1 or min(args.lengths) < 64 or min(args.batch) < 1:
        parser.error("--repeats, --decode-tokens and --batch must be >= 1 and every --lengths >= 64")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)

    if args.shape:
        from bench_prefill import SHAPES, build_model

        if args.shape not in SHAPES:
            parser.error(f"--shape {args.shape!r} is not one of {sorted(SHAPES)}")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        model = build_model(args.shape, dtype, device)
        prompts: dict[int, Any] = random_prompts(model.config.vocab_size, args.lengths, seed=0)
        source = f"random weights, {args.shape} shape"
    else:
        from kvcore.loading import load_model, load_tokenizer, resolve_model

        path = resolve_model(args.model)
        model = load_model(path, device=device)
        prompts = real_text_prompts(load_tokenizer(path), args.lengths, args.data)
        source = f"{args.model} weights, " + ("multi_news contexts" if args.data.is_file() else "generated text")
    machine = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "model": source,
        "cudnn_attention": torch.backends.cuda.cudnn_sdp_enabled(),
    }
    print(json.dumps(machine), file=sys.stderr)
    rows = measure(model, configs, prompts, args.batch, args.repeats, args.decode_tokens)
    print("\n".join(table(rows)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1, default=str))
    if args.profile:
        ids, window = prompts[args.lengths[-1]]
        ids = ids.expand(args.batch[-1], -1).contiguous().to(device)
        print("\n".join(profile_configs(model, configs, ids, window, min(args.decode_tokens, 8), args.profile)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
