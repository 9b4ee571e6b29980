"""The dense model's block inputs, kept from one pass so later passes can start mid-model.

A removal set, a compensation fold or a logit temperature changes nothing before the first
block it touches, so a pass over calibration windows that was already run densely can start at
that block from the stored dense hidden state instead of at the embeddings. The similarity
capture (:func:`lorp.similarity.capture_similarity`) sees every block's input of every
calibration window anyway; given a :class:`BlockInputs` it keeps them for chosen windows, and
the compensation fit, its strength tuning and the temperature fit read them from there.

:func:`fed` runs a model with some blocks skipped and chosen blocks fed given hidden states in
place of what reaches them; the blocks it runs do the same operations on the same values as
in a whole pass, so results are identical.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._blocks import get_blocks
from .errors import InvalidInputError
from .surgery import pruned_view


def hidden_bytes(model: nn.Module) -> int:
    """Bytes of one token's hidden state in ``model`` (0 when its width cannot be told)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    dim = getattr(emb, "embedding_dim", None)
    if not isinstance(dim, int):
        dim = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    if dim <= 0:
        return 0
    return dim * next(model.parameters()).element_size()


class BlockInputs:
    """The dense input of every block for the calibration windows at ``indices`` of a capture
    (filled by :func:`lorp.similarity.capture_similarity`). ``states[b]``: ``[W, T, d]`` for
    block b, in the order of ``indices``, kept in host memory (an accelerator's memory is left
    to the model; :func:`fed` moves each batch to where its block runs); ``tokens``: those
    windows' ids ``[W, T]``; ``seconds``: the time spent copying them during the capture."""

    def __init__(self, indices: Sequence[int]) -> None:
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise InvalidInputError(f"window indices must be integers >= 0, got {list(indices)}")
        self.indices = sorted(set(indices))
        self.tokens: torch.Tensor | None = None
        self.states: list[torch.Tensor] = []
        self.seconds = 0.0
        self._parts: list[list[torch.Tensor]] = []

    @property
    def ready(self) -> bool:
        """Whether a capture filled it (every block's input of every kept window)."""
        return (
            self.tokens is not None
            and bool(self.states)
            and all(s.shape[:1] == self.tokens.shape[:1] for s in self.states)
        )

    def rows(self, windows: torch.Tensor) -> list[int] | None:
        """Where each of ``windows`` (token ids ``[W, T]``) is kept, or None when one is not."""
        if not self.ready or self.tokens is None or windows.shape[1:] != self.tokens.shape[1:]:
            return None
        kept = self.tokens
        found: list[int] = []
        for row in windows.to(kept.device):
            match = (kept == row).all(dim=1).nonzero()
            if match.numel() == 0:
                return None
            found.append(int(match[0, 0]))
        return found

    def of(self, block: int, windows: torch.Tensor) -> torch.Tensor | None:
        """Block ``block``'s dense input for ``windows`` ``[W, T, d]``, or None (not kept)."""
        found = self.rows(windows)
        if found is None or not 0 <= block < len(self.states):
            return None
        return self.states[block][found]

    # the capture's side ------------------------------------------------------------------

    def start(self, windows: torch.Tensor, num_blocks: int) -> None:
        bad = [i for i in self.indices if i >= windows.shape[0]]
        if bad:
            raise InvalidInputError(
                f"cannot keep windows {bad}: the capture has {windows.shape[0]} windows"
            )
        self.tokens = windows[self.indices].clone()
        self.states = [torch.empty(0) for _ in range(num_blocks)]
        self._parts = [[] for _ in range(num_blocks)]
        self.seconds = 0.0

    def add(self, block: int, first_window: int, hidden: torch.Tensor) -> None:
        """Keep the rows of ``hidden`` ``[B, T, d]`` (windows first_window..+B) that are kept."""
        if not self.indices:
            return
        t = time.perf_counter()
        rows = [i - first_window for i in self.indices if 0 <= i - first_window < hidden.shape[0]]
        if rows:
            self._parts[block].append(hidden.detach()[rows].to("cpu", copy=True))
        self.seconds += time.perf_counter() - t

    def finish(self) -> None:
        t = time.perf_counter()
        self.states = [torch.cat(p) if p else torch.empty(0) for p in self._parts]
        self._parts = []
        self.seconds += time.perf_counter() - t


def batched_feed(states: torch.Tensor, batch_size: int) -> Callable[[], torch.Tensor]:
    """A feed for :func:`fed` that hands out ``states`` ``[W, T, d]`` one batch per call."""
    parts = iter(states.split(batch_size))

    def feed() -> torch.Tensor:
        try:
            return next(parts)
        except StopIteration:
            raise InvalidInputError("more forwards than stored batches") from None

    return feed


@contextlib.contextmanager
def fed(
    model: nn.Module,
    skipped: Sequence[int],
    feeds: Mapping[int, Callable[[], torch.Tensor]],
) -> Iterator[None]:
    """Run ``model`` with the blocks ``skipped`` removed (:func:`lorp.surgery.pruned_view`) and
    every block in ``feeds`` (original numbering, kept) given ``feeds[b]()`` as its hidden
    states in place of what reaches it, once per forward; restored on exit."""
    blocks = get_blocks(model)
    bad = sorted(b for b in feeds if b in set(skipped) or not 0 <= b < len(blocks))
    if bad:
        raise InvalidInputError(f"cannot feed blocks {bad}: skipped or out of range")

    def make(feed: Callable[[], torch.Tensor]) -> Callable[..., Any]:
        def inject(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            given = args[0] if args else kwargs.get("hidden_states")
            hidden = feed()
            if isinstance(given, torch.Tensor):
                if given.shape != hidden.shape:
                    raise InvalidInputError(
                        f"stored hidden states {tuple(hidden.shape)} do not match the "
                        f"forward's {tuple(given.shape)}"
                    )
                hidden = hidden.to(given.device, given.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return inject

    handles = [
        blocks[b].register_forward_pre_hook(make(f), with_kwargs=True) for b, f in feeds.items()
    ]
    try:
        with pruned_view(model, sorted(set(skipped))):
            yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def resumed(
    model: nn.Module, removed: Sequence[int], start: int, feed: Callable[[], torch.Tensor]
) -> Iterator[None]:
    """``model`` with ``removed`` skipped, starting at block ``start``: every block before it is
    skipped too, and the first kept block from ``start`` on is fed ``feed()`` (the dense input
    of block ``start``). ``start`` 0 with nothing stored: use :func:`lorp.surgery.pruned_view`."""
    n = len(get_blocks(model))
    gone = set(removed)
    first = next((i for i in range(start, n) if i not in gone), None)
    if first is None:
        raise InvalidInputError(f"no block is kept from block {start} on")
    with fed(model, sorted(set(range(start)) | gone), {first: feed}):
        yield


__all__ = ["BlockInputs", "batched_feed", "fed", "hidden_bytes", "resumed"]
