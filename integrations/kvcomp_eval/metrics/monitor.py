"""Peak memory and wall-clock timing around a block of code."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import psutil
import torch

__all__ = ["MemoryMonitor", "PerformanceTimer"]


class MemoryMonitor:
    """Peak memory over a ``with`` block, in bytes.

    On CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak statistics on entry
    (tensors allocated by torch on that device). On CPU: the process's resident set size (RSS)
    sampled by a background thread every ``interval_s`` seconds, plus the values at entry and
    exit; a spike shorter than the interval can be missed.

    Parameters
    ----------
    device:
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device`; ``None`` picks CUDA when
        available, else CPU.
    interval_s:
        RSS sampling period on CPU, seconds.

    Attributes
    ----------
    start_bytes, end_bytes, peak_bytes:
        Memory at entry, at exit and the highest seen (available after the block).
    samples:
        Number of measurements taken (CPU); 2 on CUDA (entry and exit).
    """

    def __init__(self, device: str | torch.device | None = None, interval_s: float = 0.005) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not interval_s > 0:
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.start_bytes = 0
        self.end_bytes = 0
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """``"cuda"`` (allocator statistics) or ``"rss"`` (process resident set size)."""
        return "cuda" if self.device.type == "cuda" else "rss"

    @property
    def peak_increase_bytes(self) -> int:
        """Peak above the value at entry."""
        return max(0, self.peak_bytes - self.start_bytes)

    def _record(self, value: int) -> None:
        with self._lock:
            self.peak_bytes = max(self.peak_bytes, value)
            self.samples += 1

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(self._process.memory_info().rss)

    def __enter__(self) -> MemoryMonitor:
        self.samples = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            self.peak_bytes = self.start_bytes
            self.samples = 1
        else:
            self.start_bytes = self._process.memory_info().rss
            self.peak_bytes = self.start_bytes
            self.samples = 1
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="kvcomp-memory-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.end_bytes = torch.cuda.memory_allocated(self.device)
            self._record(max(torch.cuda.max_memory_allocated(self.device), self.end_bytes))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self.end_bytes = self._process.memory_info().rss
            self._record(self.end_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "start_bytes": self.start_bytes,
            "end_bytes": self.end_bytes,
            "peak_bytes": self.peak_bytes,
            "peak_increase_bytes": self.peak_increase_bytes,
            "samples": self.samples,
        }


class PerformanceTimer:
    """Wall-clock time of a ``with`` block and of named spans inside it, in seconds.

    Example::

        with PerformanceTimer() as timer:
            with timer.span("prefill"):
                ...
            with timer.span("decode"):
                ...
        timer.spans["prefill"], timer.elapsed_s

    Parameters
    ----------
    cuda_sync:
        Call ``torch.cuda.synchronize()`` at every boundary so GPU work is counted where it
        runs, not where it was queued (only when CUDA is available).
    """

    def __init__(self, cuda_sync: bool = False) -> None:
        if not isinstance(cuda_sync, bool):
            raise ValueError(f"cuda_sync must be a bool, got {cuda_sync!r}")
        self.cuda_sync = cuda_sync and torch.cuda.is_available()
        self.spans: dict[str, float] = {}
        """Total seconds per span name (a name used several times accumulates)."""
        self.counts: dict[str, int] = {}
        """How many times each span name was timed."""
        self.records: list[tuple[str, float]] = []
        """Every span in the order it finished: ``(name, seconds)``."""
        self._start: float | None = None
        self._end: float | None = None

    def _now(self) -> float:
        if self.cuda_sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self) -> PerformanceTimer:
        self._start = self._now()
        self._end = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._end = self._now()

    @property
    def elapsed_s(self) -> float:
        """Seconds inside the ``with`` block (up to now while it still runs; 0 before it starts)."""
        if self._start is None:
            return 0.0
        end = self._end if self._end is not None else self._now()
        return end - self._start

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        """Time the enclosed code under ``name`` (recorded even if it raises)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"span name must be a non-empty string, got {name!r}")
        start = self._now()
        try:
            yield
        finally:
            seconds = self._now() - start
            self.spans[name] = self.spans.get(name, 0.0) + seconds
            self.counts[name] = self.counts.get(name, 0) + 1
            self.records.append((name, seconds))

    def to_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.elapsed_s, "spans_s": dict(self.spans), "counts": dict(self.counts)}
