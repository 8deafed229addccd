"""LongBench through lm-eval without the hub: task YAMLs pointing at local LongBench JSONL files.

lm-eval's own ``longbench_*`` tasks load ``Xnhyacinth/LongBench`` from the Hugging Face hub. For
each task asked for, :func:`write_local_longbench_tasks` reads lm-eval's installed YAML for it
(prompt template, generation kwargs, metric function, metric list) and writes a copy that loads
``<data_dir>/<task>.jsonl`` through the ``json`` dataset builder instead::

    names = write_local_longbench_tasks("data/longbench", "tasks_out", tasks=["multi_news"])
    # lm_eval --include_path tasks_out --tasks longbench_local_multi_news ...

The hub copy names the question field ``question``; LongBench's JSONL names it ``input``. The
written tasks add ``question`` from ``input`` (:func:`process_longbench_docs`), so lm-eval's
templates work unchanged and the model can still find the question to guide compression.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

TASK_PREFIX = "longbench_local_"
TASK_TAG = "longbench_local"
METRICS_MODULE = "lm_eval.tasks.longbench.metrics"
PROCESS_DOCS = "kvcomp_lm_eval.tasks.process_longbench_docs"
_KEPT_KEYS = (
    "doc_to_text",
    "doc_to_target",
    "target_delimiter",
    "process_results",
    "generation_kwargs",
    "metric_list",
    "metadata",
)


class FunctionRef(str):
    """A ``!function module.name`` reference in an lm-eval task YAML (kept as text, never imported)."""


class _TaskLoader(yaml.SafeLoader):
    pass


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_TaskDumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def lm_eval_longbench_dir() -> Path:
    """Folder of lm-eval's installed LongBench task YAMLs (found without importing lm-eval)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lm-eval is not installed: pip install 'kvcomp[eval]' (lm_eval[longbench])")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "longbench"
    if not folder.is_dir():
        raise FileNotFoundError(f"this lm-eval installation has no LongBench tasks ({folder} is missing)")
    return folder


def longbench_task_names() -> list[str]:
    """LongBench v1 / LongBench-E task names lm-eval ships (``multi_news``, ``qasper_e``, ...)."""
    return sorted(p.stem for p in lm_eval_longbench_dir().glob("*.yaml") if not p.stem.startswith("_"))


def local_task_config(task: str, data_file: Path) -> dict[str, Any]:
    """lm-eval's config for LongBench ``task``, reading ``data_file`` (JSONL) instead of the hub."""
    source = lm_eval_longbench_dir() / f"{task}.yaml"
    if not source.is_file():
        raise ValueError(f"unknown LongBench task {task!r}; lm-eval has: {', '.join(longbench_task_names())}")
    original = yaml.load(source.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 (safe loader + one tag)
    config: dict[str, Any] = {
        "task": TASK_PREFIX + task,
        "tag": [TASK_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "process_docs": FunctionRef(PROCESS_DOCS),
    }
    for key in _KEPT_KEYS:
        if key in original:
            config[key] = original[key]
    ref = config.get("process_results")
    if isinstance(ref, FunctionRef) and ref.startswith("metrics."):
        # lm-eval resolves a relative `metrics.fn` next to the YAML; ours lives elsewhere.
        config["process_results"] = FunctionRef(f"{METRICS_MODULE}.{ref[len('metrics.'):]}")
    config.setdefault("metadata", {})
    config["metadata"] = {**config["metadata"], "source_task": f"longbench_{task}", "data_file": str(data_file.resolve())}
    return config


def write_local_longbench_tasks(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tasks: Sequence[str] | None = None,
) -> list[str]:
    """Write lm-eval task YAMLs for local LongBench JSONL files; returns the new task names.

    Args:
        data_dir: folder holding ``<task>.jsonl`` files in LongBench's schema
            (``input, context, answers, length, dataset, language, all_classes, _id``).
        out_dir: folder to write ``longbench_local_<task>.yaml`` into (pass it to lm-eval as
            ``--include_path``); created if missing.
        tasks: LongBench task names (``multi_news``, ``qasper``, ``multi_news_e``...); default:
            every lm-eval LongBench task with a JSONL file in ``data_dir``.

    Returns:
        Task names to pass to ``--tasks`` (``longbench_local_<task>``), in the order given.

    Raises:
        FileNotFoundError: ``data_dir`` or a task's JSONL file is missing.
        ValueError: an unknown task name, or no task found.
    """
    data = Path(data_dir).expanduser()
    if not data.is_dir():
        raise FileNotFoundError(f"LongBench data folder {data} does not exist")
    known = longbench_task_names()
    if tasks is None:
        tasks = [t for t in known if (data / f"{t}.jsonl").is_file()]
        if not tasks:
            raise ValueError(f"no LongBench JSONL file (<task>.jsonl for a task in {', '.join(known)}) in {data}")
    tasks = list(dict.fromkeys(tasks))
    configs = []
    for task in tasks:  # validate every task before writing anything
        if task not in known:
            raise ValueError(f"unknown LongBench task {task!r}; lm-eval has: {', '.join(known)}")
        data_file = data / f"{task}.jsonl"
        if not data_file.is_file():
            raise FileNotFoundError(f"no data for LongBench task {task!r}: {data_file} is missing")
        configs.append(local_task_config(task, data_file))
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for config in configs:
        _write_atomic(out / f"{config['task']}.yaml", yaml.dump(config, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True))
    return [config["task"] for config in configs]


def process_longbench_docs(dataset: Any) -> Any:
    """lm-eval ``process_docs``: give LongBench JSONL rows the ``question`` field lm-eval's templates use.

    Rows that already have ``question`` (the hub copy) pass unchanged; otherwise ``question`` is a
    copy of ``input``. Works on a ``datasets.Dataset``.
    """
    if "question" in dataset.column_names:
        return dataset
    if "input" not in dataset.column_names:
        raise ValueError(f"LongBench rows need an 'input' or 'question' field; these have {dataset.column_names}")
    return dataset.map(lambda doc: {"question": doc["input"]})


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
