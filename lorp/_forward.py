"""Small helpers shared by everything that runs a model forward over token windows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go. Models dispatched with accelerate move inputs themselves."""
    if getattr(model, "hf_device_map", None):
        return torch.device("cpu")
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(emb, nn.Module):
        for p in emb.parameters():
            return p.device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_windows(windows: torch.Tensor) -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] < 1:
        raise InvalidInputError("windows must be a 2-D tensor of token ids [num_windows, seq_len]")
    if windows.dtype not in (torch.int64, torch.int32):
        raise InvalidInputError(f"windows must hold integer token ids, got {windows.dtype}")
    return windows.long()


def batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


def log_probs(model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Next-token log-probabilities for positions 0..T-2, float32 ``[B, T-1, V]``."""
    logits = model(input_ids=batch.to(device), use_cache=False).logits
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


@contextlib.contextmanager
def head_at(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Run ``model``'s output head on the sequence ``positions`` only (a pre-hook on it): the
    logits of a forward inside are ``[B, len(positions), V]``."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        raise InvalidInputError("scoring chosen positions needs a model with an output embedding")

    def take(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][:, positions.to(args[0].device)], *args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield
    finally:
        handle.remove()
