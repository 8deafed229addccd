"""Wall time of ``kvcomp-llama``'s ``generate_until`` at ``--batch_size N`` against batch 1.

The requests are lm-eval's own: the task (default ``longbench_local_multi_news``, written from
``../shared/data/longbench`` by :func:`~kvcomp_lm_eval.tasks.write_local_longbench_tasks`) builds
its instances with ``--limit``; each request's ``max_gen_toks`` and ``until`` are then set from
the command line (multi_news asks for 512 tokens and has no stop string, which on a CPU means
minutes per document). Batch 1 and batch N run in this one process on the same loaded model,
alternating, best of ``--repeats``; the outputs of both must be identical.

    .venv/bin/python bench/bench_lm_eval_batch.py --limit 8 --batch 4 --max-gen-toks 64 --until . --repeats 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvcomp_lm_eval.model import KVCompLM
from kvcomp_lm_eval.tasks import write_local_longbench_tasks

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"


def build_requests(data_dir: Path, task: str, limit: int, max_gen_toks: int, until: list[str]) -> list[Any]:
    """lm-eval's ``generate_until`` instances of LongBench ``task`` (local files), first ``limit`` docs."""
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks_dir = Path(tempfile.mkdtemp(prefix="kvcomp_lm_eval_tasks_"))
    (name,) = write_local_longbench_tasks(data_dir, tasks_dir, tasks=[task])
    lm_task = get_task_dict([name], TaskManager(include_path=str(tasks_dir)))[name]
    lm_task.build_all_requests(limit=limit, rank=0, world_size=1)
    requests = list(lm_task.instances)
    for request in requests:
        context, gen_kwargs = request.arguments
        request.arguments = (context, {**gen_kwargs, "max_gen_toks": max_gen_toks, "until": until})
    return requests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--task", default="multi_news")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-gen-toks", type=int, default=64)
    parser.add_argument("--until", action="append", default=None, help="stop string (repeatable; default '.')")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    args = parser.parse_args(argv)
    if args.limit < 1 or args.batch < 2 or args.repeats < 1 or args.max_gen_toks < 1:
        parser.error("--limit, --repeats and --max-gen-toks must be >= 1 and --batch >= 2")
    if not (args.data_dir / f"{args.task}.jsonl").is_file():
        parser.error(f"{args.data_dir / (args.task + '.jsonl')} not found (--data-dir)")
    until = args.until or ["."]

    requests = build_requests(args.data_dir, args.task, args.limit, args.max_gen_toks, until)
    one = KVCompLM(pretrained=args.model, preset=args.preset, device="cpu", batch_size=1)
    many = KVCompLM(pipeline=one.pipeline, preset=args.preset, batch_size=args.batch)
    one.generate_until(requests[:1], disable_tqdm=True)  # first calls pay one-off costs
    best = {1: float("inf"), args.batch: float("inf")}
    outputs: dict[int, list[str]] = {}
    for repeat in range(args.repeats):
        for size, lm in ((1, one), (args.batch, many)):
            start = time.perf_counter()
            outputs[size] = lm.generate_until(requests, disable_tqdm=True)
            best[size] = min(best[size], time.perf_counter() - start)
            print(f"repeat {repeat + 1}: batch {size}: {best[size]:.1f} s (best so far)", flush=True)
    identical = outputs[1] == outputs[args.batch]
    report = {
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "model": args.model,
        "preset": args.preset,
        "task": args.task,
        "requests": len(requests),
        "max_gen_toks": args.max_gen_toks,
        "until": until,
        "wall_s": {str(k): v for k, v in best.items()},
        "ratio_batch_over_1": best[args.batch] / best[1],
        "identical_outputs": identical,
        "rows_identical": sum(a == b for a, b in zip(outputs[1], outputs[args.batch])),
        "output_chars": [len(t) for t in outputs[1]],
    }
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
