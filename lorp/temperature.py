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
    """Raise :class:`UnsupportedModelError` unless a temperature can be fitted and folded: a
    linear head without a bias, no soft-capping, a final norm whose parameters scale its output
    in the model's dtype (the fold and its check of :func:`apply_temperature`, at scale 1,
    undone at once; a few norm calls on a 4-token probe), so a job is refused before its
    calibration, not after the fit."""
    _head(model)
    final_norm(model)
    apply_temperature(model, 1.0)()


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


#: The fold's self-check allows ``FOLD_ULPS`` machine epsilons (``torch.finfo(dtype).eps``) of
#: error per element, relative to the terms the roundings act on (see :func:`fold_error_ok`).
FOLD_ULPS = 4.0
#: The factor of the probe that tells the parametrisations apart: scaling by 2 is exact in
#: every float format, and the two forms then differ by the whole normalised input.
_PROBE_FACTOR = 2.0
# How the norm's output depends on its weight w (other parameters, a bias, scale with it):
# "scaled" y = w * n(x) (+ b); "offset" y = (1 + w) * n(x) (Gemma).
_FORMS = ("scaled", "offset")


def rounding_eps(*dtypes: torch.dtype) -> float:
    """Machine epsilon of the coarsest of ``dtypes`` (float32 eps 1.2e-7, bfloat16 7.8e-3,
    float16 9.8e-4): the unit the numerical self-checks scale their tolerances by."""
    return max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)


def fold_error_ok(
    got: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, eps: float
) -> bool:
    """Whether ``got`` matches ``expected`` element by element within ``FOLD_ULPS * eps`` times
    ``magnitude`` (the size of the terms whose rounding makes the error: the output itself and
    the products of the rounded weights), plus a floor of ``1e-6 * eps`` times the largest
    magnitude (for elements that are all but zero)."""
    got, expected, magnitude = _wide(got), _wide(expected), _wide(magnitude)
    if not bool(torch.isfinite(got).all()):
        return False
    floor = eps * float(magnitude.abs().max()) * 1e-6
    return bool(((got - expected).abs() <= FOLD_ULPS * eps * magnitude.abs() + floor).all())


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _fold_values(
    saved: dict[str, torch.Tensor], form: str, scale: float
) -> dict[str, torch.Tensor]:
    """The norm's parameters with ``scale`` folded in, computed in float32 (or the parameter's
    dtype when wider) and cast once to each parameter's dtype."""
    out: dict[str, torch.Tensor] = {}
    for name, value in saved.items():
        v = _wide(value)
        offset = name == "weight" and form == "offset"  # s (1 + w) = 1 + (s (1 + w) - 1)
        out[name] = (scale * (1.0 + v) - 1.0 if offset else scale * v).to(value.dtype)
    return out


def _identity_values(saved: dict[str, torch.Tensor], form: str) -> dict[str, torch.Tensor]:
    """Parameters that make the norm output its normalised input n(x) (weight 1, or 0 in the
    offset form; everything else 0)."""
    one = 1.0 if form == "scaled" else 0.0
    return {
        name: torch.full_like(value, one if name == "weight" else 0.0)
        for name, value in saved.items()
    }


def apply_temperature(model: nn.Module, scale: float) -> Callable[[], None]:
    """Fold the logit ``scale`` into the final norm; returns a function restoring it exactly.

    Which parametrisation the norm has (``w * n(x) + b``, or Gemma's ``(1 + w) * n(x)``) is
    found with a probe that doubles the output (exact in every float format, and the two forms
    then differ by the whole normalised input, whatever ``scale`` is: a scale near 1 cannot
    tell them apart in bfloat16). The fold itself is computed in float32 from the saved
    parameters and written once in their dtype, then checked on a random input: the output
    must be ``scale`` times the original within :data:`FOLD_ULPS` machine epsilons of the
    coarsest of the weights', the output's and float32 (:func:`fold_error_ok`), relative to the
    terms the roundings act on (the output, the folded bias; Gemma's folded weight times the
    normalised input). In float32 that is about 5e-7 relative; in bfloat16 about 3e-2 (the
    original output, the folded weights and the folded output are each rounded once to 8
    significant bits, 3.9e-3 relative each: at most 1.2e-2 together)."""
    if not math.isfinite(scale) or scale <= 0:
        raise InvalidInputError(f"a temperature scale must be a positive number, got {scale!r}")
    _head(model)
    norm = final_norm(model)
    params = dict(norm.named_parameters(recurse=False))
    saved = {name: p.detach().clone() for name, p in params.items()}
    weight = params["weight"]
    generator = torch.Generator().manual_seed(0)  # a fixed probe; the global RNG is left alone
    probe = torch.randn(4, weight.shape[-1], generator=generator).to(weight.device, weight.dtype)

    def put(values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(values[name])

    def output(values: dict[str, torch.Tensor]) -> torch.Tensor:
        put(values)
        with torch.no_grad():
            return norm(probe)

    def restore() -> None:
        put(saved)

    def matches(form: str, factor: float, original: torch.Tensor) -> bool:
        """Whether folding ``factor`` in ``form`` scales the output by it. The error bound
        (one rounding of each of: the original output, the folded output, every folded
        parameter) is taken relative to the output and the folded bias; in the offset form
        also to the folded weight times n(x) (rounding ``w'`` moves ``1 + w'`` by ``u |w'|``).
        The wrong form misses by ``(factor - 1) n(x)``: it passes only where every element
        of ``1 + w`` exceeds ``1 / (2 FOLD_ULPS eps)`` (16 in bfloat16), and then folding
        ``s w`` instead of ``s (1 + w) - 1`` is off by less than that share of ``s - 1``."""
        expected = factor * _wide(original)
        magnitude = expected.abs()
        folded = _fold_values(saved, form, factor)
        for name, value in folded.items():
            if name != "weight":
                magnitude = magnitude + _wide(value).abs()
        if form == "offset":
            normalised = _wide(output(_identity_values(saved, form)))
            magnitude = magnitude + (_wide(folded["weight"]) * normalised).abs()
        got = output(folded)
        # norms compute in float32 at least, some in float32 only (Gemma's casts its float64
        # weight to float32): the tolerance is never below float32's
        eps = rounding_eps(weight.dtype, original.dtype, torch.float32)
        return fold_error_ok(got, expected, magnitude, eps)

    with torch.no_grad():
        original = norm(probe)
    try:
        form = next((f for f in _FORMS if matches(f, _PROBE_FACTOR, original)), None)
        if form is not None and matches(form, scale, original):
            return restore
    except BaseException:
        restore()
        raise
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
    "FOLD_ULPS",
    "Temperature",
    "apply_temperature",
    "check_temperature",
    "final_norm",
    "fit_temperature",
    "fold_error_ok",
    "rounding_eps",
    "temperature_view",
]
