"""Logit temperature of a pruned model: one scale fitted on calibration tokens, folded into the
final norm.

Removing blocks changes how confident a model is, not only what it predicts: on
Qwen2.5-Coder-0.5B with blocks 10 and 11 removed, scaling the logits by 0.9 lowers perplexity on
the calibration text, on WikiText-2 and on the held-out Debian text alike (44.44 -> 43.64 on
WikiText-2). :func:`fit_temperature` finds the scale ``s`` that minimises the mean next-token
negative log-likelihood of ``softmax(s * logits)`` on calibration windows (the NLL is convex in
``s``; Newton's method from ``s = 1``), and :func:`apply_temperature` folds it into the final norm
(``weight`` and ``bias`` times ``s``; Gemma's ``1 + weight`` parametrisation is handled), so the
checkpoint keeps the standard architecture. The output head must be linear without a bias and the
model must not soft-cap its logits (else scaling the norm is not a temperature).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._forward import batches, check_windows, input_device
from .errors import InvalidInputError, UnsupportedModelError
from .progress import ProgressCallback

# Where common architectures keep the norm right before the output head.
_FINAL_NORMS = (
    "model.norm",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo
    "transformer.ln_f",  # GPT-2, GPT-J, BLOOM
    "gpt_neox.final_layer_norm",
    "model.decoder.final_layer_norm",  # OPT
    "model.final_layernorm",  # Phi
)
_SCALE_RANGE = (0.05, 20.0)
# The logits kept for the fit (float32) stay under this: with more windows than fit, the stride
# between the predictions taken grows.
LOGIT_BYTES = 1 << 30


@dataclass(frozen=True)
class Temperature:
    """``scale``: the factor the logits are multiplied by (1 = unchanged); NLLs are mean nats per
    prediction on the fit tokens, before and after."""

    scale: float
    nll_before: float
    nll_after: float
    predictions: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "ppl_before": math.exp(self.nll_before),
            "ppl_after": math.exp(self.nll_after),
            "predictions": self.predictions,
        }


def final_norm(model: nn.Module) -> nn.Module:
    """The norm whose output the output head reads; :class:`UnsupportedModelError` if unknown."""
    modules = dict(model.named_modules())
    for name in _FINAL_NORMS:
        norm = modules.get(name)
        if norm is not None and isinstance(getattr(norm, "weight", None), torch.Tensor):
            return norm
    raise UnsupportedModelError(
        f"{type(model).__name__}: no final norm with a weight found (looked for "
        f"{', '.join(_FINAL_NORMS)}), so a logit temperature cannot be folded in"
    )


def _head(model: nn.Module) -> nn.Linear:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"{type(model).__name__} has no linear output head")
    if head.bias is not None:
        raise UnsupportedModelError(
            "the output head has a bias, so scaling the final norm is not a temperature"
        )
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", lambda: config)()
    if getattr(text_config, "final_logit_softcapping", None):
        raise UnsupportedModelError(
            "the model soft-caps its logits, so scaling the final norm is not a temperature"
        )
    return head


def check_temperature(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless a temperature can be fitted and folded."""
    _head(model)
    final_norm(model)


def _newton(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[float, float, float]:
    """argmin_s of the mean NLL of softmax(s z); returns (s, nll at 1, nll at s)."""

    def moments(s: float) -> tuple[float, float, float]:
        nll = grad = hess = 0.0
        for z, y in zip(logits, targets, strict=True):
            logp = torch.log_softmax(s * z, dim=-1)
            p = logp.exp()
            zy = z.gather(1, y[:, None])[:, 0]
            mean = (p * z).sum(-1)
            nll -= float(logp.gather(1, y[:, None]).sum())
            grad += float((mean - zy).sum())
            hess += float(((p * z * z).sum(-1) - mean * mean).sum())
        return nll, grad, hess

    n = sum(int(y.numel()) for y in targets)
    s = 1.0
    nll, grad, hess = moments(s)
    first = nll
    for _ in range(30):
        step = grad / hess if hess > 0 else math.copysign(0.1, grad)
        new = min(max(s - step, _SCALE_RANGE[0]), _SCALE_RANGE[1])
        new_nll, new_grad, new_hess = moments(new)
        while new_nll > nll and abs(new - s) > 1e-6:  # damped: never accept a worse scale
            new = (new + s) / 2
            new_nll, new_grad, new_hess = moments(new)
        if new_nll > nll:
            break
        done = abs(new - s) < 1e-5
        s, nll, grad, hess = new, new_nll, new_grad, new_hess
        if done:
            break
    return s, first / n, nll / n


@torch.no_grad()
def fit_temperature(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    stride: int = 4,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
) -> Temperature:
    """Fit the logit scale of ``model`` as it is (enter :func:`lorp.surgery.pruned_view` and
    :func:`lorp.compensation.compensated_view` first to fit the pruned model's) on ``windows``
    ``[W, T]``: every ``stride``-th prediction of every window (the head runs only there; the
    stride grows when the logits kept would pass :data:`LOGIT_BYTES`)."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise InvalidInputError(f"stride must be a positive integer, got {stride!r}")
    windows = check_windows(windows)
    if windows.shape[1] < 2:
        raise InvalidInputError("temperature windows need at least 2 tokens")
    head = _head(model)
    per_window = LOGIT_BYTES // (4 * int(head.out_features)) // int(windows.shape[0])
    stride = max(stride, math.ceil((windows.shape[1] - 1) / max(per_window, 1)))
    positions = torch.arange(0, windows.shape[1] - 1, stride)
    logits: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []

    def take(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        h = hidden[:, positions.to(hidden.device)].reshape(-1, hidden.shape[-1])
        logits.append(F.linear(h, head.weight).float().cpu())
        return (hidden[:, -1:], *args[1:])  # the model's own head: last position only

    device = input_device(model)
    handle = head.register_forward_pre_hook(take)
    was_training = model.training
    model.eval()
    try:
        done = 0
        for batch in batches(windows, batch_size):
            model(input_ids=batch.to(device), use_cache=False)
            targets.append(batch[:, positions + 1].reshape(-1))
            done += batch.shape[0]
            if progress is not None:
                progress("temperature", done / windows.shape[0], f"{done} windows")
    finally:
        handle.remove()
        model.train(was_training)
    scale, before, after = _newton(logits, targets)
    return Temperature(
        scale=scale,
        nll_before=before,
        nll_after=after,
        predictions=sum(int(y.numel()) for y in targets),
    )


def apply_temperature(model: nn.Module, scale: float) -> Callable[[], None]:
    """Fold the logit ``scale`` into the final norm; returns a function restoring it exactly.
    The fold is checked on a random input (norm output times ``scale``)."""
    if not math.isfinite(scale) or scale <= 0:
        raise InvalidInputError(f"a temperature scale must be a positive number, got {scale!r}")
    _head(model)
    norm = final_norm(model)
    params = dict(norm.named_parameters(recurse=False))
    saved = {name: p.detach().clone() for name, p in params.items()}
    weight = params["weight"]
    generator = torch.Generator().manual_seed(0)  # a fixed probe; the global RNG is left alone
    probe = torch.randn(4, weight.shape[-1], generator=generator).to(weight.device, weight.dtype)
    with torch.no_grad():
        expected = scale * norm(probe)

    def restore() -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])

    def check() -> bool:
        with torch.no_grad():
            got = norm(probe)
        tol = 1e-4 * float(expected.abs().max()) + 1e-6
        return bool((got - expected).abs().max() <= tol)

    with torch.no_grad():
        for p in params.values():  # y = w * n(x) (+ b)
            p.mul_(scale)
    if check():
        return restore
    restore()
    with torch.no_grad():  # y = (1 + w) * n(x) (Gemma)
        weight.copy_(scale * (1 + saved["weight"]) - 1)
    if check():
        return restore
    restore()
    raise UnsupportedModelError(
        f"{type(norm).__name__}: scaling its parameters does not scale its output, so a logit "
        "temperature cannot be folded in"
    )


@contextmanager
def temperature_view(model: nn.Module, scale: float | None) -> Iterator[None]:
    """Run ``model`` with the scale folded in, then restore the final norm exactly."""
    if scale is None:
        yield
        return
    restore = apply_temperature(model, scale)
    try:
        yield
    finally:
        restore()


__all__ = [
    "Temperature",
    "apply_temperature",
    "check_temperature",
    "final_norm",
    "fit_temperature",
    "temperature_view",
]
