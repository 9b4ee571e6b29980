"""What pruning costs: perplexity, and how far the pruned model's predictions move.

Perplexity protocol: non-overlapping windows (see lorp.data), each scored on its own with no
context carried over; every position except the last predicts the next token of its window, so a
window of T tokens contributes T - 1 predictions; ppl = exp(total NLL / predictions).

The dense/pruned comparison runs both models on the same windows in one process (the pruned model
is the dense one with blocks skipped, lorp.surgery.pruned_view), batch by batch, and reports
perplexity of each, the mean KL divergence KL(dense || pruned) of the next-token distributions
(nats per prediction) and top-1 agreement (how often both models rank the same token first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._forward import batches, check_windows, input_device, log_probs
from .compensation import Compensation, compensated_view
from .offload import onloader_of, onloading, sequential_compare
from .progress import ProgressCallback
from .surgery import pruned_view


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per prediction, nats
    tokens: int  # number of predictions scored

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class QualityComparison:
    dense: PerplexityResult
    pruned: PerplexityResult
    kl: float  # mean KL(dense || pruned) per prediction, nats
    top1_agreement: float  # fraction of predictions with the same arg-max token
    tokens: int

    @property
    def ppl_ratio(self) -> float:
        return self.pruned.ppl / self.dense.ppl

    def to_dict(self) -> dict[str, object]:
        return {
            "dense": self.dense.to_dict(),
            "pruned": self.pruned.to_dict(),
            "kl": self.kl,
            "top1_agreement": self.top1_agreement,
            "ppl_ratio": self.ppl_ratio,
            "tokens": self.tokens,
        }


def _nll_sum(logp: torch.Tensor, batch: torch.Tensor) -> float:
    target = batch[:, 1:].to(logp.device)
    return float(-logp.gather(-1, target.unsqueeze(-1)).sum())


def _result(nll_sum: float, tokens: int) -> PerplexityResult:
    nll = nll_sum / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    stage: str = "evaluation",
) -> PerplexityResult:
    """Perplexity of ``model`` over token ``windows`` ``[W, T]`` (protocol: module docstring)."""
    windows = check_windows(windows)
    device = input_device(model)
    nll, tokens, done = 0.0, 0, 0
    for batch in batches(windows, batch_size):
        nll += _nll_sum(log_probs(model, batch, device), batch)
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        done += batch.shape[0]
        if progress is not None:
            progress(
                stage, done / windows.shape[0], f"perplexity {done}/{windows.shape[0]} windows"
            )
    return _result(nll, tokens)


@torch.no_grad()
def compare_pruned(
    model: nn.Module,
    removed: Sequence[int],
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    stage: str = "evaluation",
    compensation: Compensation | None = None,
) -> QualityComparison:
    """Dense vs pruned (``removed`` blocks skipped, ``compensation`` folded in when given) on
    the same windows: ppl, KL, top-1. A model prepared for sequential onloading
    (:mod:`lorp.offload`) is run layer-wise (with ``compensation``: window by window, one block
    on the device at a time), with the same results."""
    if onloader_of(model) is not None and compensation is None:
        return sequential_compare(
            model,
            removed,
            windows,
            batch_size=batch_size,
            progress=progress,
            stage=stage,
            compensation=compensation,
        )
    windows = check_windows(windows)
    device = input_device(model)

    def pair(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp_d = log_probs(model, batch, device)
        with compensated_view(model, compensation), pruned_view(model, removed):
            logp_p = log_probs(model, batch, device).to(logp_d.device)
        return logp_d, logp_p

    with onloading(model):  # a prepared model with compensation: block by block per window
        return compare_log_probs(windows, batch_size, pair, progress, stage)


def compare_log_probs(
    windows: torch.Tensor,
    batch_size: int,
    pair: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    progress: ProgressCallback | None = None,
    stage: str = "evaluation",
) -> QualityComparison:
    """Dense vs pruned from ``pair(batch)``: the dense and the pruned next-token
    log-probabilities of each batch of ``windows`` (in order)."""
    nll_d = nll_p = kl = 0.0
    agree = tokens = done = 0
    for batch in batches(windows, batch_size):
        logp_d, logp_p = pair(batch)
        logp_p = logp_p.to(logp_d.device)
        nll_d += _nll_sum(logp_d, batch)
        nll_p += _nll_sum(logp_p, batch)
        kl += float((logp_d.exp() * (logp_d - logp_p)).sum())
        agree += int((logp_d.argmax(-1) == logp_p.argmax(-1)).sum())
        tokens += batch.shape[0] * (batch.shape[1] - 1)
        done += batch.shape[0]
        if progress is not None:
            progress(
                stage, done / windows.shape[0], f"dense vs pruned {done}/{windows.shape[0]} windows"
            )
    return QualityComparison(
        dense=_result(nll_d, tokens),
        pruned=_result(nll_p, tokens),
        kl=kl / tokens,
        top1_agreement=agree / tokens,
        tokens=tokens,
    )
