"""Capturing the block-input similarity matrix S in one streaming pass.

S[i, j] is the mean over tokens (and over windows) of the cosine between the hidden state that
enters block i and the one that enters block j. Each window goes through the model once with no
KV cache; a forward pre-hook on every block normalises the block's input and folds its dot
products with the inputs of the blocks before it into a running N x N sum. The forward stops
right after the last block's input is seen (the last block, final norm and LM head would not
change S), so a capture costs less than a plain forward of the same windows.

Memory: one batch of normalised block inputs (N x B x T x d float32) plus the N x N sum; the
per-token dot products are batched matrix products, so no N-fold temporary is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._blocks import get_blocks
from ._forward import batches, check_windows, input_device
from .errors import InvalidInputError
from .inputs import BlockInputs
from .progress import ProgressCallback

_EPS = 1e-8


class _StopForward(Exception):
    """Raised inside the last block's pre-hook: nothing after it contributes to S."""


class _Accumulator:
    def __init__(self, num_blocks: int, keep: BlockInputs | None = None) -> None:
        self.n = num_blocks
        self.keep = keep
        self.first_window = 0  # index of the current batch's first window
        self.total = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
        self.buffer: torch.Tensor | None = None  # [N, B*T, d] normalised inputs of this batch
        self.seen = 0
        self.windows = 0

    def hook(self, index: int) -> Callable[..., None]:
        def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
                raise InvalidInputError(
                    f"block {index} did not receive hidden states [batch, tokens, dim] as input"
                )
            self.add(index, hidden)
            if self.keep is not None:
                self.keep.add(index, self.first_window, hidden)
            if index == self.n - 1:
                raise _StopForward

        return pre_hook

    @torch.no_grad()
    def add(self, index: int, hidden: torch.Tensor) -> None:
        b, t, d = hidden.shape
        if index == 0:
            device = hidden.device
            if (
                self.buffer is None
                or self.buffer.shape[1:] != (b * t, d)
                or self.buffer.device != device
            ):
                self.buffer = torch.empty(self.n, b * t, d, dtype=torch.float32, device=device)
        assert self.buffer is not None, "block 0 must run first"
        x = hidden.detach().to(self.buffer.device, torch.float32).reshape(b * t, d)
        x = x / (x.norm(dim=-1, keepdim=True) + _EPS)
        self.buffer[index].copy_(x)
        if index > 0:
            prev = self.buffer[:index].transpose(0, 1)  # [B*T, index, d]
            dots = torch.bmm(prev, x.unsqueeze(-1)).squeeze(
                -1
            )  # [B*T, index]: x_i . x_index per token
            # mean over the T tokens of each window, summed over the B windows of this batch
            per_window = dots.view(b, t, index).mean(dim=1).sum(dim=0)  # [index]
            self.total[index, :index] += per_window.double().cpu()
        if index == self.n - 1:
            self.windows += b


@torch.no_grad()
def capture_similarity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    keep: BlockInputs | None = None,
) -> np.ndarray:
    """Mean per-token cosine similarity between the inputs of every pair of blocks.

    ``windows``: token ids ``[num_windows, seq_len]``. Returns a float64 ``[N, N]`` symmetric matrix
    with a unit diagonal, N the number of blocks. ``keep``: also store every block's input for
    the windows at ``keep.indices`` there (:class:`lorp.inputs.BlockInputs`; a copy of what the
    capture sees anyway, so later stages can start mid-model). A model prepared for layer-wise
    passes (:func:`lorp.offload.prepare`) is run block by block, with the same result.
    """
    from .offload import onloader_of, sequential_similarity

    if onloader_of(model) is not None:  # prepared for layer-wise passes (lorp.offload)
        return sequential_similarity(
            model, windows, batch_size=batch_size, progress=progress, keep=keep
        )
    windows = check_windows(windows)
    blocks = get_blocks(model)
    if keep is not None:
        keep.start(windows, len(blocks))
    acc = _Accumulator(len(blocks), keep)
    handles = [
        blk.register_forward_pre_hook(acc.hook(i), with_kwargs=True) for i, blk in enumerate(blocks)
    ]
    device = input_device(model)
    total = windows.shape[0]
    was_training = model.training
    model.eval()
    try:
        done = 0
        for batch in batches(windows, batch_size):
            acc.first_window = done
            with contextlib.suppress(_StopForward):
                model(input_ids=batch.to(device), use_cache=False)
            done += batch.shape[0]
            if progress is not None:
                progress("calibration", done / total, f"{done}/{total} windows")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if keep is not None:
        keep.finish()
    return similarity_from_sums(acc.total, acc.windows, total)


def similarity_from_sums(total: torch.Tensor, seen: int, windows: int) -> np.ndarray:
    """S from the lower triangle of per-window cosine sums ``total`` ``[N, N]`` over ``seen`` of
    the ``windows`` windows (all of them must have reached the last block)."""
    if seen != windows:
        raise InvalidInputError(
            f"only {seen} of {windows} windows reached the last block; the model's forward "
            "does not run its blocks in order"
        )
    lower = (total / windows).numpy()
    s = lower + lower.T
    np.fill_diagonal(s, 1.0)
    return s
