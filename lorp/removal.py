"""Which blocks to remove: the index check every removal path shares. Pure Python (no torch), so
the GGUF surgery can use it without loading a model library."""

from __future__ import annotations

import operator
from collections.abc import Sequence

from .errors import InvalidInputError

__all__ = ["validate_removed"]


def validate_removed(num_layers: int, removed: Sequence[int]) -> list[int]:
    """Check block indices to remove from a ``num_layers``-deep model; return them sorted.

    Raises :class:`InvalidInputError` for non-integers, duplicates, out-of-range indices, an
    empty list, or removing every block.
    """
    indices: list[int] = []
    for i in removed:
        if isinstance(i, bool):
            raise InvalidInputError(f"block index {i!r} is not an integer")
        try:
            indices.append(operator.index(i))  # ints and numpy integers, not floats
        except TypeError:
            raise InvalidInputError(f"block index {i!r} is not an integer") from None
    if not indices:
        raise InvalidInputError("no blocks to remove")
    if len(set(indices)) != len(indices):
        dupes = sorted({i for i in indices if indices.count(i) > 1})
        raise InvalidInputError(f"duplicate block indices: {dupes}")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise InvalidInputError(
            f"block indices out of range for a {num_layers}-block model: {sorted(bad)}"
        )
    if len(indices) >= num_layers:
        raise InvalidInputError(f"cannot remove all {num_layers} blocks")
    return sorted(indices)
