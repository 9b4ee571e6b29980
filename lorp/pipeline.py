"""The whole pruning job: calibrate, select, measure, remove, save, report.

``prune`` works on a model already in memory (the Python API); ``run_pipeline`` adds loading,
saving the checkpoint and writing the reports (the CLI's ``lorp prune`` and the service worker).

Stages (:data:`STAGES`; each but loading, saving and report is a public function here, which
the benchmarks call too, and ``prune`` is their sequence): :func:`preflight` (budget and
corrections checked before any forward pass), :func:`calibrate` (calibration windows, S and
the dense block inputs kept for the corrections: :class:`Calibration`), :func:`select_blocks`
(the method's choice, with :func:`draw_scoring`'s scoring windows for a model-in-the-loop
method: :class:`Choice`), :func:`compensate` and :func:`fit_logit_scale` (the corrections:
:class:`~lorp.compensation.Compensation`), :func:`evaluate` (dense vs pruned, flags and the
quality gate: :class:`Evaluation`), :func:`measure_speed` (the benchmark) and :func:`remove`
(the surgery). A :class:`StageTimer` times them and forwards their progress
(:data:`lorp.progress.ProgressCallback`).

Token windows drawn from a calibration *text* (never overlapping, in this order):
1. ``windows`` × ``seq_len`` calibration windows (similarity matrix S);
2. for the model-in-the-loop methods (the registry's methods with ``needs_model``:
   ``sleb``, ``lorp-kl``, ``lorp-loss``, ``auto``; :mod:`lorp.methods`, :mod:`lorp.search`)
   ``score_windows`` × ``score_seq_len`` scoring windows that follow them;
3. when no evaluation text is given, ``holdout_windows`` × ``seq_len`` held-out windows after
   those, on which dense and pruned quality are measured.
4. with a ``target_ppl_ratio`` budget, ``holdout_windows`` × ``seq_len`` windows after the
   scoring windows on which the depth search measures each depth (:func:`find_depth`); the
   held-out windows of 3. then follow these.
The evaluation text is only ever used for the quality measurement, never for choosing blocks.

Budgets by quality target (``target_ppl_ratio`` / ``target_task_retention``, :mod:`lorp.target`):
:func:`find_depth` replaces the selection stage: one capture, the method's choice at 1, 2, ...
blocks, each measured on held-out calibration windows (or task items the evaluation does not
score) until the first depth that misses the target; the deepest before it is chosen. The
corrections (compensation, temperature) are fitted once, for the chosen depth, not for every
depth searched: the search measures the plain selection (the fold's strength is tuned on
calibration loss, :func:`lorp.compensation.tune_strength`, 0 = plain removal, so on
calibration-like text the choice errs on the safe side; on other text the fold can lose, which
the confirmation measures). The evaluation stage then confirms the target on the evaluation data
(the saved, folded model); when it misses, the prune steps back one depth (refitting the
corrections) at most :data:`lorp.target.CONFIRM_STEPS` times, and a last miss is flagged
(``target_not_confirmed``).

Compensation (``config.compensate``, :mod:`lorp.compensation`): after the selection, one linear
map per removed run of blocks is fitted on the first ``compensation_windows`` calibration
windows and folded into the down projection of the block before the run, at the smallest
strength whose loss on the next ``compensation_tune_windows`` calibration windows is within one
standard error of the lowest (:func:`lorp.compensation.tune_strength`); with ``heal_steps``, the
folded maps are then trained alone on the fit windows to match the dense logits, stopping early
on the tune windows (:func:`heal`, :mod:`lorp.heal`); the quality measured is
the compensated pruned model's, and the checkpoint carries the folded weights. The capture
keeps the dense block inputs of the windows these fits use (and the temperature's) within
:data:`STORED_INPUT_BYTES`, so they start mid-model (:mod:`lorp.inputs`).

Quality guard (:mod:`lorp.gate`): every prune that could measure quality reports perplexity
(dense and pruned), KL(dense || pruned), top-1 agreement and flags for results far worse than
the dense model. With ``config.quality_gate`` set, a broken limit raises
:class:`~lorp.errors.QualityGateError` right after the measurement: ``prune`` leaves the model
unpruned, ``run_pipeline`` writes no checkpoint but still writes the reports (``report.json``
with ``summary.status = "refused"`` and the gate result) so the refusal can be explained. The
error carries the refused result (``.result``) and, from ``run_pipeline``, the refusal report
and its job summary (``.report``, ``.summary``).

Downstream tasks (``config.tasks``, :mod:`lorp.tasks`): the evaluation stage also scores the
dense model and the same model under the pruned (and compensated) view on the first
``task_limit`` items of each ``<task_data_dir>/<task>.jsonl``, zero-shot as lm-evaluation-harness
does; retention (pruned / dense headline accuracy) per task and averaged goes into the report,
and ``quality_gate.min_task_retention`` can refuse the result. The caller gives the data
directory (lorp never looks for one); :func:`preflight` reads the items before any forward pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._blocks import num_blocks
from ._forward import check_windows, input_device
from .bench import BenchmarkConfig, BenchmarkResult, benchmark
from .compensation import (
    Compensation,
    apply_compensation,
    check_compensable,
    fit_folded_temperature,
    fit_tuned_compensation,
    temperature_only,
)
from .data import prepends_bos, text_windows
from .errors import (
    OFFLOAD_HINT,
    BudgetError,
    InvalidInputError,
    LorpError,
    QualityGateError,
    UnsupportedModelError,
    out_of_memory,
)
from .gate import UNMEASURED, GateResult, QualityGate, quality_flags
from .heal import DEFAULT_HEAL_LR, check_heal_options, heal_maps
from .inputs import BlockInputs, hidden_bytes
from .methods import get_method, method_names, selector
from .offload import (
    OffloadDecision,
    check_offload,
    choose_offload,
    onloader_of,
    onloading,
    parameter_bytes,
    prepare,
    working_margin,
)
from .progress import STAGES, ProgressCallback
from .quality import QualityComparison, compare_pruned
from .report import job_summary, make_report, write_reports
from .scoring import WindowScorer
from .search import pass_budget, search_layers
from .selection import Selection, check_num_clusters, resolve_budget, select_layers
from .similarity import capture_similarity
from .surgery import check_removable, pruned_view, remove_blocks
from .target import CONFIRM_STEPS, DepthSearch, QualityTarget, search_depth
from .tasks import (
    TaskComparison,
    TaskScores,
    check_encodable,
    compare_scores,
    compare_tasks,
    load_task,
    parse_tasks,
    score_items,
)
from .temperature import check_temperature

# The capture keeps the calibration windows' block inputs that the compensation and temperature
# fits start from (lorp.inputs.BlockInputs) within this many bytes (the groups that fit).
STORED_INPUT_BYTES = 1 << 30
#: Task sequences per forward pass in the evaluation stage: the evaluation's token budget per
#: pass (``batch_size`` x ``eval_seq_len``) over this many tokens (a typical task sequence;
#: BoolQ's passages run longer), at least one.
TASK_TOKENS_PER_ROW = 128


@dataclass
class PruneConfig:
    """What to prune and how to measure it. Exactly one budget: ``num_remove`` (blocks),
    ``fraction`` (of the blocks), or a quality target (:mod:`lorp.target`, the depth searched):
    ``target_ppl_ratio`` (held-out perplexity pruned / dense at most this, > 1) or
    ``target_task_retention`` (average task retention at least this, in (0, 1]; needs
    ``tasks``; the search scores ``target_task_items`` items of each task after the first
    ``task_limit``, which the evaluation scores)."""

    method: str = "lorp"
    num_remove: int | None = None
    fraction: float | None = None
    target_ppl_ratio: float | None = None
    target_task_retention: float | None = None
    target_task_items: int = 50
    num_clusters: int | None = None
    windows: int = 32
    seq_len: int = 512
    batch_size: int = 1
    eval_windows: int = 64
    eval_seq_len: int = 512
    holdout_windows: int = 8  # calibration windows held out for quality when no evaluation text
    benchmark: BenchmarkConfig | None = None
    # model-in-the-loop methods (sleb, lorp-kl, lorp-loss, auto): scoring windows after the
    # calibration ones; None takes the method's default (its ``scoring`` in lorp.methods)
    score_windows: int | None = None
    score_seq_len: int | None = None
    search_candidates: int = 3  # lorp-kl: candidates measured per removal slot
    quality_gate: QualityGate | None = None
    # fold a fitted linear stand-in for every removed run into the block before it
    # (lorp.compensation); fitted on the first compensation_windows calibration windows
    compensate: bool = False
    compensation_windows: int = 12
    # how much of the maps to fold, chosen by the loss on the next compensation_tune_windows
    # calibration windows (lorp.compensation.tune_strength); 0: fold the maps as fitted
    compensation_tune_windows: int = 2
    # then train the folded maps alone for at most heal_steps steps to match the dense model's
    # logits on the fit windows, stopping early on the tune windows (lorp.heal); 0: off
    heal_steps: int = 0
    heal_lr: float = DEFAULT_HEAL_LR
    # fit the pruned (and compensated) model's logit scale and fold it into the final norm
    # (lorp.temperature); fitted on the last temperature_windows calibration windows
    temperature: bool = False
    temperature_windows: int = 4
    # zero-shot downstream accuracy (lorp.tasks), dense and pruned, in the evaluation stage: the
    # first task_limit items (None: all) of each <task_data_dir>/<task>.jsonl
    tasks: tuple[str, ...] = ()
    task_limit: int | None = 200
    task_data_dir: str | Path | None = None
    # models larger than the device (lorp.offload): "sequential" runs the passes layer-wise,
    # one block on the device at a time; "auto" does when the weights + a working margin exceed
    # the device's free memory or max_device_memory (bytes; on CPU the only limit); "none" never
    offload: str = "auto"
    max_device_memory: int | None = None

    def __post_init__(self) -> None:
        info = get_method(self.method)  # unknown: lists the valid ones
        check_offload(self.offload, self.max_device_memory)
        if self.num_clusters is not None and not info.takes_clusters:
            takes = ", ".join(method_names(takes_clusters=True))
            raise InvalidInputError(
                f"num_clusters only applies to methods {takes}, not {self.method!r}"
            )
        budgets = (
            self.num_remove,
            self.fraction,
            self.target_ppl_ratio,
            self.target_task_retention,
        )
        if sum(b is not None for b in budgets) != 1:
            raise InvalidInputError(
                "give exactly one budget: num_remove (blocks), fraction, target_ppl_ratio or "
                "target_task_retention"
            )
        target = self.quality_target  # checks the value
        if self.num_remove is not None and (
            isinstance(self.num_remove, bool) or not isinstance(self.num_remove, int)
        ):
            raise InvalidInputError(f"num_remove must be an integer, got {self.num_remove!r}")
        if self.fraction is not None and not (0.0 < float(self.fraction) < 1.0):
            raise InvalidInputError(
                f"fraction must be between 0 and 1 (exclusive), got {self.fraction}"
            )
        for name in (
            "windows",
            "seq_len",
            "batch_size",
            "eval_windows",
            "eval_seq_len",
            "score_windows",
            "score_seq_len",
            "search_candidates",
            "compensation_windows",
            "temperature_windows",
            "target_task_items",
        ):
            value = getattr(self, name)
            if value is None and name in ("score_windows", "score_seq_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        for flag in ("compensate", "temperature"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidInputError(
                    f"{flag} must be true or false, got {getattr(self, flag)!r}"
                )
        if self.seq_len < 2 or self.eval_seq_len < 2 or self.scoring_shape[1] < 2:
            raise InvalidInputError("sequence lengths must be at least 2 tokens")
        for name in ("holdout_windows", "compensation_tune_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"{name} must be an integer >= 0, got {value!r}")
        if info.fold is not None:  # a selection with corrections on
            self.compensate = self.compensate or info.fold.compensate
            self.temperature = self.temperature or info.fold.temperature
        check_heal_options(self.heal_steps, self.heal_lr)
        if self.heal_steps:
            if not self.compensate:
                raise InvalidInputError(
                    f"healing trains the folded maps, and method {self.method!r} folds none: "
                    "use lorp-fold or compensate=True"
                )
            if self.compensation_tune_windows < 1:
                raise InvalidInputError(
                    "healing stops early on the compensation's tune windows: "
                    "compensation_tune_windows must be at least 1"
                )
            if self.windows < self.compensation_windows + self.compensation_tune_windows:
                raise InvalidInputError(
                    f"healing trains on the first compensation_windows and stops early on the "
                    f"next compensation_tune_windows calibration windows: windows "
                    f"({self.windows}) must be at least {self.compensation_windows} + "
                    f"{self.compensation_tune_windows}"
                )
        if isinstance(self.benchmark, dict):
            self.benchmark = BenchmarkConfig.from_dict(self.benchmark)
        if isinstance(self.quality_gate, dict):
            self.quality_gate = QualityGate.from_dict(self.quality_gate)
        elif self.quality_gate is not None and not isinstance(self.quality_gate, QualityGate):
            raise InvalidInputError(
                f"quality_gate must be a QualityGate or a dict, got {self.quality_gate!r}"
            )
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (list, tuple)):
            raise InvalidInputError(f"tasks must be a list of task names, got {self.tasks!r}")
        self.tasks = tuple(parse_tasks(self.tasks)) if self.tasks else ()
        limit = self.task_limit
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise InvalidInputError(f"task_limit must be a positive integer or None, got {limit!r}")
        if self.task_data_dir is not None and not isinstance(self.task_data_dir, (str, Path)):
            raise InvalidInputError(f"task_data_dir must be a path, got {self.task_data_dir!r}")
        gate = self.quality_gate
        if gate is not None and gate.min_task_retention is not None and not self.tasks:
            raise InvalidInputError("quality_gate.min_task_retention needs tasks to score")
        if target is not None and target.kind == "max_ppl_ratio" and self.holdout_windows < 1:
            raise InvalidInputError(
                "target_ppl_ratio searches the depth on held-out calibration windows: "
                "holdout_windows must be at least 1"
            )
        if target is not None and target.kind == "min_task_retention":
            if not self.tasks:
                raise InvalidInputError("target_task_retention needs tasks to score")
            if self.task_limit is None:
                raise InvalidInputError(
                    "target_task_retention searches on the task items after the first "
                    "task_limit (which the evaluation scores): task_limit must not be None"
                )

    @property
    def quality_target(self) -> QualityTarget | None:
        """The quality target (:class:`lorp.target.QualityTarget`), None with a block budget."""
        if self.target_ppl_ratio is not None:
            return QualityTarget("max_ppl_ratio", self.target_ppl_ratio)
        if self.target_task_retention is not None:
            return QualityTarget("min_task_retention", self.target_task_retention)
        return None

    @property
    def selection_method(self) -> str:
        """The method that chooses the blocks (a fold's: the method it folds; ``lorp-fold``:
        ``lorp-loss``)."""
        return selector(self.method).name

    @property
    def scoring_shape(self) -> tuple[int, int]:
        """(windows, tokens) of the scoring windows: the given ones, else the method's default
        (:attr:`lorp.methods.MethodInfo.scoring_shape`)."""
        windows, seq_len = selector(self.method).scoring_shape
        return (self.score_windows or windows, self.score_seq_len or seq_len)

    @property
    def budget(self) -> int | float:
        """The block budget (a count, or a fraction); a quality target has none (its depth is
        searched, :func:`find_depth`): :class:`~lorp.errors.BudgetError`."""
        if self.quality_target is not None:
            raise BudgetError("a quality target has no block budget: its depth is searched")
        return self.num_remove if self.num_remove is not None else float(self.fraction or 0.0)

    @property
    def requested_budget(self) -> int | float | dict[str, float]:
        """The budget as asked for: the block budget, or the target (``{kind: value}``)."""
        target = self.quality_target
        return self.budget if target is None else target.to_dict()

    def at_depth(self, num_remove: int) -> PruneConfig:
        """This config with the block budget ``num_remove`` instead of its budget."""
        return replace(
            self,
            num_remove=num_remove,
            fraction=None,
            target_ppl_ratio=None,
            target_task_retention=None,
        )

    @property
    def task_batch_size(self) -> int:
        """Task sequences per forward pass (:data:`TASK_TOKENS_PER_ROW`)."""
        return max(1, self.batch_size * self.eval_seq_len // TASK_TOKENS_PER_ROW)

    def to_dict(self) -> dict[str, Any]:
        nested = ("benchmark", "quality_gate")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested}
        out["tasks"] = list(self.tasks)
        if self.task_data_dir is not None:
            out["task_data_dir"] = str(self.task_data_dir)
        out["benchmark"] = None if self.benchmark is None else self.benchmark.to_dict()
        out["quality_gate"] = None if self.quality_gate is None else self.quality_gate.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown PruneConfig field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class PruneResult:
    """What a prune did and measured.

    ``quality``: dense vs pruned on ``evaluation`` (which data: its ``kind``/``source``/
    ``windows``/``seq_len``); ``flags``: :func:`lorp.gate.quality_flags` warnings; ``gate``: the
    quality gate's result when limits were set; ``scoring``: the scoring windows of a
    model-in-the-loop method; ``compensation``: the fitted maps when ``config.compensate``
    (already folded into the weights when ``pruned``); ``tasks``: dense vs pruned downstream
    accuracy when ``config.tasks`` (``task_source``: how the report names the task data);
    ``depth_search``: the search, its curve and confirmations, with a quality target
    (:mod:`lorp.target`); ``pruned``: whether the blocks were
    physically removed (``False`` in the result a :class:`QualityGateError` carries);
    ``offload``: which mode ran and why (:meth:`lorp.offload.OffloadDecision.to_dict`, plus
    ``skipped``: stages a sequential prune left out).
    """

    selection: Selection
    similarity: np.ndarray
    model: nn.Module
    tokenizer: Any
    quality: QualityComparison | None
    benchmark: BenchmarkResult | None
    timings: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    num_layers_before: int = 0
    flags: list[dict[str, Any]] = field(default_factory=list)
    gate: GateResult | None = None
    scoring: dict[str, Any] | None = None
    pruned: bool = True
    compensation: Compensation | None = None
    tasks: TaskComparison | None = None
    task_source: str | None = None
    depth_search: DepthSearch | None = None
    offload: dict[str, Any] | None = None

    @property
    def removed(self) -> list[int]:
        return list(self.selection.removed)


@dataclass
class PipelineResult:
    result: PruneResult
    out_dir: Path
    checkpoint_dir: Path
    report: dict[str, Any]
    files: list[Path]


# --------------------------------------------------------------------------------------------
# Stages


class StageTimer:
    """Times the pipeline's stages (:data:`STAGES`) and forwards progress to a callback.

    Every stage function takes one (``timer=``; None: a silent one of its own), times itself in
    it (``timings``: seconds per stage name, summed when a stage runs twice) and reports to
    ``callback`` through :meth:`progress`: ``(stage, 0.0, message)`` when it starts, the work's
    own progress, ``(stage, 1.0, "<stage> done")`` when it ends. :func:`prune` and
    :func:`run_pipeline` time every stage of one job in one timer.

    Running out of memory inside a stage (:func:`out_of_memory`) raises
    :class:`~lorp.errors.ModelTooLargeError` naming the stage and the option that would have
    fitted, so the library, the CLI and the worker report it alike (code ``model_too_large``).
    """

    def __init__(self, callback: ProgressCallback | None = None) -> None:
        self.callback = callback
        self.timings: dict[str, float] = {}

    def progress(self, stage: str, fraction: float, message: str) -> None:
        """A :data:`lorp.progress.ProgressCallback` forwarding to ``callback``."""
        if self.callback is not None:
            self.callback(stage, fraction, message)

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[None]:
        """Time the body as stage ``name`` (``message``: what its start reports)."""
        self.progress(name, 0.0, message)
        start = time.perf_counter()
        try:
            yield
        except (MemoryError, RuntimeError) as exc:
            too_large = out_of_memory(exc, name)
            if too_large is None:
                raise
            raise too_large from exc
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.progress(name, 1.0, f"{name} done")


def _windows_of(
    source: str | Path | torch.Tensor, tokenizer: Any, seq_len: int, count: int, skip: int = 0
) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    return text_windows(tokenizer, source, seq_len, count, skip_windows=skip)


def windows_after(
    tokenizer: Any, path: str | Path, seq_len: int, count: int, after_tokens: int, bos: bool
) -> tuple[torch.Tensor | None, int]:
    """Up to ``count`` windows of ``path`` starting at or after text token ``after_tokens``;
    returns (windows or None when the text has none left, text tokens consumed up to their end).
    """
    body = seq_len - 1 if bos else seq_len
    skip = -(-after_tokens // body)
    try:
        windows = text_windows(tokenizer, path, seq_len, count, skip_windows=skip)
    except InvalidInputError:
        return None, after_tokens
    return windows, (skip + int(windows.shape[0])) * body


def inputs_to_keep(
    model: nn.Module, calib: torch.Tensor, config: PruneConfig
) -> BlockInputs | None:
    """Which calibration windows' block inputs the capture keeps for the compensation fit, its
    tuning and the temperature fit (:mod:`lorp.inputs`): each group whose states fit in
    :data:`STORED_INPUT_BYTES` with the groups before it; None when nothing is kept."""
    count = int(calib.shape[0])
    groups: list[range] = []
    if config.compensate:  # healing uses the same windows
        fit_end = min(config.compensation_windows, count)
        groups.append(range(fit_end))
        groups.append(range(fit_end, min(fit_end + config.compensation_tune_windows, count)))
    if config.temperature:
        groups.append(range(max(count - config.temperature_windows, 0), count))
    per_window = num_blocks(model) * int(calib.shape[1]) * hidden_bytes(model)
    if per_window <= 0:
        return None
    chosen: set[int] = set()
    for group in groups:
        if len(chosen | set(group)) * per_window <= STORED_INPUT_BYTES:
            chosen |= set(group)
    return BlockInputs(sorted(chosen)) if chosen else None


def preflight(
    model: nn.Module,
    config: PruneConfig,
    *,
    tokenizer: Any = None,
    calibration: str | Path | torch.Tensor | None = None,
    evaluation: str | Path | torch.Tensor | None = None,
    scoring: torch.Tensor | None = None,
) -> int:
    """The number of blocks to remove; refuses, before any forward pass, a job that would fail
    later on something knowable now:

    - the budget does not fit the model (:class:`~lorp.errors.BudgetError`), ``num_clusters``
      is not from 2 to its depth, the surgery cannot take the blocks out of this architecture
      (:func:`lorp.surgery.check_removable`);
    - the corrections ``config`` asks for do not fold into this architecture in its dtype
      (:func:`lorp.compensation.check_compensable`, :func:`lorp.temperature.check_temperature`;
      :class:`~lorp.errors.UnsupportedModelError`);
    - the task data is missing or malformed (:func:`check_task_data`);
    - a window or benchmark workload is longer than the model's learned position table;
    - with ``tokenizer`` and ``calibration`` (what :func:`prune` passes): every token window the
      stages will draw (calibration, scoring, evaluation or held-out) is drawn now; a text too
      short for them, a token id outside the model's vocabulary, or a quality gate with
      perplexity limits and nothing to measure them on (:data:`lorp.gate.UNMEASURED`) is an
      :class:`~lorp.errors.InvalidInputError`.
    With a quality target the number returned is the most the search may remove. A model
    prepared for sequential onloading is checked too (:func:`check_sequential`). The model is
    left as it was."""
    depth = num_blocks(model)
    if config.quality_target is None:
        num_remove = resolve_budget(depth, config.budget)
    else:
        resolve_budget(depth, 1)  # at least one removable block
        num_remove = depth - 2
    if config.num_clusters is not None:
        check_num_clusters(config.num_clusters, depth)
    check_removable(model, list(range(1, num_remove + 1)))
    check_sequential(model, config)
    if config.compensate:
        try:
            check_compensable(model)
        except UnsupportedModelError as exc:
            fold = get_method(config.method).fold
            if fold is None or not fold.compensate:
                raise
            raise UnsupportedModelError(
                f"{exc}. Method {config.method!r} folds a linear map into every block before "
                f"a removed run; use {config.selection_method!r} (with temperature) instead"
            ) from exc
    if config.temperature:
        check_temperature(model)
    check_task_data(config, tokenizer)
    lengths: list[tuple[str, int]] = []
    if tokenizer is None or calibration is None:  # else the windows drawn below are checked
        lengths.append(("seq_len", config.seq_len))
        if get_method(config.selection_method).needs_model:
            lengths.append(("score_seq_len", config.scoring_shape[1]))
    if config.benchmark is not None:
        lengths += [(f"benchmark prefill {b}x{t}", t) for b, t in config.benchmark.prefill]
        lengths += [(f"benchmark decode {b}x{t}+{n}", t + n) for b, t, n in config.benchmark.decode]
    for what, length in lengths:
        _check_length(model, length, what)
    if tokenizer is not None and calibration is not None:
        _draw_all_windows(model, tokenizer, calibration, config, evaluation, scoring)
    return num_remove


def check_sequential(model: nn.Module, config: PruneConfig) -> None:
    """:class:`~lorp.errors.UnsupportedModelError` when ``model``, prepared for sequential
    onloading, is asked to heal (training needs the whole model on the device), or, with its
    block weights on disk (:func:`lorp.offload.load_skeleton`), is asked for compensation: its
    maps are folded into block weights, which need the weights in host memory
    (``run_pipeline`` loads them there when ``config.compensate``)."""
    onloader = onloader_of(model)
    if onloader is not None and config.heal_steps > 0:
        raise UnsupportedModelError(
            "healing trains the folded maps through the whole model at once, and this model "
            "runs with sequential onloading (one block on the device at a time); prune with "
            "offload 'none' to heal, or without healing"
        )
    if onloader is not None and onloader.weights == "disk" and config.compensate:
        raise UnsupportedModelError(
            "compensation folds its maps into block weights, and this model's block weights "
            "stay on disk (sequential onloading from safetensors); load it into host memory "
            "(lorp.loading.load_model(..., sequential=True, keep_on_disk=False)) or prune "
            "without compensation"
        )


def plan_offload(model: nn.Module, config: PruneConfig) -> OffloadDecision:
    """The mode ``prune`` runs ``model`` in (:func:`lorp.offload.choose_offload` on its real
    parameter bytes and the device its embeddings are on); a model already prepared for
    layer-wise passes (:func:`lorp.offload.prepare`, :func:`lorp.offload.load_skeleton`) runs
    sequentially whatever was asked."""
    onloader = onloader_of(model)
    weights = parameter_bytes(model)
    if onloader is not None:
        return OffloadDecision(
            "sequential",
            config.offload,
            "the model was loaded for sequential onloading",
            weight_bytes=weights,
            weights=onloader.weights,
        )
    device = input_device(model)
    resident = sum(t.numel() * t.element_size() for t in model.parameters() if t.device == device)
    return choose_offload(
        config.offload,
        weights,
        device=device,
        max_device_memory=config.max_device_memory,
        margin_bytes=_margin(config, weights, getattr(model, "config", None)),
        resident=resident,
    )


def _margin(config: PruneConfig, weights: int, model_config: Any) -> int:
    """:func:`lorp.offload.working_margin` for ``config``'s batches; ``model_config``: the
    model's config, or its config.json as a dict (the vocabulary size is read from either)."""

    def read(source: Any, key: str) -> Any:
        return source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)

    vocab = read(model_config, "vocab_size")
    if not isinstance(vocab, int):
        vocab = read(read(model_config, "text_config"), "vocab_size")
    return working_margin(
        weights,
        batch_size=config.batch_size,
        seq_len=max(config.seq_len, config.eval_seq_len),
        vocab_size=vocab if isinstance(vocab, int) else 0,
    )


def learned_positions(model: nn.Module) -> int | None:
    """How many positions the model has a learned embedding for (GPT-2's ``wpe``, OPT's
    ``embed_positions``: a longer window indexes past the table), or None when its positions are
    computed (rotary and the like: longer windows run, if less well)."""
    config = getattr(model, "config", None)
    declared = [
        v
        for v in (getattr(config, a, None) for a in ("n_positions", "max_position_embeddings"))
        if isinstance(v, int) and not isinstance(v, bool) and v > 0
    ]
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            return min([int(module.num_embeddings), *declared])
    return None


_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def _check_length(model: nn.Module, length: int, what: str) -> None:
    limit = learned_positions(model)
    if limit is not None and length > limit:
        raise InvalidInputError(
            f"{what} is {length} tokens but {type(model).__name__} has learned position "
            f"embeddings for {limit} positions only; use at most {limit}"
        )


def _check_windows(model: nn.Module, windows: torch.Tensor, what: str) -> None:
    """``windows`` are 2-D token ids the model can embed and position."""
    check_windows(windows)
    _check_length(model, int(windows.shape[1]), what)
    getter = getattr(model, "get_input_embeddings", None)
    rows = getattr(getter() if callable(getter) else None, "num_embeddings", None)
    if (
        isinstance(rows, int)
        and windows.numel()
        and not (int(windows.min()) >= 0 and int(windows.max()) < rows)
    ):
        raise InvalidInputError(
            f"the {what} hold token ids from {int(windows.min())} to {int(windows.max())}; the "
            f"model embeds 0..{rows - 1} (is the tokenizer the model's own?)"
        )


def _draw_all_windows(
    model: nn.Module,
    tokenizer: Any,
    calibration: str | Path | torch.Tensor,
    config: PruneConfig,
    evaluation: str | Path | torch.Tensor | None,
    scoring: torch.Tensor | None,
) -> None:
    """Draw every window the stages will (the same functions, tokens only), checked by
    :func:`_check_windows`; refuse a quality gate that would have nothing to measure on."""
    windows = _windows_of(calibration, tokenizer, config.seq_len, config.windows)
    _check_windows(model, windows, "calibration windows")
    text = None if isinstance(calibration, torch.Tensor) else calibration
    calib = Calibration(
        windows=windows,
        similarity=np.zeros((0, 0)),
        text=text,
        bos=False if text is None else prepends_bos(tokenizer),
    )
    drawn = None
    if get_method(config.selection_method).needs_model:
        drawn = draw_scoring(tokenizer, calib, config, scoring=scoring)
        _check_windows(model, drawn.windows, "scoring windows")
    held, _ = evaluation_windows(tokenizer, config, evaluation, calib, drawn)
    if held is not None:
        _check_windows(model, held, "evaluation windows")
    gate = config.quality_gate
    if held is None and gate is not None and gate.needs_perplexity:
        raise InvalidInputError(UNMEASURED)


def check_task_data(config: PruneConfig, tokenizer: Any = None) -> None:
    """With ``config.tasks``: the task data directory is given and every task's items read
    (:func:`lorp.tasks.load_task`), and with ``tokenizer`` encodable
    (:func:`lorp.tasks.check_encodable`), so a missing or malformed file fails before any
    forward pass (:class:`~lorp.errors.InvalidInputError`)."""
    if not config.tasks:
        return
    if config.task_data_dir is None:
        raise InvalidInputError(
            f"tasks {', '.join(config.tasks)} need task_data_dir, the folder of <task>.jsonl files"
        )
    for name in config.tasks:
        items = load_task(name, config.task_data_dir, limit=config.task_limit)
        if tokenizer is not None:
            check_encodable(items, tokenizer)


@dataclass
class Calibration:
    """What the calibration stage measured, and where in the calibration text it stopped.

    ``windows``: the calibration token windows ``[W, T]``; ``similarity``: the block-input
    similarity matrix S captured on them; ``inputs``: the dense block inputs kept for the
    corrections (:func:`inputs_to_keep`; set to None once they are fitted); ``text``: the
    calibration text (None when the caller gave windows), which the scoring and held-out windows
    continue; ``source``: how the report names it (default: its path); ``bos``: whether the
    tokenizer starts every window with a BOS token.
    """

    windows: torch.Tensor
    similarity: np.ndarray
    inputs: BlockInputs | None = None
    text: str | Path | None = None
    source: str | None = None
    bos: bool = False

    def __post_init__(self) -> None:
        if self.text is not None and self.source is None:
            self.source = str(self.text)

    @property
    def text_tokens(self) -> int:
        """Text tokens the calibration windows consumed (0 without a text)."""
        if self.text is None:
            return 0
        body = int(self.windows.shape[1]) - (1 if self.bos else 0)
        return int(self.windows.shape[0]) * body

    @property
    def info(self) -> dict[str, Any]:
        """The report's ``extra.calibration``: windows, seq_len, tokens (and source)."""
        info: dict[str, Any] = {
            "windows": int(self.windows.shape[0]),
            "seq_len": int(self.windows.shape[1]),
            "tokens": int(self.windows.numel()),
        }
        if self.text is not None:
            info["source"] = self.source
        return info


def calibrate(
    model: nn.Module,
    tokenizer: Any,
    calibration: str | Path | torch.Tensor,
    config: PruneConfig,
    *,
    source_name: str | None = None,
    timer: StageTimer | None = None,
) -> Calibration:
    """Stage "calibration": ``config.windows`` × ``config.seq_len`` windows of the calibration
    text (or the windows given) and S captured on them, keeping the dense block inputs the
    corrections will start from. ``source_name``: how the report names the text (default: its
    path)."""
    timer = timer or StageTimer()
    text = None if isinstance(calibration, torch.Tensor) else calibration
    with timer.stage("calibration", "capturing block-input similarity"):
        windows = _windows_of(calibration, tokenizer, config.seq_len, config.windows)
        inputs = inputs_to_keep(model, windows, config)
        similarity = capture_similarity(
            model, windows, batch_size=config.batch_size, progress=timer.progress, keep=inputs
        )
    return Calibration(
        windows=windows,
        similarity=similarity,
        inputs=inputs,
        text=text,
        source=None if text is None else source_name,
        bos=False if text is None else prepends_bos(tokenizer),
    )


@dataclass
class Scoring:
    """The scoring windows of a model-in-the-loop method: ``windows`` ``[W, T]``, ``info`` (the
    report's ``extra.scoring``: kind, source, held_out, windows, seq_len; ``passes`` once the
    search ran) and ``text_tokens``, the calibration text consumed up to their end."""

    windows: torch.Tensor
    info: dict[str, Any]
    text_tokens: int


def draw_scoring(
    tokenizer: Any,
    calibration: Calibration,
    config: PruneConfig,
    *,
    scoring: torch.Tensor | None = None,
) -> Scoring:
    """The scoring windows (``config.scoring_shape``): ``scoring`` when given, else the
    calibration text's windows right after the calibration windows; when there is no text (or
    none left), the last calibration windows cut to the scoring length (``held_out`` False)."""
    count, seq_len = config.scoring_shape
    used = calibration.text_tokens
    windows: torch.Tensor | None = scoring
    info: dict[str, Any] | None = None
    if windows is not None:
        info = {"kind": "scoring windows given by the caller", "held_out": True}
    elif calibration.text is not None:
        windows, used = windows_after(
            tokenizer, calibration.text, seq_len, count, used, calibration.bos
        )
        if windows is not None:
            info = {
                "kind": "calibration text after the calibration windows",
                "source": calibration.source,
                "held_out": True,
            }
    if windows is None or info is None:
        windows = calibration.windows[-count:, :seq_len]
        info = {
            "kind": "last calibration windows (no calibration text left over)",
            "held_out": False,
        }
    info.update(windows=int(windows.shape[0]), seq_len=int(windows.shape[1]))
    return Scoring(windows=windows, info=info, text_tokens=used)


@dataclass
class Choice:
    """What the selection stage chose: ``selection``, and the ``scoring`` windows a
    model-in-the-loop method ran the model on (None for an S-only method)."""

    selection: Selection
    scoring: Scoring | None = None

    @property
    def removed(self) -> list[int]:
        return list(self.selection.removed)


def select_blocks(
    model: nn.Module,
    tokenizer: Any,
    calibration: Calibration,
    config: PruneConfig,
    *,
    scoring: torch.Tensor | None = None,
    timer: StageTimer | None = None,
) -> Choice:
    """Stage "selection": the blocks ``config.selection_method`` removes within the budget. An
    S-only method decides from ``calibration.similarity``
    (:func:`lorp.selection.select_layers`); a model-in-the-loop method runs the model on the
    scoring windows (:func:`draw_scoring`; ``scoring``: the caller's) within its pass budget
    (:func:`lorp.search.pass_budget`, :func:`lorp.search.search_layers`)."""
    timer = timer or StageTimer()
    depth = num_blocks(model)
    num_remove = resolve_budget(depth, config.budget)
    method = config.selection_method
    with timer.stage("selection", f"selecting {num_remove} of {depth} blocks ({method})"):
        if not get_method(method).needs_model:
            selection = select_layers(
                calibration.similarity, num_remove, method=method, num_clusters=config.num_clusters
            )
            return Choice(selection)
        drawn = draw_scoring(tokenizer, calibration, config, scoring=scoring)
        shape = (int(drawn.windows.shape[0]), int(drawn.windows.shape[1]))
        max_passes = pass_budget(method, model, int(calibration.windows.numel()), shape, num_remove)
        selection = search_layers(
            model,
            calibration.similarity,
            num_remove,
            method,
            drawn.windows,
            num_clusters=config.num_clusters,
            batch_size=config.batch_size,
            candidates_per_slot=config.search_candidates,
            max_passes=max_passes,
            progress=timer.progress,
        )
        drawn.info["passes"] = selection.details.get("passes")
    return Choice(selection, drawn)


@dataclass
class TargetSearch:
    """What :func:`find_depth` found: the ``search`` (its curve, chosen depth and, once the
    pipeline confirmed it, the confirmations), the method's ``choices`` at each depth measured,
    and ``text_tokens``, the calibration text used up to the end of the search's held-out
    windows (the evaluation's held-out windows come after them; 0 for a task target)."""

    search: DepthSearch
    choices: dict[int, Choice]
    text_tokens: int = 0


def find_depth(
    model: nn.Module,
    tokenizer: Any,
    calibration: Calibration,
    config: PruneConfig,
    *,
    scoring: torch.Tensor | None = None,
    timer: StageTimer | None = None,
) -> TargetSearch:
    """Stage "selection" with a quality target (``config.quality_target``): the deepest prune
    that meets it (:func:`lorp.target.search_depth`), each depth k the method's choice at k
    blocks (:func:`select_blocks` from the one ``calibration``'s S) measured without the
    corrections (they are fitted once, at the chosen depth: see :func:`prune`).

    ``max_ppl_ratio``: perplexity on ``config.holdout_windows`` calibration windows after the
    calibration and scoring windows (the dense pass runs once; each depth one pruned pass,
    resumed from the stored dense block input, :class:`lorp.scoring.WindowScorer`); the
    calibration must be a text with such windows left. ``min_task_retention``: the average task
    retention on the ``config.target_task_items`` items of each task after the first
    ``config.task_limit`` (those confirm the result in :func:`evaluate`); the dense items are
    scored once. Neither touches the evaluation data. Raises :class:`BudgetError` when even one
    block misses the target."""
    target = config.quality_target
    if target is None:
        raise InvalidInputError(
            "find_depth needs a quality target: target_ppl_ratio or target_task_retention"
        )
    timer = timer or StageTimer()
    resolve_budget(num_blocks(model), 1)  # at least one removable block (BudgetError else)
    max_remove = num_blocks(model) - 2
    choices: dict[int, Choice] = {}

    def choose(k: int) -> list[int]:
        choices[k] = select_blocks(
            model, tokenizer, calibration, config.at_depth(k), scoring=scoring, timer=timer
        )
        return choices[k].removed

    if target.kind == "max_ppl_ratio":
        windows, used = _search_windows(tokenizer, calibration, config, scoring)
        scorer = WindowScorer(model, windows, batch_size=config.batch_size, reference=False)
        with timer.stage("selection", "dense perplexity on the search's held-out windows"):
            dense = scorer.score(()).ppl

        def measure(removed: Sequence[int]) -> tuple[float, float | None]:
            with timer.stage("selection", f"held-out perplexity without blocks {list(removed)}"):
                scorer.prefetch([removed])
                ppl = scorer.score(removed).ppl
            return ppl / dense, ppl

        data: dict[str, Any] = {
            "kind": "held-out calibration windows",
            "source": calibration.source,
            "windows": int(windows.shape[0]),
            "seq_len": int(windows.shape[1]),
        }
    else:
        items, data = _search_items(config)
        common: dict[str, Any] = {"batch_size": config.task_batch_size, "stage": "selection"}
        with timer.stage("selection", "dense accuracy on the search's task items"):
            began = time.perf_counter()
            dense_scores = TaskScores(
                score_items(model, tokenizer, items, label="dense", **common),
                None,
                time.perf_counter() - began,
            )
        dense = dense_scores.average
        used = 0

        def measure(removed: Sequence[int]) -> tuple[float, float | None]:
            with timer.stage("selection", f"task accuracy without blocks {list(removed)}"):
                began = time.perf_counter()
                with pruned_view(model, removed):
                    scores = score_items(model, tokenizer, items, label="pruned", **common)
                pruned = TaskScores(scores, None, time.perf_counter() - began)
            retention = compare_scores(dense_scores, pruned, removed).average_retention
            return (math.nan if retention is None else retention), pruned.average

    search = search_depth(
        target, max_remove, choose, measure, dense=dense, data=data, progress=timer.progress
    )
    return TargetSearch(search=search, choices=choices, text_tokens=used)


def _search_windows(
    tokenizer: Any,
    calibration: Calibration,
    config: PruneConfig,
    scoring: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """The held-out calibration windows a perplexity target searches on (after the calibration
    and scoring windows) and the text tokens used up to their end."""
    if calibration.text is None:
        raise InvalidInputError(
            "a max_ppl_ratio target searches the depth on held-out calibration windows: give "
            "the calibration as a text, not as token windows"
        )
    after = calibration.text_tokens
    if get_method(config.selection_method).needs_model:
        after = draw_scoring(tokenizer, calibration, config, scoring=scoring).text_tokens
    windows, used = windows_after(
        tokenizer, calibration.text, config.seq_len, config.holdout_windows, after, calibration.bos
    )
    if windows is None:
        raise InvalidInputError(
            f"a max_ppl_ratio target needs held-out calibration windows, but {calibration.source} "
            f"has no {config.seq_len}-token window left after the {after} tokens the calibration "
            "(and scoring) windows use; give a longer calibration text or fewer windows"
        )
    return windows, used


def _search_items(config: PruneConfig) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """The task items a task-retention target searches on: ``config.target_task_items`` of each
    task after the first ``config.task_limit`` (which the evaluation scores)."""
    check_task_data(config)
    assert config.task_data_dir is not None and config.task_limit is not None
    first = config.task_limit
    items = {
        name: load_task(name, config.task_data_dir, limit=first + config.target_task_items)[first:]
        for name in config.tasks
    }
    empty = [name for name, its in items.items() if not its]
    if empty:
        raise InvalidInputError(
            f"a min_task_retention target searches on the task items after the first "
            f"task_limit={first} (those confirm the result), but {', '.join(empty)} "
            "has no more items; lower task_limit"
        )
    data = {
        "kind": "task items after the evaluation's",
        "first_item": first,
        "items": {name: len(its) for name, its in items.items()},
    }
    return items, data


def compensate(
    model: nn.Module,
    removed: Sequence[int],
    windows: torch.Tensor,
    config: PruneConfig,
    *,
    inputs: BlockInputs | None = None,
    timer: StageTimer | None = None,
) -> Compensation | None:
    """Stage "compensation" (only with ``config.compensate``; else None): a linear stand-in for
    every removed run, fitted on the first ``config.compensation_windows`` of the calibration
    ``windows`` and folded at the strength tuned on the next ``config.compensation_tune_windows``
    (:func:`lorp.compensation.fit_tuned_compensation`), starting from the dense block inputs
    ``inputs`` holds (:attr:`Calibration.inputs`). The model is left as it was."""
    if not config.compensate:
        return None
    timer = timer or StageTimer()
    with (
        timer.stage("compensation", f"fitting linear maps for {list(removed)}"),
        onloading(model),
    ):
        return fit_tuned_compensation(
            model,
            removed,
            windows,
            fit_windows=config.compensation_windows,
            tune_windows=config.compensation_tune_windows,
            batch_size=config.batch_size,
            progress=timer.progress,
            inputs=inputs,
        )


def heal(
    model: nn.Module,
    windows: torch.Tensor,
    config: PruneConfig,
    compensation: Compensation | None,
    *,
    inputs: BlockInputs | None = None,
    timer: StageTimer | None = None,
) -> Compensation | None:
    """Stage "healing" (only with ``config.heal_steps``; else ``compensation`` unchanged): the
    folded maps trained for at most ``config.heal_steps`` steps to match the dense model's
    logits on the compensation's fit windows (the first ``config.compensation_windows`` of the
    calibration ``windows``), stopping early on its tune windows (the next
    ``config.compensation_tune_windows``); :func:`lorp.heal.heal_maps`. The model is left as it
    was."""
    if not config.heal_steps or compensation is None:
        return compensation
    timer = timer or StageTimer()
    fit, tune = config.compensation_windows, config.compensation_tune_windows
    with timer.stage("healing", f"training the folded maps ({config.heal_steps} steps at most)"):
        return heal_maps(
            model,
            compensation,
            windows[:fit],
            windows[fit : fit + tune],
            steps=config.heal_steps,
            lr=config.heal_lr,
            batch_size=config.batch_size,
            inputs=inputs,
            progress=timer.progress,
        )


def fit_logit_scale(
    model: nn.Module,
    removed: Sequence[int],
    windows: torch.Tensor,
    config: PruneConfig,
    compensation: Compensation | None = None,
    *,
    inputs: BlockInputs | None = None,
    timer: StageTimer | None = None,
) -> Compensation | None:
    """Stage "temperature" (only with ``config.temperature``; else ``compensation`` unchanged):
    the pruned (and compensated) model's logit scale, fitted on the last
    ``config.temperature_windows`` of the calibration ``windows`` (from the dense block inputs
    ``inputs`` holds), added to ``compensation`` (:func:`lorp.compensation.fit_folded_temperature`).
    The model is left as it was."""
    if not config.temperature:
        return compensation
    timer = timer or StageTimer()
    with timer.stage("temperature", "fitting the pruned model's logit scale"), onloading(model):
        return fit_folded_temperature(
            model,
            compensation or temperature_only(removed),
            windows[-config.temperature_windows :],
            batch_size=config.batch_size,
            progress=timer.progress,
            inputs=inputs,
        )


@dataclass
class Evaluation:
    """What the evaluation stage measured and concluded: ``quality`` (dense vs pruned; None when
    there was nothing to measure on), ``info`` (which windows: kind, source, windows, seq_len),
    ``flags`` (:func:`lorp.gate.quality_flags`), ``gate`` (the quality gate's result when
    ``config.quality_gate`` has limits) and ``tasks`` (dense vs pruned downstream accuracy when
    ``config.tasks``; :mod:`lorp.tasks`)."""

    quality: QualityComparison | None
    info: dict[str, Any] | None
    flags: list[dict[str, Any]]
    gate: GateResult | None = None
    tasks: TaskComparison | None = None

    @property
    def refused(self) -> bool:
        """The quality gate broke a limit."""
        return self.gate is not None and not self.gate.passed


def evaluation_windows(
    tokenizer: Any,
    config: PruneConfig,
    evaluation: str | Path | torch.Tensor | None = None,
    calibration: Calibration | None = None,
    scoring: Scoring | None = None,
    *,
    source_name: str | None = None,
    held_out_after: int | None = None,
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """The windows :func:`evaluate` measures quality on and how the report names them (kind,
    source): ``config.eval_windows`` × ``config.eval_seq_len`` of the ``evaluation`` text (or
    the windows given); else ``config.holdout_windows`` windows of the calibration text after
    the calibration and scoring windows (and after ``held_out_after`` tokens, when a depth
    search used more); (None, None) when there are none."""
    if evaluation is not None:
        given = _windows_of(evaluation, tokenizer, config.eval_seq_len, config.eval_windows)
        source = None
        if not isinstance(evaluation, torch.Tensor):
            source = str(evaluation) if source_name is None else source_name
        return given, {"kind": "evaluation text", "source": source}
    if config.holdout_windows > 0 and calibration is not None and calibration.text is not None:
        after = calibration.text_tokens if scoring is None else scoring.text_tokens
        if held_out_after is not None:
            after = max(after, held_out_after)
        windows, _ = windows_after(
            tokenizer,
            calibration.text,
            config.seq_len,
            config.holdout_windows,
            after,
            calibration.bos,
        )
        if windows is not None:  # else the calibration text has no windows left over
            return windows, {"kind": "held-out calibration windows", "source": calibration.source}
    return None, None


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    removed: Sequence[int],
    config: PruneConfig,
    *,
    evaluation: str | Path | torch.Tensor | None = None,
    calibration: Calibration | None = None,
    scoring: Scoring | None = None,
    compensation: Compensation | None = None,
    source_name: str | None = None,
    held_out_after: int | None = None,
    timer: StageTimer | None = None,
) -> Evaluation:
    """Stage "evaluation": dense vs pruned (``removed`` skipped, ``compensation`` folded in)
    on ``config.eval_windows`` × ``config.eval_seq_len`` windows of the ``evaluation`` text (or
    the windows given); without it, on ``config.holdout_windows`` windows of the calibration
    text after those the ``calibration`` and ``scoring`` windows used (:attr:`Choice.scoring`),
    when ``calibration`` has a text with windows left. Then the flags and the quality gate
    (:mod:`lorp.gate`). With ``config.tasks``, the downstream tasks too
    (:func:`lorp.tasks.compare_tasks` on ``config.task_data_dir``,
    :attr:`PruneConfig.task_batch_size` sequences per pass). The model is left as it was.
    ``source_name``: how the report names the evaluation text (default: its path);
    ``held_out_after``: calibration text tokens used before the held-out windows (default: the
    calibration and scoring windows'; a depth search's windows come after those,
    :attr:`TargetSearch.text_tokens`)."""
    timer = timer or StageTimer()
    windows, info = evaluation_windows(
        tokenizer,
        config,
        evaluation,
        calibration,
        scoring,
        source_name=source_name,
        held_out_after=held_out_after,
    )
    quality = None
    if windows is not None and info is not None:
        info.update(windows=int(windows.shape[0]), seq_len=int(windows.shape[1]))
        with timer.stage("evaluation", "dense vs pruned quality"):
            quality = compare_pruned(
                model,
                removed,
                windows,
                batch_size=config.batch_size,
                progress=timer.progress,
                compensation=compensation,
            )
    tasks = None
    if config.tasks:
        check_task_data(config)
        assert config.task_data_dir is not None
        with (
            timer.stage("evaluation", f"dense vs pruned on tasks {', '.join(config.tasks)}"),
            onloading(model),
        ):
            tasks = compare_tasks(
                model,
                tokenizer,
                removed,
                config.tasks,
                data_dir=config.task_data_dir,
                limit=config.task_limit,
                batch_size=config.task_batch_size,
                compensation=compensation,
                progress=timer.progress,
                stage="evaluation",
            )
    gate = None
    if config.quality_gate is not None and config.quality_gate.active:
        where = (
            "" if info is None else f"{info['kind']}, {info['windows']} x {info['seq_len']} tokens"
        )
        gate = config.quality_gate.check(quality, where, tasks=tasks)
    return Evaluation(
        quality=quality, info=info, flags=quality_flags(quality), gate=gate, tasks=tasks
    )


def measure_speed(
    model: nn.Module,
    removed: Sequence[int],
    config: PruneConfig,
    *,
    timer: StageTimer | None = None,
) -> BenchmarkResult | None:
    """Stage "benchmark" (only with ``config.benchmark``; else None): the model and its pruned
    view timed in this process (:func:`lorp.bench.benchmark`). The model is left as it was.

    Its time budget: ``config.benchmark.budget_s`` when set, else ``budget_fraction`` (25%) of
    the time the job's other stages took so far (``timer.timings``: loading, calibration,
    selection, fits, evaluation), so the benchmark stays a fraction of the job."""
    if config.benchmark is None:
        return None
    timer = timer or StageTimer()
    bench = config.benchmark
    budget_s: float | None = None
    source = None
    if bench.budget_s is None:
        others = sum(t for name, t in timer.timings.items() if name != "benchmark")
        budget_s = max(bench.budget_fraction * others, 1e-3)
        source = f"{100 * bench.budget_fraction:.0f}% of the job's other stages ({others:.1f} s)"
    with timer.stage("benchmark", "timing original vs pruned"):
        return benchmark(
            model, removed, bench, progress=timer.progress, budget_s=budget_s, budget_source=source
        )


def remove(
    model: nn.Module,
    removed: Sequence[int],
    compensation: Compensation | None = None,
    *,
    timer: StageTimer | None = None,
) -> None:
    """Stage "pruning": fold ``compensation`` into the weights and take the ``removed`` blocks
    out of ``model`` in place (:func:`lorp.surgery.remove_blocks`); when that fails the model
    is left whole and unchanged."""
    timer = timer or StageTimer()
    with timer.stage("pruning", f"removing blocks {list(removed)}"):
        restore = None if compensation is None else apply_compensation(model, compensation)
        try:
            remove_blocks(model, removed)
        except BaseException:
            if restore is not None:
                restore()  # the model stays whole and unchanged
            raise


def _step_back(found: TargetSearch, depth: int, measured: Evaluation, folded: bool) -> bool:
    """Record the evaluation at ``depth`` as a confirmation of the target; True when it missed
    and the pipeline should try one depth shallower (at most :data:`lorp.target.CONFIRM_STEPS`
    times, never below one block, not when nothing could be measured). When the last try
    misses, the evaluation gets a ``target_not_confirmed`` flag."""
    search = found.search
    target = search.target
    if target.kind == "max_ppl_ratio":
        value = None if measured.quality is None else measured.quality.ppl_ratio
    else:
        value = None if measured.tasks is None else measured.tasks.average_retention
    met = target.met(value)
    search.confirmations.append(
        {
            "num_remove": depth,
            "removed": found.choices[depth].removed,
            "value": value,
            "met": met,
            "folded": folded,
            "data": None if target.kind == "min_task_retention" else measured.info,
        }
    )
    if met:
        return False
    if value is not None and len(search.confirmations) <= CONFIRM_STEPS and depth > 1:
        return True
    measured.flags.append(
        {
            "code": "target_not_confirmed",
            "metric": target.metric,
            "value": value,
            "threshold": target.value,
            "message": f"the quality target ({target.describe()}) was not confirmed on the "
            f"evaluation data: {target.metric} "
            + ("not measured" if value is None else f"{value:.4g}")
            + f" at {depth} blocks removed (the search chose {search.chosen})",
        }
    )
    return False


# --------------------------------------------------------------------------------------------
# The whole job


def _offload_before_loading(
    source: str | Path, gguf_file: str | None, dtype: str, device: str, config: PruneConfig
) -> OffloadDecision:
    """:func:`lorp.offload.choose_offload` on the estimated weight bytes
    (:func:`lorp.loading.estimate_weight_bytes`) before anything is loaded; ``"auto"`` runs in
    memory when the size cannot be estimated (a hub id)."""
    from .loading import _read_config, estimate_weight_bytes, resolve_device

    target = resolve_device(device)
    try:
        weights = estimate_weight_bytes(source, gguf_file=gguf_file, dtype=dtype, device=target)
    except LorpError:
        if config.offload == "auto":
            return OffloadDecision("none", "auto", "the model's size is unknown before loading")
        requested = config.offload
        return OffloadDecision(requested, requested, f"offload {requested!r} requested")
    folder = Path(source).expanduser()
    raw = _read_config(folder if folder.is_dir() else folder.parent) or {}
    return choose_offload(
        config.offload,
        weights,
        device=target,
        max_device_memory=config.max_device_memory,
        margin_bytes=_margin(config, weights, raw),
    )


def prune(
    model: nn.Module,
    tokenizer: Any,
    calibration: str | Path | torch.Tensor,
    config: PruneConfig,
    *,
    evaluation: str | Path | torch.Tensor | None = None,
    scoring: torch.Tensor | None = None,
    progress: ProgressCallback | None = None,
    source_names: Mapping[str, str] | None = None,
    timer: StageTimer | None = None,
    offload: OffloadDecision | None = None,
) -> PruneResult:
    """Select and remove blocks of ``model`` in place; measure what it cost and gained.

    ``source_names``: how the report names the ``"calibration"`` and ``"evaluation"`` texts
    and the ``"tasks"`` data (e.g. the URIs a service user submitted) instead of their local
    paths.

    ``calibration``: a UTF-8 text file or token windows ``[W, T]``. ``evaluation``: a held-out text
    (or windows) for dense-vs-pruned quality; without it, ``config.holdout_windows`` windows of the
    calibration text that follow the calibration (and scoring) windows are used (none when
    calibration is given as windows). ``scoring``: scoring windows for the model-in-the-loop
    methods; by default ``config.score_windows`` × ``config.score_seq_len`` windows of the
    calibration text right after the calibration windows (when calibration is given as windows,
    or the text has none left, the last calibration windows cut to ``score_seq_len`` are used and
    ``result.scoring["held_out"]`` is False).

    With ``config.quality_gate`` set and broken, raises :class:`QualityGateError` after the
    measurement and before anything is removed (the model stays whole); its ``result`` is the
    refused :class:`PruneResult` (``pruned`` False, no benchmark), from which
    :func:`lorp.report.make_report` builds the refusal report.

    With a quality target (``config.target_ppl_ratio`` / ``target_task_retention``),
    :func:`find_depth` chooses the depth instead of :func:`select_blocks`, and the evaluation
    confirms it, stepping back one depth while it misses (at most
    :data:`lorp.target.CONFIRM_STEPS` times); ``result.depth_search`` has the curve.

    The stages, in order (each a public function of this module): :func:`preflight`,
    :func:`calibrate`, :func:`select_blocks`, :func:`compensate` (``config.compensate``),
    :func:`heal` (``config.heal_steps``), :func:`fit_logit_scale` (``config.temperature``),
    :func:`evaluate`, :func:`measure_speed`
    (``config.benchmark``), :func:`remove`. ``progress`` gets their progress; ``timer``
    (instead of ``progress``): a :class:`StageTimer` to time them in, e.g. one that already
    timed the loading.

    ``config.offload`` (:mod:`lorp.offload`): resolved by :func:`plan_offload` (``offload``: a
    decision already taken, e.g. before loading); in sequential mode the model is prepared for
    it (:func:`lorp.offload.prepare`; it stays so): the capture and the evaluation run
    layer-wise, the scoring passes, the fits and the tasks window by window with one block on
    the device at a time (:func:`lorp.offload.onloading`), compensation with block weights on
    disk is refused before any window (:func:`check_sequential`), and the benchmark, which
    needs the whole model on the device, is skipped; ``result.offload`` says which mode ran,
    why, and what was skipped.
    """
    if timer is not None and progress is not None:
        raise InvalidInputError("give prune a progress callback or a StageTimer, not both")
    timer = timer or StageTimer(progress)
    names = dict(source_names or {})
    depth = num_blocks(model)
    decision = offload or plan_offload(model, config)
    onloader = None
    if decision.mode == "sequential":
        onloader = prepare(model)
    preflight(
        model,
        config,
        tokenizer=tokenizer,
        calibration=calibration,
        evaluation=evaluation,
        scoring=scoring,
    )
    calib = calibrate(
        model, tokenizer, calibration, config, source_name=names.get("calibration"), timer=timer
    )
    target = config.quality_target
    found = None
    if target is None:
        choice = select_blocks(model, tokenizer, calib, config, scoring=scoring, timer=timer)
    else:
        found = find_depth(model, tokenizer, calib, config, scoring=scoring, timer=timer)
        choice = found.choices[found.search.chosen]
    while True:
        removed = choice.removed
        compensation = compensate(
            model, removed, calib.windows, config, inputs=calib.inputs, timer=timer
        )
        compensation = heal(
            model, calib.windows, config, compensation, inputs=calib.inputs, timer=timer
        )
        compensation = fit_logit_scale(
            model, removed, calib.windows, config, compensation, inputs=calib.inputs, timer=timer
        )
        measured = evaluate(
            model,
            tokenizer,
            removed,
            config,
            evaluation=evaluation,
            calibration=calib,
            scoring=choice.scoring,
            compensation=compensation,
            source_name=names.get("evaluation"),
            held_out_after=None if found is None else found.text_tokens,
            timer=timer,
        )
        if found is None or not _step_back(found, len(removed), measured, compensation is not None):
            break
        choice = found.choices[len(removed) - 1]
    calib.inputs = None  # the stored block inputs are not needed any more
    result = PruneResult(
        depth_search=None if found is None else found.search,
        selection=choice.selection,
        similarity=calib.similarity,
        model=model,
        tokenizer=tokenizer,
        quality=measured.quality,
        benchmark=None,
        timings=timer.timings,
        calibration=calib.info,
        evaluation=measured.info,
        num_layers_before=depth,
        flags=measured.flags,
        gate=measured.gate,
        scoring=None if choice.scoring is None else choice.scoring.info,
        pruned=False,
        compensation=compensation,
        tasks=measured.tasks,
        task_source=names.get("tasks") if measured.tasks is not None else None,
        offload=decision.to_dict(),
    )
    if onloader is not None and result.offload is not None:
        result.offload.update(weights=onloader.weights, peak_block_bytes=onloader.peak_bytes)
        result.offload["skipped"] = ["benchmark"] if config.benchmark is not None else []
    if measured.gate is not None and not measured.gate.passed:
        raise QualityGateError(
            f"{measured.gate.message}; blocks {removed} were not removed", result=result
        )
    if onloader is None:  # the benchmark needs the whole model on the device
        result.benchmark = measure_speed(model, removed, config, timer=timer)
    remove(model, removed, compensation, timer=timer)
    result.pruned = True
    return result


def run_pipeline(
    model_source: str | Path,
    calibration: str | Path,
    out_dir: str | Path,
    config: PruneConfig,
    *,
    evaluation: str | Path | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_hub: bool = False,
    progress: ProgressCallback | None = None,
    source_names: Mapping[str, str] | None = None,
    output_formats: Sequence[str] | None = None,
    made_by: str | None = None,
) -> PipelineResult:
    """Load ``model_source``, prune it, and write ``out_dir/model/`` (checkpoint and its model
    card ``README.md``), ``report.json``, ``report.html``, ``report.md``, ``heatmap.png`` and
    ``similarity.npy``.

    ``dtype``: ``"auto"`` (the checkpoint's own; :func:`lorp.loading.choose_dtype`) or a dtype
    name; the report records the one used and why (``model.dtype``, ``model.dtype_source``).
    ``output_formats``: ``"gguf"`` and/or ``"safetensors"`` (None: the input's format), checked
    before loading (:func:`lorp.outputs.plan_outputs`); a safetensors input is saved in its own
    dtype; what was written is ``report["artifacts"]``. ``made_by``: how the model card names
    what made the checkpoint (the command line, the service job).

    ``source_names`` (keys ``model``, ``calibration``, ``evaluation``, ``tasks``): how the report
    and the progress messages name the inputs, e.g. the URIs a service user submitted rather than
    the worker's local copies.

    When the quality gate refuses the result, no checkpoint is written: the reports are (with
    ``summary.status = "refused"`` and ``quality.gate``) and :class:`QualityGateError` is raised
    carrying the refusal report (``.report``) and its job summary (``.summary``,
    :func:`lorp.report.job_summary`); both None when the report could not be built.
    Stages: loading, then :func:`prune`'s, then saving and report.
    """
    from .loading import load_model
    from .loading import model_name as short_name
    from .outputs import check_destination, plan_outputs, write_outputs
    from .report.card import write_model_card

    out = Path(out_dir)
    timer = StageTimer(progress)
    model_name = (source_names or {}).get("model", str(model_source))
    outputs = plan_outputs(  # before any compute: a GGUF output the surgery can't write fails here
        model_source,
        gguf_file=gguf_file,
        output_formats=output_formats,
        compensate=config.compensate,
        temperature=config.temperature,
        budget=None if config.quality_target is not None else config.budget,  # searched later
    )
    check_destination(out / "model")  # a checkpoint is never written over, so refuse it now
    decision = _offload_before_loading(model_source, gguf_file, dtype, device, config)
    with timer.stage("loading", f"loading {model_name}"):
        loaded = load_model(
            model_source,
            gguf_file=gguf_file,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            allow_hub=allow_hub,
            sequential=decision.mode == "sequential",
            keep_on_disk=not config.compensate,  # compensation folds into block weights
        )
    report_options: dict[str, Any] = {
        "model_source": model_name,
        "gguf_file": loaded.gguf_file,
        "dtype": loaded.dtype,
        "device": str(loaded.device),
        "dtype_source": loaded.dtype_source,
        "name": short_name(model_name, loaded.gguf_file, local=loaded.source),
    }
    try:
        result = prune(
            loaded.model,
            loaded.tokenizer,
            calibration,
            config,
            evaluation=evaluation,
            source_names=source_names,
            timer=timer,
            offload=decision,
        )
    except QualityGateError as refusal:
        if isinstance(refusal.result, PruneResult):
            with timer.stage("report", "writing the refusal report (no checkpoint)"):
                try:
                    refusal.report = make_report(refusal.result, config, **report_options)
                    refusal.summary = job_summary(refusal.report)
                    write_reports(refusal.report, refusal.result.similarity, out)
                except (LorpError, OSError, ValueError):
                    pass  # the gate's error is what the caller must see
        raise
    with timer.stage("saving", f"saving the pruned checkpoint ({', '.join(outputs.formats)})"):
        checkpoint = out / "model"
        onloader = onloader_of(result.model)
        if onloader is not None:  # blocks still on disk are read into host memory to be saved
            onloader.materialise(result.model)
        artifacts = write_outputs(
            outputs,
            result.model,
            result.tokenizer,
            result.removed,
            result.compensation,
            checkpoint,
            save_dtype=loaded.weights_dtype,
            source_name=model_name,
        )
    with timer.stage("report", "writing reports"):
        report = make_report(result, config, artifacts=artifacts, **report_options)
        files = write_reports(report, result.similarity, out)
        files.append(write_model_card(report, checkpoint, made_by=made_by))
    return PipelineResult(
        result=result, out_dir=out, checkpoint_dir=checkpoint, report=report, files=files
    )


__all__ = [
    "OFFLOAD_HINT",
    "STAGES",
    "STORED_INPUT_BYTES",
    "TASK_TOKENS_PER_ROW",
    "Calibration",
    "Choice",
    "Evaluation",
    "PipelineResult",
    "PruneConfig",
    "PruneResult",
    "Scoring",
    "StageTimer",
    "TargetSearch",
    "calibrate",
    "check_sequential",
    "check_task_data",
    "compensate",
    "draw_scoring",
    "evaluate",
    "evaluation_windows",
    "find_depth",
    "fit_logit_scale",
    "heal",
    "inputs_to_keep",
    "learned_positions",
    "make_report",
    "measure_speed",
    "out_of_memory",
    "plan_offload",
    "preflight",
    "prune",
    "remove",
    "run_pipeline",
    "select_blocks",
    "windows_after",
]
