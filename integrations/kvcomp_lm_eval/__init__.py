"""lm-evaluation-harness integration: the model ``kvcomp-llama`` and offline LongBench tasks.

Importing this package is cheap (no torch, no lm-eval): it runs at every interpreter start through
the installed ``kvcomp_lm_eval.pth`` (see :mod:`kvcomp_lm_eval.autoregister`). The heavy parts load
on first use::

    from kvcomp_lm_eval import KVCompLM                      # lm-eval LM subclass
    from kvcomp_lm_eval import write_local_longbench_tasks   # task YAMLs for local LongBench JSONL
"""

from __future__ import annotations

__all__ = ["KVCompLM", "write_local_longbench_tasks"]


def __getattr__(name: str) -> object:
    if name == "KVCompLM":
        from kvcomp_lm_eval.model import KVCompLM

        return KVCompLM
    if name == "write_local_longbench_tasks":
        from kvcomp_lm_eval.tasks import write_local_longbench_tasks

        return write_local_longbench_tasks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
