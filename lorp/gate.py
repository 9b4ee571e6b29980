"""Quality guard: flags for results far worse than the dense model, and an optional quality gate.

Every prune measures the dense and the pruned model on the same held-out tokens
(:func:`lorp.quality.compare_pruned`): perplexity of each, mean KL(dense || pruned) per
prediction and top-1 next-token agreement. From that measurement:

* :func:`quality_flags` always runs. It flags a result that is far worse than the dense model,
  with fixed thresholds (:data:`FLAG_THRESHOLDS`): perplexity ratio pruned/dense above 2,
  mean KL above 1 nat per token, top-1 agreement below 0.5. A flag is a warning; it stops
  nothing.
* :class:`QualityGate` holds limits the caller chooses. :meth:`QualityGate.check` compares the
  measurement with them; the pipeline raises :class:`lorp.errors.QualityGateError` (code
  ``quality_gate``) when one is broken, before any checkpoint is written. One limit,
  ``min_task_retention``, is on the downstream task accuracy (:mod:`lorp.tasks`): the pruned
  model's average retention (pruned / dense headline accuracy, averaged over the tasks).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from .errors import InvalidInputError
from .quality import QualityComparison

if TYPE_CHECKING:
    from .tasks import TaskComparison

__all__ = ["FLAG_THRESHOLDS", "UNMEASURED", "GateResult", "QualityGate", "quality_flags"]

#: Thresholds of the always-on flags: a value beyond one of them marks the result as far worse
#: than the dense model. ``ppl_ratio`` and ``kl`` flag above, ``top1_agreement`` below.
FLAG_THRESHOLDS: dict[str, float] = {"ppl_ratio": 2.0, "kl": 1.0, "top1_agreement": 0.5}

#: Why a gate with perplexity limits cannot be checked (the pipeline's preflight refuses such a
#: job before any forward pass; :meth:`QualityGate.check` fails the gate with it).
UNMEASURED = (
    "quality limits were set but quality could not be measured: give an evaluation text, or a "
    "calibration text long enough to hold out windows after the calibration windows "
    "(holdout_windows >= 1)"
)


def _measured(quality: QualityComparison) -> dict[str, float]:
    return {
        "ppl_dense": quality.dense.ppl,
        "ppl_pruned": quality.pruned.ppl,
        "ppl_ratio": quality.ppl_ratio,
        "kl": quality.kl,
        "top1_agreement": quality.top1_agreement,
    }


def quality_flags(quality: QualityComparison | None) -> list[dict[str, Any]]:
    """Warnings for a result far worse than the dense model (thresholds: :data:`FLAG_THRESHOLDS`).

    Each flag is ``{"code", "metric", "value", "threshold", "message"}``. Without a measurement the
    single flag ``quality_not_measured`` is returned.
    """
    if quality is None:
        return [
            {
                "code": "quality_not_measured",
                "metric": None,
                "value": None,
                "threshold": None,
                "message": "quality was not measured (no evaluation text and no calibration text "
                "left over for held-out windows)",
            }
        ]
    flags = []
    ratio = quality.ppl_ratio
    limit = FLAG_THRESHOLDS["ppl_ratio"]
    if not ratio <= limit:  # also flags NaN
        flags.append(
            {
                "code": "perplexity_ratio_high",
                "metric": "ppl_ratio",
                "value": ratio,
                "threshold": limit,
                "message": f"perplexity {quality.dense.ppl:.2f} -> {quality.pruned.ppl:.2f} is "
                f"{ratio:.2f}x the dense model's (flagged above {limit:g}x)",
            }
        )
    limit = FLAG_THRESHOLDS["kl"]
    if not quality.kl <= limit:
        flags.append(
            {
                "code": "kl_high",
                "metric": "kl",
                "value": quality.kl,
                "threshold": limit,
                "message": f"mean KL(dense || pruned) {quality.kl:.3f} nats per token "
                f"(flagged above {limit:g})",
            }
        )
    limit = FLAG_THRESHOLDS["top1_agreement"]
    if not quality.top1_agreement >= limit:
        flags.append(
            {
                "code": "top1_agreement_low",
                "metric": "top1_agreement",
                "value": quality.top1_agreement,
                "threshold": limit,
                "message": f"the pruned model's top-1 next token agrees with the dense model's "
                f"on {100 * quality.top1_agreement:.1f}% of tokens (flagged below "
                f"{100 * limit:g}%)",
            }
        )
    return flags


@dataclass(frozen=True)
class GateResult:
    """The outcome of :meth:`QualityGate.check`. ``measured`` is empty when nothing was measured."""

    passed: bool
    limits: dict[str, float]
    measured: dict[str, float]
    violations: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        if self.passed:
            return "quality gate passed"
        return "quality gate failed: " + "; ".join(self.violations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "limits": dict(self.limits),
            "measured": dict(self.measured),
            "violations": list(self.violations),
        }


def _limit(name: str, value: Any, low: float, high: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"quality gate {name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or (high is not None and v > high):
        bound = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
        raise InvalidInputError(f"quality gate {name} must be {bound}, got {value!r}")
    return v


@dataclass(frozen=True)
class QualityGate:
    """Limits a pruned model must meet on the held-out measurement, or the job is refused.

    ``max_ppl_ratio``: highest allowed pruned/dense perplexity ratio (>= 1, e.g. 1.5);
    ``max_kl``: highest allowed mean KL(dense || pruned) in nats per token (>= 0);
    ``min_top1_agreement``: lowest allowed top-1 next-token agreement (0..1);
    ``min_task_retention``: lowest allowed average downstream task retention (pruned / dense
    headline accuracy averaged over the tasks, 0..1; needs tasks, :mod:`lorp.tasks`).
    ``None`` means no limit on that metric; a gate with no limit at all always passes.
    """

    max_ppl_ratio: float | None = None
    max_kl: float | None = None
    min_top1_agreement: float | None = None
    min_task_retention: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "max_ppl_ratio", _limit("max_ppl_ratio", self.max_ppl_ratio, 1.0, None)
        )
        object.__setattr__(self, "max_kl", _limit("max_kl", self.max_kl, 0.0, None))
        object.__setattr__(
            self,
            "min_top1_agreement",
            _limit("min_top1_agreement", self.min_top1_agreement, 0.0, 1.0),
        )
        object.__setattr__(
            self,
            "min_task_retention",
            _limit("min_task_retention", self.min_task_retention, 0.0, 1.0),
        )

    @property
    def active(self) -> bool:
        """Whether any limit is set."""
        return any(getattr(self, f.name) is not None for f in fields(self))

    def limits(self) -> dict[str, float]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def to_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityGate:
        if not isinstance(data, dict):
            raise InvalidInputError(f"a quality gate must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown quality gate field(s): {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @property
    def needs_perplexity(self) -> bool:
        """Whether a limit is on the held-out perplexity measurement."""
        return any(
            v is not None for v in (self.max_ppl_ratio, self.max_kl, self.min_top1_agreement)
        )

    def check(
        self,
        quality: QualityComparison | None,
        where: str = "",
        tasks: TaskComparison | None = None,
    ) -> GateResult:
        """Compare a measurement with the limits. ``where`` (e.g. "held-out calibration windows,
        8 x 512 tokens") is appended to a failure message; ``tasks``: the downstream task
        comparison ``min_task_retention`` is checked on. A limit whose measurement is missing
        fails the gate (as does an undefined retention: a task the dense model scored 0 on)."""
        limits = self.limits()
        suffix = f" (measured on {where})" if where else ""
        violations: list[str] = []
        m: dict[str, float] = {}
        if self.min_task_retention is not None:
            violations += self._check_tasks(tasks, m)
        if not self.needs_perplexity:
            return GateResult(
                passed=not violations, limits=limits, measured=m, violations=violations
            )
        if quality is None:
            violations.insert(0, UNMEASURED)
            return GateResult(passed=False, limits=limits, measured=m, violations=violations)
        task_violations, violations = violations, []
        m = {**_measured(quality), **m}
        if self.max_ppl_ratio is not None and not m["ppl_ratio"] <= self.max_ppl_ratio:
            violations.append(
                f"perplexity ratio {m['ppl_ratio']:.3f} > max {self.max_ppl_ratio:g} "
                f"(dense {m['ppl_dense']:.3f}, pruned {m['ppl_pruned']:.3f}){suffix}"
            )
        if self.max_kl is not None and not m["kl"] <= self.max_kl:
            violations.append(f"mean KL {m['kl']:.4f} nats > max {self.max_kl:g}{suffix}")
        if self.min_top1_agreement is not None and not (
            m["top1_agreement"] >= self.min_top1_agreement
        ):
            violations.append(
                f"top-1 agreement {m['top1_agreement']:.4f} < min "
                f"{self.min_top1_agreement:g}{suffix}"
            )
        violations += task_violations
        return GateResult(passed=not violations, limits=limits, measured=m, violations=violations)

    def _check_tasks(self, tasks: TaskComparison | None, measured: dict[str, float]) -> list[str]:
        """``min_task_retention`` against ``tasks``; adds the averages to ``measured``."""
        if tasks is None:
            return [
                "min_task_retention was set but downstream task accuracy was not measured "
                "(give tasks)"
            ]
        dense, pruned = tasks.dense.average, tasks.pruned.average
        measured.update(task_accuracy_dense=dense, task_accuracy_pruned=pruned)
        retention = tasks.average_retention
        names = ", ".join(tasks.dense.tasks)
        items = sorted({s.n for s in tasks.dense.tasks.values()})
        on = f"{names}; {'/'.join(map(str, items))} items each"
        if retention is None:
            zero = [n for n, s in tasks.dense.tasks.items() if s.score <= 0]
            return [
                f"average task retention is undefined: the dense model scored 0 on "
                f"{', '.join(zero)} (measured on {on})"
            ]
        measured["task_retention"] = retention
        if retention >= float(self.min_task_retention or 0.0):
            return []
        return [
            f"average task retention {retention:.3f} < min {self.min_task_retention:g} "
            f"(dense {dense:.3f}, pruned {pruned:.3f} average accuracy on {on})"
        ]
