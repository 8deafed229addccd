"""Peers side by side with kvcomp: kvpress presses and transformers' ``QuantizedCache``.

kvpress pins an older transformers than kvcomp's, so the peers live in their own virtual
environment (``make peers-venv`` builds ``.venv-peers``) and run in a subprocess:
``bench/peers/run_peer.py`` takes a JSON job and answers JSON lines (see its docstring for the
protocol). This module builds the job from the same prompts kvcomp gets, runs the subprocess
and turns its rows into the rows and :class:`~kvcore.types.GenerationResult` objects kvcomp's
own evaluation produces, so :class:`~kvcomp_eval.metrics.summary.CompressionMetrics` and
:class:`~kvcomp_eval.metrics.fidelity.FidelityMetrics` treat peers and kvcomp alike.

    runner = PeerRunner(model="smollm2-135m")
    methods = [PeerMethod("snapkv", {"compression_ratio": 0.5}),
               PeerMethod("quantized_cache", {"backend": "hqq", "nbits": 4})]
    for row in runner.iter_rows([PeerPrompt("p0", prompt, question_span)], methods, max_new_tokens=8):
        row.prediction, row.kv_fraction, row.to_generation_result()
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from kvcomp_eval.peers.methods import (
    PeerMethod,
    PeerPrompt,
    PeerRunnerError,
    PeersUnavailable,
    default_peers_python,
    default_runner_script,
    peers_available,
)
from kvcomp_eval.peers.protocol import PeerRow, _JobState, parse_output
from kvcore.types import GenerationResult


# ------------------------------------------------------------------------------------------------
# Running the subprocess
# ------------------------------------------------------------------------------------------------
def _model_path(model: str) -> str:
    from kvcore.loading import resolve_model

    path = resolve_model(model)
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"peers need a local model folder; {model!r} resolved to {path!r}")
    return path


class PeerRunner:
    """Runs peer methods on prompts in the peers' environment.

    Args:
        model: what kvcomp would load (preset name such as ``"smollm2-135m"``, folder or
            ``.gguf``); it must resolve to a local Hugging Face folder, which both sides load.
        python: the peers environment's interpreter (default :func:`default_peers_python`).
        runner: the runner script (default :func:`default_runner_script`).
        threads: torch threads in the runner (``None``: torch's default).
        dtype: model dtype in the runner (``"float32"`` as kvcomp's default).
        log: where the runner's progress goes (``None``: this process's stderr).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        python: str | os.PathLike[str] | None = None,
        runner: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        dtype: str = "float32",
        log: IO[str] | None = None,
    ) -> None:
        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.model_path = _model_path(model)
        self.python = Path(python) if python is not None else default_peers_python()
        self.runner = Path(runner) if runner is not None else default_runner_script()
        self.threads = threads
        self.dtype = dtype
        self.log = log
        self.versions: dict[str, str] | None = None

    def check_available(self) -> None:
        """Raise :class:`PeersUnavailable` if the interpreter or runner script is missing."""
        if not self.python.exists():
            raise PeersUnavailable(f"peers environment not built: {self.python} is missing (run `make peers-venv`)")
        if not self.runner.is_file():
            raise PeersUnavailable(f"peers runner {self.runner} is missing")

    def build_job(
        self,
        prompts: Sequence[PeerPrompt],
        methods: Sequence[PeerMethod],
        max_new_tokens: int = 32,
        teacher_tokens: Mapping[str, Sequence[int]] | None = None,
        reference_files: Mapping[str, str] | None = None,
        logprobs_dir: str | None = None,
    ) -> dict[str, Any]:
        """The JSON job for the runner (checks what can be checked here)."""
        if not prompts:
            raise ValueError("no prompts to run")
        if not methods:
            raise ValueError("no peer methods to run")
        ids = [p.id for p in prompts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"prompt ids must be unique, got {ids}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        job: dict[str, Any] = {
            "model_path": self.model_path,
            "prompts": [p.to_json() for p in prompts],
            "methods": [m.to_json() for m in methods],
            "max_new_tokens": max_new_tokens,
            "dtype": self.dtype,
        }
        if self.threads is not None:
            job["threads"] = self.threads
        if teacher_tokens:
            job["teacher_tokens"] = {k: [int(t) for t in v] for k, v in teacher_tokens.items()}
        if reference_files:
            job["reference_logprobs"] = dict(reference_files)
        if logprobs_dir is not None:
            job["logprobs_dir"] = logprobs_dir
        return job

    def iter_rows(
        self,
        prompts: Sequence[PeerPrompt],
        methods: Sequence[PeerMethod],
        *,
        max_new_tokens: int = 32,
        teacher_tokens: Mapping[str, Sequence[int]] | None = None,
        reference_logprobs: Mapping[str, Tensor] | None = None,
        with_logprobs: bool = False,
    ) -> Iterator[PeerRow]:
        """Run every method on every prompt; yield rows (method-major) as the runner finishes them.

        Args:
            teacher_tokens: per prompt id, token ids to teacher-force for KL (usually the
                uncompressed model's greedy output).
            reference_logprobs: per prompt id, ``[R, V]`` log-probs of the reference after the
                prompt and each of ``teacher[:R - 1]`` (e.g. kvcomp's ``continuation_logprobs``);
                prompts without one are compared with the runner's own uncompressed model.
            with_logprobs: also return each row's first-token log-probs ``[V]``.
        """
        self.check_available()
        workdir = tempfile.mkdtemp(prefix="kvcomp-peers-")
        try:
            files: dict[str, str] = {}
            for pid, tensor in (reference_logprobs or {}).items():
                if not isinstance(tensor, Tensor) or tensor.dim() != 2:
                    raise ValueError(f"reference_logprobs[{pid!r}] must be a [R, V] tensor")
                files[pid] = os.path.join(workdir, f"ref-{len(files)}.pt")
                torch.save(tensor.detach().float().cpu().contiguous(), files[pid])
            job = self.build_job(
                prompts,
                methods,
                max_new_tokens,
                teacher_tokens,
                files or None,
                os.path.join(workdir, "logprobs") if with_logprobs else None,
            )
            proc = subprocess.Popen(
                [str(self.python), str(self.runner)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log if self.log is not None else None,
                text=True,
            )
            try:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(job))
                proc.stdin.close()
                state = _JobState()
                try:
                    yield from parse_output(proc.stdout, state)
                except PeerRunnerError as exc:
                    code = proc.wait()
                    raise PeerRunnerError(f"{exc} (runner exit status {code})") from None
                if state.started is not None:
                    self.versions = state.started.get("versions")
                code = proc.wait()
                if code != 0:
                    raise PeerRunnerError(f"peer runner exited with status {code} after its last row")
            finally:
                if proc.poll() is None:  # the caller stopped early: end our own child
                    proc.kill()
                    proc.wait()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def run(self, prompts: Sequence[PeerPrompt], methods: Sequence[PeerMethod], **kwargs: Any) -> list[PeerRow]:
        """All rows of :meth:`iter_rows` as a list."""
        return list(self.iter_rows(prompts, methods, **kwargs))


class PeerGenerator:
    """A peer method as a :class:`~kvcomp_eval.evaluators.base.TextGenerator` (for the evaluators).

    Keeps one runner process (``--serve``) with the model loaded; each :meth:`generate` /
    :meth:`run` is one job of :attr:`method`, which may be reassigned between calls to run
    another peer on the same process. Close it (or use it as a context manager) to end the
    process.
    """

    def __init__(
        self,
        method: PeerMethod,
        model: str = "smollm2-135m",
        python: str | os.PathLike[str] | None = None,
        runner: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        with_logprobs: bool = True,
        log: IO[str] | None = None,
    ) -> None:
        from transformers import AutoConfig

        from kvcore.loading import load_tokenizer

        self.method = method
        self._runner = PeerRunner(model=model, python=python, runner=runner, threads=threads, log=log)
        self._runner.check_available()
        self.tokenizer = load_tokenizer(self._runner.model_path)
        self.max_prompt_tokens = int(AutoConfig.from_pretrained(self._runner.model_path).max_position_embeddings)
        self.with_logprobs = with_logprobs
        self._workdir = tempfile.mkdtemp(prefix="kvcomp-peer-gen-")
        self._count = 0
        self._proc: subprocess.Popen[str] | None = subprocess.Popen(
            [str(self._runner.python), str(self._runner.runner), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log if log is not None else None,
            text=True,
        )

    def generate(
        self,
        prompt: str,
        *,
        question_span: tuple[int, int] | None = None,
        max_new_tokens: int = 32,
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        """Prefill ``prompt`` through :attr:`method` and decode greedily (until a ``stop`` string)."""
        return self.run(prompt, question_span=question_span, max_new_tokens=max_new_tokens, stop=stop).to_generation_result()

    def run(
        self,
        prompt: str,
        *,
        question_span: tuple[int, int] | None = None,
        max_new_tokens: int = 32,
        teacher_tokens: Sequence[int] | None = None,
        reference_logprobs: Tensor | None = None,
        stop: Sequence[str] = (),
    ) -> PeerRow:
        """One job of one prompt through :attr:`method` (set it to switch methods; the model stays loaded).

        Args:
            teacher_tokens: ids to teacher-force through the peer's cache for KL (the row's ``kl_steps``).
            reference_logprobs: ``[R, V]`` reference log-probs after the prompt and each of
                ``teacher_tokens[:R - 1]`` (``R <= len(teacher_tokens) + 1``); without them the
                runner compares with its own uncompressed model.
            stop: strings that end decoding once the text holds one (the text is cut before it).
        """
        if self._proc is None:
            raise RuntimeError("this PeerGenerator is closed")
        if reference_logprobs is not None and not teacher_tokens:
            raise ValueError("reference_logprobs need the teacher_tokens they were computed on")
        self._count += 1
        pid = f"g{self._count}"
        teacher = {pid: list(teacher_tokens)} if teacher_tokens else None
        files = None
        if reference_logprobs is not None:
            if not isinstance(reference_logprobs, Tensor) or reference_logprobs.dim() != 2:
                raise ValueError("reference_logprobs must be a [R, V] tensor")
            files = {pid: os.path.join(self._workdir, f"ref-{self._count}.pt")}
            torch.save(reference_logprobs.detach().float().cpu().contiguous(), files[pid])
        job = self._runner.build_job(
            [PeerPrompt(pid, prompt, question_span, tuple(stop))],
            [self.method],
            max_new_tokens,
            teacher,
            files,
            logprobs_dir=os.path.join(self._workdir, str(self._count)) if self.with_logprobs else None,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise PeerRunnerError(f"peer runner is gone (exit status {self._proc.poll()})") from None
        state = _JobState()
        rows = list(parse_output(self._proc.stdout, state))
        if state.started is not None and self._runner.versions is None:
            self._runner.versions = state.started.get("versions")
        if files:
            os.unlink(files[pid])
        if len(rows) != 1:
            raise PeerRunnerError(f"expected one row for one prompt, got {len(rows)}")
        return rows[0]

    @property
    def versions(self) -> dict[str, str] | None:
        """Package versions the runner reported (kvpress, transformers, ...) after the first job."""
        return self._runner.versions

    def close(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> PeerGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass


if __name__ == "__main__":  # pragma: no cover
    ok, reason = peers_available()
    print(reason)
    sys.exit(0 if ok else 1)
