"""``kvcomp lm-eval-tasks``: write offline LongBench task YAMLs for lm-eval (a ``kvcomp.commands`` plugin).

    kvcomp lm-eval-tasks --data-dir data/longbench --task multi_news

writes into ``--out`` (default: ``lm_eval_tasks`` in the kvcomp cache directory, never the current
folder, so a run inside a clone leaves no untracked files) and prints the ``--include_path`` and ``--tasks`` values to hand to ``lm_eval``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from kvcore.hookspecs import hookimpl


def cmd_lm_eval_tasks(args: argparse.Namespace) -> int:
    from kvcomp_lm_eval.tasks import write_local_longbench_tasks

    from kvcore.loading import cache_dir

    out = args.out if args.out is not None else cache_dir() / "lm_eval_tasks"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    names = write_local_longbench_tasks(args.data_dir, out, tasks=args.task or None)
    include = str(Path(out).expanduser().resolve())
    if args.json:
        print(json.dumps({"include_path": include, "tasks": names}))
        return 0
    print(f"include_path: {include}")
    print(f"tasks: {','.join(names)}")
    print(
        f"\nlm_eval --model kvcomp-llama --model_args pretrained=smollm2-135m,preset=default "
        f"--include_path {include} --tasks {','.join(names)}",
        file=sys.stderr,
    )
    return 0


@hookimpl
def register_commands(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``lm-eval-tasks``."""
    p = add_command(
        "lm-eval-tasks",
        "write lm-eval task YAMLs that read local LongBench JSONL files (offline LongBench)",
        cmd_lm_eval_tasks,
    )
    p.add_argument("--data-dir", type=Path, required=True, help="folder of LongBench <task>.jsonl files")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder to write the task YAMLs into (lm-eval's --include_path; default: lm_eval_tasks in the kvcomp "
        "cache directory, $KVCOMP_CACHE_DIR or ~/.cache/kvcomp)",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME",
        help="LongBench task, e.g. multi_news (repeatable; default: every task with a JSONL file in --data-dir)",
    )
    p.add_argument("--json", action="store_true", help="print {include_path, tasks} as JSON")
