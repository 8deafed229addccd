"""What a prefill stream's tensors give, remembered across the layers of the stream.

Reading a tensor's value on the host (``int(t.max())``, ``bool(t.any())``) makes the host wait
for every kernel queued before it on a GPU, and a prefill that waits once per layer can no longer
launch ahead of the device; on a GPU each small op is also a launch. What such reads and ops
look at here (the positions, protected slots and window of the tokens in the stream) changes
only when propagation thins the stream, and the prefill hands the same tensor objects to every
layer until then. So a host read, or a small tensor every layer would derive again, is
remembered for the tensor objects it was made from, by identity and in-place version: once per
stream, not per layer. Scorers and quantizers share this module.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from torch import Tensor

T = TypeVar("T")


class LastRead(Generic[T]):
    """The value of the last read, for the tensor objects (and extra key) it was made on."""

    def __init__(self) -> None:
        self._entry: tuple[tuple[weakref.ref, ...], tuple[Hashable, ...], T] | None = None

    def get(self, tensors: Sequence[Tensor], extra: tuple[Hashable, ...], read: Callable[[], T]) -> T:
        """``read()``, or its remembered value if ``tensors`` are the very objects of the last
        call, unchanged in place since, and ``extra`` is equal."""
        key = (*(t._version for t in tensors), *extra)
        entry = self._entry  # read once: another thread may replace it
        if entry is not None and entry[1] == key and len(entry[0]) == len(tensors) \
                and all(ref() is t for ref, t in zip(entry[0], tensors)):
            return entry[2]
        value = read()
        self._entry = (tuple(weakref.ref(t) for t in tensors), key, value)
        return value
