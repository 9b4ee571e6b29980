"""Healing the folded maps: a short distillation of the compensation's linear maps alone.

:mod:`lorp.compensation` fits one d x d map T per removed run by least squares on hidden states
and folds ``I + s (T - I)`` into the down projection of the block before the run. Healing then
trains exactly those maps (and nothing else) to make the pruned model's next-token distribution
match the dense model's: the loss is the mean KL(dense || pruned) per prediction on calibration
windows (the compensation's fit windows; never the evaluation text).

What is trained: each map as a *full* d x d float32 matrix (the master copy, on the device of
the layer it is folded into), started from the folded map. During training the layer stays as
it was and its output is multiplied by the map (a forward hook: ``(x W^T + b) T`` is what the
folded layer ``T^T W, b T`` computes); every parameter of the model has ``requires_grad``
False, and no parameter gets a gradient (checked). At the end the best maps are returned as the
compensation's maps at strength 1, and :func:`lorp.compensation.apply_compensation` folds them
once, computed in float64 and written in the model's dtype: the checkpoint keeps the standard
architecture (one changed matrix per run, no new module).

The dense logits are computed once per window (teacher; host memory bounded by
:data:`TEACHER_BYTES`: the loss is taken at every k-th position, k as small as fits). Each step
is one batch of training windows (in a seeded random order) through the pruned model; every
:data:`EVAL_EVERY` steps the same KL is measured on held-out calibration windows (the
compensation's tune windows); training stops early after :data:`PATIENCE` measurements without
a new lowest, and the maps of the lowest are kept (the maps as folded when none beat them).
When the capture kept the dense block inputs of these windows (:class:`lorp.inputs.BlockInputs`),
every pass starts at the first block the fold changes, from its stored input.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ._forward import check_windows, head_at, input_device
from .compensation import Compensation, folded_layers
from .errors import InvalidInputError, LorpError
from .inputs import BlockInputs, resumed
from .methods import HEAL_EVAL_EVERY, HEAL_LR, MAX_HEAL_STEPS
from .progress import ProgressCallback
from .surgery import pruned_view

#: Adam's learning rate on the maps (entries of a near-identity d x d matrix).
DEFAULT_HEAL_LR = HEAL_LR
#: Held-out KL measured every this many steps (and after the last).
EVAL_EVERY = HEAL_EVAL_EVERY
#: Measurements without a new lowest held-out KL before training stops.
PATIENCE = 2
#: Host memory for the dense model's log-probabilities (teacher) over all windows.
TEACHER_BYTES = 512 << 20
#: Gradient norm clip of one step (over all maps).
CLIP_NORM = 1.0
_SEED = 0

STAGE = "healing"


def check_heal_options(steps: Any, lr: Any) -> None:
    """Raise :class:`InvalidInputError` unless ``steps`` is an integer in
    0..:data:`MAX_HEAL_STEPS` and ``lr`` a finite number > 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_HEAL_STEPS:
        raise InvalidInputError(
            f"heal_steps must be an integer from 0 to {MAX_HEAL_STEPS}, got {steps!r}"
        )
    if (
        isinstance(lr, bool)
        or not isinstance(lr, int | float)
        or not math.isfinite(float(lr))
        or not lr > 0
    ):
        raise InvalidInputError(f"heal_lr must be a finite number > 0, got {lr!r}")


def _vocab(model: nn.Module) -> int:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise InvalidInputError("healing needs a model with an output embedding")
    return int(weight.shape[0])


@contextlib.contextmanager
def _mapped(layers: dict[int, nn.Linear], maps: dict[int, torch.Tensor]) -> Iterator[None]:
    """Every layer's output multiplied by its map (in float32, cast back to the layer's dtype):
    what the layer with the map folded in computes."""

    def make(t: torch.Tensor) -> Callable[..., torch.Tensor]:
        def hook(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            return (out.float() @ t).to(out.dtype)

        return hook

    handles = [layers[b].register_forward_hook(make(maps[b])) for b in maps]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Windows:
    """Token windows, their stored dense inputs at the start block (or None), and the dense
    model's log-probabilities at ``positions`` (computed once, kept on the host)."""

    def __init__(self, ids: torch.Tensor, states: torch.Tensor | None) -> None:
        self.ids = ids
        self.states = states
        self.teacher: torch.Tensor | None = None

    def rows(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.ids[list(rows)], None if self.states is None else self.states[list(rows)]


def heal_maps(
    model: nn.Module,
    compensation: Compensation,
    train: torch.Tensor,
    held_out: torch.Tensor,
    *,
    steps: int,
    lr: float = DEFAULT_HEAL_LR,
    batch_size: int = 1,
    inputs: BlockInputs | None = None,
    progress: ProgressCallback | None = None,
) -> Compensation:
    """Train the folded maps of ``compensation`` for at most ``steps`` steps to minimise
    KL(dense || pruned) on the calibration windows ``train`` ``[W, T]``, stopping early on the
    same loss over ``held_out`` (calibration windows not trained on); see the module. Returns
    the compensation with the best maps (strength 1) and ``healing`` (what was done); with
    ``steps`` 0 the compensation unchanged. The model is left as it was (weights,
    ``requires_grad`` flags, train/eval mode)."""
    check_heal_options(steps, lr)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    train, held_out = check_windows(train), check_windows(held_out)
    if steps == 0:
        return compensation
    if not compensation.maps:
        raise InvalidInputError(
            "nothing to heal: the compensation has no folded maps (no removed run has a block "
            "before it)"
        )
    if train.shape[1] < 2 or held_out.shape[1] != train.shape[1]:
        raise InvalidInputError("healing windows need at least 2 tokens, the same for all")
    started = time.perf_counter()
    layers = folded_layers(model, compensation)
    removed = list(compensation.removed)
    start = min([*compensation.maps, *removed])
    n, seq = int(train.shape[0]), int(train.shape[1])
    total = n + int(held_out.shape[0])
    per_window = (seq - 1) * _vocab(model) * 4
    stride = max(1, math.ceil(total * per_window / TEACHER_BYTES))
    positions = torch.arange(0, seq - 1, stride)
    device = input_device(model)

    def stored(windows: torch.Tensor) -> torch.Tensor | None:
        return None if inputs is None or start == 0 else inputs.of(start, windows)

    sets = {
        "train": _Windows(train, stored(train)),
        "held_out": _Windows(held_out, stored(held_out)),
    }

    def log_probs(
        ids: torch.Tensor, states: torch.Tensor | None, skip: Sequence[int]
    ) -> torch.Tensor:
        if states is not None:
            held = states
            view: contextlib.AbstractContextManager[None] = resumed(
                model, skip, start, lambda: held
            )
        else:
            view = pruned_view(model, skip) if skip else contextlib.nullcontext()
        with view, head_at(model, positions):
            logits = model(input_ids=ids.to(device), use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1)

    def kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        p = teacher.to(student.device)
        return (p.exp() * (p - student)).sum(-1).mean()

    s = compensation.strength
    maps = {
        b: torch.lerp(torch.eye(t.shape[0], dtype=t.dtype), t.cpu(), s)
        .float()
        .to(layers[b].weight.device)
        .requires_grad_(True)
        for b, t in compensation.maps.items()
    }
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        with torch.no_grad():  # the dense model's log-probabilities, once per window
            for name, ws in sets.items():
                parts = []
                for lo in range(0, int(ws.ids.shape[0]), batch_size):
                    ids, states = ws.rows(range(lo, min(lo + batch_size, int(ws.ids.shape[0]))))
                    parts.append(log_probs(ids, states, []).cpu())
                ws.teacher = torch.cat(parts)
                if progress is not None:
                    progress(STAGE, 0.0, f"dense log-probabilities of the {name} windows")

        def held_out_kl() -> float:
            ws = sets["held_out"]
            assert ws.teacher is not None
            total_kl = 0.0
            with torch.no_grad(), _mapped(layers, maps):
                for lo in range(0, int(ws.ids.shape[0]), batch_size):
                    rows = range(lo, min(lo + batch_size, int(ws.ids.shape[0])))
                    ids, states = ws.rows(rows)
                    student = log_probs(ids, states, removed)
                    total_kl += float(kl(ws.teacher[list(rows)], student)) * len(rows)
            return total_kl / int(ws.ids.shape[0])

        before = held_out_kl()
        best, best_step = before, 0
        best_maps = {b: t.detach().clone() for b, t in maps.items()}
        optimizer = torch.optim.Adam(list(maps.values()), lr=float(lr))
        generator = torch.Generator().manual_seed(_SEED)
        order: list[int] = []
        curve: list[dict[str, Any]] = [{"step": 0, "held_out_kl": before}]
        train_kl: list[float] = []
        stopped: int | None = None
        misses = 0
        step = 0
        ws = sets["train"]
        assert ws.teacher is not None
        for step in range(1, steps + 1):
            if not order:
                order = torch.randperm(n, generator=generator).tolist()
            rows = [order.pop() for _ in range(min(batch_size, len(order)))]
            ids, states = ws.rows(rows)
            with _mapped(layers, maps):
                loss = kl(ws.teacher[rows], log_probs(ids, states, removed))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(maps.values()), CLIP_NORM)
            optimizer.step()
            train_kl.append(float(loss.detach()))
            if step % EVAL_EVERY == 0 or step == steps:
                value = held_out_kl()
                recent = train_kl[-EVAL_EVERY:]
                curve.append(
                    {"step": step, "train_kl": sum(recent) / len(recent), "held_out_kl": value}
                )
                if value < best:
                    best, best_step, misses = value, step, 0
                    best_maps = {b: t.detach().clone() for b, t in maps.items()}
                else:
                    misses += 1
                    if misses >= PATIENCE and step < steps:
                        stopped = step
                        break
            if progress is not None:
                progress(STAGE, step / steps, f"step {step}: train KL {train_kl[-1]:.4f}")
        if any(p.grad is not None for p, _ in flags):
            raise LorpError("healing gave a gradient to a frozen model parameter")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    info = {
        "trained": "full d x d map per removed run (the folded correction), float32 master",
        "blocks": sorted(maps),
        "steps": steps,
        "steps_run": step,
        "early_stop_step": stopped,
        "best_step": best_step,
        "lr": float(lr),
        "train_windows": n,
        "held_out_windows": int(held_out.shape[0]),
        "seq_len": seq,
        "position_stride": stride,
        "held_out_kl_before": before,
        "held_out_kl_after": best,
        "train_kl_first": train_kl[0] if train_kl else None,
        "train_kl_last": train_kl[-1] if train_kl else None,
        "curve": curve,
        "strength_before": s,
        "stored_inputs": all(ws.states is not None for ws in sets.values()),
        "frozen_verified": True,
        "seconds": time.perf_counter() - started,
    }
    if best_step == 0:  # no step beat the maps as folded: keep them
        return replace(compensation, healing=info)
    healed = {b: t.detach().double().cpu() for b, t in best_maps.items()}
    return replace(compensation, maps=healed, strength=1.0, healing=info)


__all__ = [
    "DEFAULT_HEAL_LR",
    "EVAL_EVERY",
    "MAX_HEAL_STEPS",
    "PATIENCE",
    "TEACHER_BYTES",
    "check_heal_options",
    "heal_maps",
]
