"""Batch rows compressed as if each were alone.

Tier sizes are counted from a row's tokens. In a batch whose rows differ (left padding, or a
question window per row) one shared count would give a short row more high-precision slots
than it gets alone, and its output would depend on its neighbours. So such a batch is split:
each row is compressed on its own real tokens, then the rows are stacked into regular tensors
with filler slots (:func:`kvcore.batching.stack_rows`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from kvcore.batching import stack_rows
from kvcore.types import CompressedLayer
from kvcomp_plugins.memo import LastRead

RowCompressor = Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor], CompressedLayer]


_ROWS_DIFFER: LastRead[bool] = LastRead()


def rows_differ(positions: Tensor, protected: Tensor) -> bool:
    """Whether one shared split would treat some row of ``[B, N]`` differently from its single
    run: a row has padding (counted into its tier sizes), or the rows protect different slots.

    A single row is never split: looking for its padding would cost a host sync per layer on a
    GPU, and a prompt run alone has none (a lone left-padded row ranks its padding last).
    """
    if positions.shape[0] == 1:
        return False
    # Host reads, once per prefill stream (see kvcomp_plugins.memo).
    return _ROWS_DIFFER.get(
        [positions, protected], (), lambda: bool((positions < 0).any()) or not bool((protected == protected[:1]).all())
    )


def compress_rows(
    compress: RowCompressor, keys: Tensor, values: Tensor, positions: Tensor, scores: Tensor | None, protected: Tensor
) -> CompressedLayer:
    """``compress`` each batch row on its real (non-padding) slots and stack the results.

    Shapes as :meth:`~kvcomp_plugins.quantizers.mixed_precision.MixedPrecisionQuantizer.compress`.
    """
    layers = []
    for row in range(keys.shape[0]):
        real = (positions[row] >= 0).nonzero().flatten()
        layers.append(
            compress(
                keys[row : row + 1].index_select(2, real),
                values[row : row + 1].index_select(2, real),
                positions[row : row + 1, real],
                None if scores is None else scores[row : row + 1].index_select(2, real),
                protected[row : row + 1, real],
            )
        )
    return stack_rows(layers)
