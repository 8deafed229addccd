"""``kvcomp bench``, ``kvcomp bench report``, ``kvcomp run`` and ``kvcomp ablate``.

Registered through the ``kvcomp.commands`` entry point ``eval`` (hook ``register_commands``),
like any third-party command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from kvcore.cli import UsageError, add_config_arguments, config_from_args
from kvcore.config import CompressionConfig, preset_names
from kvcore.hookspecs import hookimpl

if TYPE_CHECKING:  # the handlers import it when they run, not at every kvcomp start-up
    from kvcomp_eval.runs.benchmark import CompressionBenchmark

SUITE_HELP = (
    "passkey | multi_needle | multi_value | variable_tracking | longbench (the 13 LongBench-E tasks) | "
    "longbench:TASK[,TASK...]"
)


# -- argument helpers -------------------------------------------------------------------------------
class _ConfigSource(argparse.Action):
    """``--preset``/``--config`` append ``(kind, value)`` to one list, keeping their order."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest) or [])
        items.append(("preset" if option_string == "--preset" else "file", values))
        setattr(namespace, self.dest, items)


def _csv(kind: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        from kvcomp_eval.runs.suite import parse_number_list

        try:
            return parse_number_list(text, kind, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_suite_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("suite")
    g.add_argument("--suite", help=SUITE_HELP)
    g.add_argument("--lengths", type=_csv(int, "--lengths"), help="probe prompt lengths in tokens, e.g. 500,1000 (default 500,1000)")
    g.add_argument("--depths", type=_csv(float, "--depths"), help="probe fact depths in [0,1], e.g. 0.1,0.5,0.9 (default)")
    g.add_argument("--n-per-cell", type=_positive_int, help="probe examples per (length, depth) (default: enough for --limit, else 1)")
    g.add_argument("--seed", type=int, default=0, help="probe content seed (default 0)")
    g.add_argument("--limit", type=_positive_int, help="probes: examples in all; LongBench: examples per task")
    g.add_argument("--offset", type=int, default=0, help="skip this many examples first (probes: of the sweep; LongBench: per task)")
    g.add_argument("--data-dir", type=Path, help="folder of LongBench <task>.jsonl files (default: the hub, THUDM/LongBench)")
    g.add_argument("--longbench-e", action="store_true", help="read the LongBench-E split (<task>_e.jsonl)")
    g.add_argument("--max-prompt-tokens", type=_positive_int, help="LongBench: cut longer prompts in the middle (default: the model's limit)")
    g.add_argument("--min-prompt-tokens", type=_positive_int,
                   help="LongBench: skip rows whose prompt is shorter (--limit counts the rows kept)")
    g.add_argument("--haystack-dir", type=Path, help="folder of *.txt filler for the probes (default: built-in filler)")
    r = p.add_argument_group("run")
    r.add_argument("--model", default="smollm2-135m", help="model preset, folder, .gguf file or hub id (default: smollm2-135m)")
    r.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    r.add_argument("--max-new-tokens", type=_positive_int, help="cap on generated tokens (default: the probe's or task's own)")
    r.add_argument("--kl-steps", type=_positive_int, default=8, help="teacher-forced positions of the KL to full (default 8)")
    r.add_argument("--no-question-span", action="store_true", help="do not tell the scorer where the question is (it uses the last W tokens)")
    r.add_argument("--out", type=Path, help="folder for results.jsonl, run.json, summary.md and plots (required)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed when it came through the ``kvcomp`` script; else an equivalent one
    rebuilt from the parsed arguments (``main([...])`` called from Python)."""
    if Path(sys.argv[0]).name in ("kvcomp", "cli.py") and sys.argv[1:2] == args._command_words[:1]:
        return shlex.join(["kvcomp", *sys.argv[1:]])
    parser: argparse.ArgumentParser = args._parser
    words = ["kvcomp", *args._command_words]
    for kind, value in getattr(args, "config_sources", None) or []:
        words += ["--preset" if kind == "preset" else "--config", str(value)]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "config_sources"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default or value is False or value == []:
            continue
        flag = action.option_strings[-1]
        if value is True:
            words.append(flag)
        elif isinstance(value, list) and action.dest in ("set", "peers"):
            for item in value:
                words += [flag, str(item)]
        elif isinstance(value, list):
            words += [flag, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _suite_from_args(args: argparse.Namespace) -> Any:
    from kvcomp_eval.runs.suite import BenchSuite

    if not args.suite:
        raise UsageError(f"--suite is required: {SUITE_HELP}")
    if args.out is None:
        raise UsageError("--out DIR is required (results, run.json, summary.md and plots go there)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    if args.offset < 0:
        raise UsageError(f"--offset must be >= 0, got {args.offset}")
    from kvcore.loading import check_device

    check_device(args.device)  # before any prompt is built or model loaded
    return BenchSuite.parse(
        args.suite,
        lengths=args.lengths,
        depths=args.depths,
        n_per_cell=args.n_per_cell,
        seed=args.seed,
        limit=args.limit,
        offset=args.offset,
        data_dir=args.data_dir,
        longbench_e=args.longbench_e or None,
        max_prompt_tokens=args.max_prompt_tokens,
        min_prompt_tokens=args.min_prompt_tokens,
        haystack_dir=args.haystack_dir,
    )


def _bench_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "use_question_span": not args.no_question_span,
        "kl_steps": args.kl_steps,
        "command": _command_line(args),
        "device": args.device,
        "progress": not args.no_progress,
    }


def _finish(bench: CompressionBenchmark) -> int:
    """Run ``bench``, print its summary table, and on stderr what was written."""
    outcome = bench.run()
    print(outcome.summary.read_text(encoding="utf-8").split("\nColumns:")[0].rstrip())
    print(
        f"\n{bench.log_prefix}: {outcome.written} rows written, {outcome.skipped} found from earlier runs; "
        f"report: {outcome.summary} (+ {len(outcome.plots)} plots)",
        file=sys.stderr,
    )
    return 0


# -- handlers ---------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from kvcomp_eval.peers.methods import PeersUnavailable, parse_peer_spec
    from kvcomp_eval.runs.benchmark import CompressionBenchmark

    suite = _suite_from_args(args)
    peers = [parse_peer_spec(spec) for spec in args.peers or ()]  # a bad spec is a ValueError naming it
    sources = args.config_sources or []
    if not sources and not peers:
        raise UsageError(
            f"give at least one --preset NAME, --config FILE or --peer SPEC (presets: {', '.join(preset_names())})"
        )
    configs: dict[str, CompressionConfig] = {}
    for kind, value in sources:
        if kind == "preset":
            name, cfg = value, CompressionConfig.from_preset(value)
        else:
            name, cfg = Path(value).stem, CompressionConfig.from_file(value)
        if name in configs:
            raise UsageError(f"two configs are named {name!r}; config files are named by their file stem")
        configs[name] = cfg
    bench = CompressionBenchmark(
        configs, suite, args.out, peers=peers, peer_threads=args.peer_threads, **_bench_kwargs(args)
    )
    try:
        return _finish(bench)
    except PeersUnavailable as exc:
        raise UsageError(f"--peer: {exc}") from exc


def cmd_bench_report(args: argparse.Namespace) -> int:
    from kvcomp_eval.runs.report import write_report

    files = write_report(args.dir)
    print(files[0].read_text(encoding="utf-8").split("\nColumns:")[0].rstrip())
    print(f"\nkvcomp bench: wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def _named_config(args: argparse.Namespace) -> tuple[str, CompressionConfig]:
    config = config_from_args(args)
    name = args.name or (Path(args.config).stem if args.config else (args.preset or "default"))
    if args.set and not args.name:
        name += "[" + ",".join(args.set) + "]"
    return name, config


def cmd_run(args: argparse.Namespace) -> int:
    from kvcomp_eval.runs.benchmark import CompressionBenchmark

    suite = _suite_from_args(args)
    name, config = _named_config(args)
    bench = CompressionBenchmark({name: config}, suite, args.out, experiment="run", **_bench_kwargs(args))
    return _finish(bench)


def cmd_ablate(args: argparse.Namespace) -> int:
    from kvcomp_eval.runs.benchmark import CompressionBenchmark
    from kvcomp_eval.runs.experiments import derive_ablation_variants
    from kvcomp_eval.runs.store import REFERENCE

    suite = _suite_from_args(args)
    base_name, base = _named_config(args)
    if base.is_uncompressed:
        raise UsageError(f"the base config {base_name!r} compresses nothing; ablations need a compressing base")
    if base.weights != "none":
        raise UsageError("ablations switch configs on one model; use a base with weights: none")
    kwargs = _bench_kwargs(args)
    # Check everything that needs no model first, so bad input costs nothing.
    probe = CompressionBenchmark({base_name: base}, suite, args.out, experiment="ablate", **kwargs)
    probe.check()
    examples = probe.examples()
    calib = sorted(examples, key=lambda e: e.prompt_tokens)[len(examples) // 2]
    pipe = probe.pipeline("none")
    print(f"kvcomp ablate: matching KV bytes on {calib.example_id} ({calib.prompt_tokens} tokens) ...", file=sys.stderr)

    def measure(cfg: CompressionConfig) -> int:
        pipe.set_config(cfg)
        return int(pipe.generate(calib.prompt, question_span=calib.question_span, max_new_tokens=1).kv_bytes)

    full = CompressionConfig.from_preset(REFERENCE)
    variants = derive_ablation_variants(base_name, base, measure, known={REFERENCE: full, base_name: base})
    configs: dict[str, CompressionConfig] = {REFERENCE: full, base_name: base}
    configs.update({v.name: v.config for v in variants if v.config is not None and v.same_as is None})
    notes = [f"ablation of `{base_name}`; equal KV bytes matched on {calib.example_id} ({calib.prompt_tokens} prompt tokens)"]
    bench = CompressionBenchmark(
        configs, suite, args.out, experiment="ablate", pipeline=pipe, notes=notes,
        variants={v.name: v.describe() for v in variants}, **kwargs,
    )
    return _finish(bench)


# -- registration -----------------------------------------------------------------------------------
@hookimpl
def register_commands(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``bench`` (with ``bench report``), ``run`` and ``ablate``."""
    p = add_command(
        "bench",
        "benchmark configs on probes or LongBench side by side with the uncompressed model (resumable)",
        cmd_bench,
    )
    p.add_argument("--preset", dest="config_sources", action=_ConfigSource, metavar="NAME",
                   help=f"a shipped preset (repeatable): {', '.join(preset_names())}")
    p.add_argument("--config", dest="config_sources", action=_ConfigSource, metavar="FILE",
                   help="a YAML/JSON config file, named by its stem (repeatable)")
    p.add_argument("--peer", dest="peers", action="append", metavar="SPEC",
                   help="a peer on the same prompts, in the peers' environment (`make peers-venv`; repeatable): "
                        "PRESS[+question]:RATIO with PRESS in snapkv, streaming_llm, expected_attention, knorm, tova "
                        "(tova:0.5); quanto:BITS or hqq:BITS (hqq:4); full")
    p.add_argument("--peer-threads", type=_positive_int, help="torch threads of the peers' process (default: torch's)")
    _add_suite_arguments(p)
    sub = p.add_subparsers(dest="bench_command", metavar="report")
    sub.required = False
    p.set_defaults(_parser=p, _command_words=["bench"])
    r = add_command("report", "rebuild summary.md and the plots of a bench folder from its results.jsonl", cmd_bench_report, sub)
    r.add_argument("dir", type=Path, help="the folder given to --out")

    for name, help_text, handler in (
        ("run", "the main experiment: one config vs the uncompressed model on a suite, from config to report", cmd_run),
        ("ablate", "ablations of a config (each scorer term alone, eviction only and uniform precision at equal "
                   "bytes, no propagation, random scores) side by side", cmd_ablate),
    ):
        q = add_command(name, help_text, handler)
        add_config_arguments(q)
        q.add_argument("--name", help="name of the config in the results (default: the preset or file stem)")
        _add_suite_arguments(q)
        q.set_defaults(_parser=q, _command_words=[name])
