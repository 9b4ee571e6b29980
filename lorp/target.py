"""Budgets by quality target: the deepest prune whose quality stays within a target.

Instead of a block count, a prune can ask for a quality: ``max_ppl_ratio`` (held-out perplexity
pruned / dense at most this, > 1) or ``min_task_retention`` (average downstream task retention,
pruned / dense accuracy, at least this, in (0, 1]). :class:`QualityTarget` holds one.

The search (:func:`search_depth`) is a scan over the depth: k = 1, 2, ... blocks, each the
selection method's own choice at k blocks (from the one similarity capture the pipeline made),
each measured by the caller's ``measure`` (the pipeline: perplexity on held-out *calibration*
windows, or task retention on task items after the ones the evaluation scores; never the
evaluation data, :func:`lorp.pipeline.find_depth`). It stops at the first depth that misses the
target and chooses the depth before it: quality is close to monotone in the depth (each further
block removed costs quality), so the scan measures k* + 1 depths for a chosen depth k*, and the
curve it returns runs from the dense model to just past the target. A depth beyond a miss that
would meet the target again is not looked for (the choice errs on the safe side).

The pipeline then confirms the choice on the evaluation data in its normal evaluation stage and
steps back one depth at a time (at most :data:`CONFIRM_STEPS` times) while the confirmation
misses the target (:func:`lorp.pipeline.prune`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import BudgetError, InvalidInputError
from .progress import ProgressCallback

__all__ = [
    "CONFIRM_STEPS",
    "TARGET_KINDS",
    "DepthPoint",
    "DepthSearch",
    "QualityTarget",
    "search_depth",
]

#: How many times the pipeline steps back one depth when the confirmation on the evaluation data
#: misses the target.
CONFIRM_STEPS = 2

TargetKind = Literal["max_ppl_ratio", "min_task_retention"]
#: The kinds of target, as a job's budget names them.
TARGET_KINDS: tuple[TargetKind, ...] = ("max_ppl_ratio", "min_task_retention")


@dataclass(frozen=True)
class QualityTarget:
    """A quality the pruned model must keep: ``kind`` ``"max_ppl_ratio"`` (``value`` > 1:
    pruned / dense perplexity at most this) or ``"min_task_retention"`` (``value`` in (0, 1]:
    average task retention at least this). Checked when made (:class:`InvalidInputError`)."""

    kind: TargetKind
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise InvalidInputError(
                f"unknown quality target {self.kind!r}; valid: {', '.join(TARGET_KINDS)}"
            )
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidInputError(f"{self.kind} must be a finite number, got {v!r}")
        if self.kind == "max_ppl_ratio" and not v > 1.0:
            raise InvalidInputError(
                f"max_ppl_ratio must be above 1 (pruned / dense perplexity; 1 allows no loss at "
                f"all), got {v}"
            )
        if self.kind == "min_task_retention" and not 0.0 < v <= 1.0:
            raise InvalidInputError(
                f"min_task_retention must be in (0, 1] (pruned / dense accuracy), got {v}"
            )
        object.__setattr__(self, "value", float(v))

    @property
    def metric(self) -> str:
        """What is measured: ``"ppl_ratio"`` or ``"task_retention"``."""
        return "ppl_ratio" if self.kind == "max_ppl_ratio" else "task_retention"

    def met(self, measured: float | None) -> bool:
        """Whether a measured value meets the target (None or NaN: no)."""
        if measured is None or math.isnan(measured):
            return False
        if self.kind == "max_ppl_ratio":
            return measured <= self.value
        return measured >= self.value

    def describe(self) -> str:
        if self.kind == "max_ppl_ratio":
            return f"perplexity ratio pruned/dense <= {self.value:g}"
        return f"average task retention >= {self.value:g}"

    def to_dict(self) -> dict[str, float]:
        """As a job's budget: ``{kind: value}``."""
        return {self.kind: self.value}


@dataclass(frozen=True)
class DepthPoint:
    """One depth of the search: ``num_remove`` blocks (``removed``, the method's choice),
    the ``value`` measured (the target's metric), whether it ``met`` the target, the pruned
    model's ``quality`` (perplexity, or average accuracy) and the ``seconds`` the selection and
    the measurement took."""

    num_remove: int
    removed: tuple[int, ...]
    value: float
    met: bool
    quality: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_remove": self.num_remove,
            "removed": list(self.removed),
            "value": self.value,
            "met": self.met,
            "quality": self.quality,
            "seconds": self.seconds,
        }


@dataclass
class DepthSearch:
    """What the depth search measured and chose.

    ``points``: the curve, depth 1 up to the first miss (or the deepest allowed); ``dense``: the
    dense model's quality on the same data (perplexity, or average accuracy); ``chosen``: the
    deepest depth before the first miss (0 when even one block misses); ``data``: which data
    (kind, source, windows/items); ``stopped``: why the scan ended; ``confirmations``: the
    pipeline's checks on the evaluation data (depth, value, met; the last one is the result);
    ``seconds``: the search's wall time.
    """

    target: QualityTarget
    points: list[DepthPoint]
    dense: float | None
    chosen: int
    max_remove: int
    stopped: str
    data: dict[str, Any] = field(default_factory=dict)
    confirmations: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def point(self, num_remove: int) -> DepthPoint:
        for p in self.points:
            if p.num_remove == num_remove:
                return p
        raise InvalidInputError(f"depth {num_remove} was not measured")

    @property
    def confirmed(self) -> bool | None:
        """Whether the last confirmation met the target (None: not confirmed yet)."""
        return None if not self.confirmations else bool(self.confirmations[-1]["met"])

    @property
    def final_depth(self) -> int:
        """The depth the prune ended with (the last confirmation's, else the chosen one)."""
        return int(self.confirmations[-1]["num_remove"]) if self.confirmations else self.chosen

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict(),
            "metric": self.target.metric,
            "strategy": "scan: depth 1, 2, ... until the first miss; the depth before it",
            "dense": self.dense,
            "max_remove": self.max_remove,
            "chosen": self.chosen,
            "final": self.final_depth,
            "confirmed": self.confirmed,
            "stopped": self.stopped,
            "data": dict(self.data),
            "curve": [p.to_dict() for p in self.points],
            "confirmations": list(self.confirmations),
            "seconds": self.seconds,
        }


def search_depth(
    target: QualityTarget,
    max_remove: int,
    choose: Callable[[int], Sequence[int]],
    measure: Callable[[Sequence[int]], tuple[float, float | None]],
    *,
    dense: float | None = None,
    data: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    stage: str = "selection",
) -> DepthSearch:
    """Scan depths 1..``max_remove`` (module docstring): ``choose(k)`` is the method's removal
    set at ``k`` blocks, ``measure(removed)`` its ``(value, quality)`` (the target's metric, and
    the pruned model's perplexity or accuracy for the curve). Stops at the first depth that
    misses the target; ``chosen`` is the depth before it. Raises :class:`BudgetError` when even
    one block misses (naming the value measured)."""
    if isinstance(max_remove, bool) or not isinstance(max_remove, int) or max_remove < 1:
        raise BudgetError(f"no depth to search: at most {max_remove} blocks can be removed")
    began = time.perf_counter()
    points: list[DepthPoint] = []
    stopped = f"every depth up to {max_remove} (the most that can be removed) met the target"
    for k in range(1, max_remove + 1):
        start = time.perf_counter()
        removed = tuple(sorted(int(i) for i in choose(k)))
        if len(removed) != k:
            raise InvalidInputError(f"the selection at depth {k} removed {len(removed)} blocks")
        value, quality = measure(removed)
        point = DepthPoint(
            k, removed, float(value), target.met(value), quality, time.perf_counter() - start
        )
        points.append(point)
        if progress is not None:
            progress(
                stage,
                k / max_remove,
                f"depth {k}: {target.metric} {value:.4g} "
                + ("meets" if point.met else "misses")
                + f" the target ({target.describe()})",
            )
        if not point.met:
            stopped = f"depth {k} missed the target ({target.metric} {value:.4g})"
            break
    chosen = points[-1].num_remove - (0 if points[-1].met else 1)  # every point before met
    search = DepthSearch(
        target=target,
        points=points,
        dense=dense,
        chosen=chosen,
        max_remove=max_remove,
        stopped=stopped,
        data=dict(data or {}),
        seconds=time.perf_counter() - began,
    )
    if chosen == 0:
        first = points[0]
        raise BudgetError(
            f"no depth meets the target {target.describe()}: removing one block "
            f"({list(first.removed)}) already gives {target.metric} {first.value:.4g}"
        )
    return search
