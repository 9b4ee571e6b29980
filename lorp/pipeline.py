"""The whole pruning job: calibrate, select, measure, remove, save, report.

``prune`` works on a model already in memory (the Python API); ``run_pipeline`` adds loading,
saving the checkpoint and writing the reports (the CLI's ``lorp prune`` and the service worker).

Token windows drawn from a calibration *text* (never overlapping, in this order):
1. ``windows`` × ``seq_len`` calibration windows (similarity matrix S);
2. for the model-in-the-loop methods (the registry's methods with ``needs_model``:
   ``sleb``, ``lorp-kl``, ``lorp-loss``, ``auto``; :mod:`lorp.methods`, :mod:`lorp.search`)
   ``score_windows`` × ``score_seq_len`` scoring windows that follow them;
3. when no evaluation text is given, ``holdout_windows`` × ``seq_len`` held-out windows after
   those, on which dense and pruned quality are measured.
The evaluation text is only ever used for the quality measurement, never for choosing blocks.

Compensation (``config.compensate``, :mod:`lorp.compensation`): after the selection, one linear
map per removed run of blocks is fitted on the first ``compensation_windows`` calibration
windows and folded into the down projection of the block before the run, at the smallest
strength whose loss on the next ``compensation_tune_windows`` calibration windows is within one
standard error of the lowest (:func:`lorp.compensation.tune_strength`); the quality measured is
the compensated pruned model's, and the checkpoint carries the folded weights. The capture
keeps the dense block inputs of the windows these fits use (and the temperature's) within
:data:`STORED_INPUT_BYTES`, so they start mid-model (:mod:`lorp.inputs`).

Quality guard (:mod:`lorp.gate`): every prune that could measure quality reports perplexity
(dense and pruned), KL(dense || pruned), top-1 agreement and flags for results far worse than
the dense model. With ``config.quality_gate`` set, a broken limit raises
:class:`~lorp.errors.QualityGateError` right after the measurement: ``prune`` leaves the model
unpruned, ``run_pipeline`` writes no checkpoint but still writes the reports (``report.json``
with ``summary.status = "refused"`` and the gate result) so the refusal can be explained.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._blocks import get_blocks, num_blocks
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
from .errors import InvalidInputError, LorpError, QualityGateError, UnsupportedModelError
from .gate import FLAG_THRESHOLDS, GateResult, QualityGate, quality_flags
from .inputs import BlockInputs, hidden_bytes
from .methods import get_method, method_names, selector
from .progress import ProgressCallback
from .quality import QualityComparison, compare_pruned
from .report import build_report, json_safe, write_reports
from .search import pass_budget, search_layers
from .selection import Selection, resolve_budget, select_layers
from .similarity import capture_similarity
from .surgery import remove_blocks
from .temperature import check_temperature

# The capture keeps the calibration windows' block inputs that the compensation and temperature
# fits start from (lorp.inputs.BlockInputs) within this many bytes (the groups that fit).
STORED_INPUT_BYTES = 1 << 30

STAGES = (
    "loading",
    "calibration",
    "selection",
    "compensation",
    "temperature",
    "evaluation",
    "benchmark",
    "pruning",
    "saving",
    "report",
)


@dataclass
class PruneConfig:
    """What to prune and how to measure it. Exactly one of ``num_remove`` / ``fraction``."""

    method: str = "lorp"
    num_remove: int | None = None
    fraction: float | None = None
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
    # fit the pruned (and compensated) model's logit scale and fold it into the final norm
    # (lorp.temperature); fitted on the last temperature_windows calibration windows
    temperature: bool = False
    temperature_windows: int = 4

    def __post_init__(self) -> None:
        info = get_method(self.method)  # unknown: lists the valid ones
        if self.num_clusters is not None and not info.takes_clusters:
            takes = ", ".join(method_names(takes_clusters=True))
            raise InvalidInputError(
                f"num_clusters only applies to methods {takes}, not {self.method!r}"
            )
        if (self.num_remove is None) == (self.fraction is None):
            raise InvalidInputError("give exactly one budget: num_remove (blocks) or fraction")
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
        if isinstance(self.benchmark, dict):
            self.benchmark = BenchmarkConfig.from_dict(self.benchmark)
        if isinstance(self.quality_gate, dict):
            self.quality_gate = QualityGate.from_dict(self.quality_gate)
        elif self.quality_gate is not None and not isinstance(self.quality_gate, QualityGate):
            raise InvalidInputError(
                f"quality_gate must be a QualityGate or a dict, got {self.quality_gate!r}"
            )

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
        return self.num_remove if self.num_remove is not None else float(self.fraction or 0.0)

    def to_dict(self) -> dict[str, Any]:
        nested = ("benchmark", "quality_gate")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested}
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
    (already folded into the weights when ``pruned``); ``pruned``: whether the blocks were
    physically removed (``False`` in the result handed to a refusal report).
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


class _Stages:
    """Times stages and forwards progress to the caller's callback."""

    def __init__(self, progress: ProgressCallback | None) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}

    def report(self, stage: str, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(stage, fraction, message)

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[None]:
        self.report(name, 0.0, message)
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        self.report(name, 1.0, f"{name} done")


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


def _where(info: dict[str, Any]) -> str:
    return f"{info['kind']}, {info['windows']} x {info['seq_len']} tokens"


def inputs_to_keep(
    model: nn.Module, calib: torch.Tensor, config: PruneConfig
) -> BlockInputs | None:
    """Which calibration windows' block inputs the capture keeps for the compensation fit, its
    tuning and the temperature fit (:mod:`lorp.inputs`): each group whose states fit in
    :data:`STORED_INPUT_BYTES` with the groups before it; None when nothing is kept."""
    count = int(calib.shape[0])
    groups: list[range] = []
    if config.compensate:
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
    _stages: _Stages | None = None,
    _on_refused: Callable[[PruneResult], None] | None = None,
) -> PruneResult:
    """Select and remove blocks of ``model`` in place; measure what it cost and gained.

    ``source_names``: how the report names the ``"calibration"`` and ``"evaluation"`` texts
    (e.g. the URIs a service user submitted) instead of their local paths.

    ``calibration``: a UTF-8 text file or token windows ``[W, T]``. ``evaluation``: a held-out text
    (or windows) for dense-vs-pruned quality; without it, ``config.holdout_windows`` windows of the
    calibration text that follow the calibration (and scoring) windows are used (none when
    calibration is given as windows). ``scoring``: scoring windows for the model-in-the-loop
    methods; by default ``config.score_windows`` × ``config.score_seq_len`` windows of the
    calibration text right after the calibration windows (when calibration is given as windows,
    or the text has none left, the last calibration windows cut to ``score_seq_len`` are used and
    ``result.scoring["held_out"]`` is False).

    With ``config.quality_gate`` set and broken, raises :class:`QualityGateError` after the
    measurement and before anything is removed (the model stays whole).
    Progress stages: calibration, selection, compensation (``config.compensate``), temperature
    (``config.temperature``), evaluation, benchmark, pruning.
    """
    stages = _stages or _Stages(progress)
    depth = num_blocks(model)
    num_remove = resolve_budget(depth, config.budget)
    text = None if isinstance(calibration, torch.Tensor) else calibration
    bos = False if text is None else prepends_bos(tokenizer)
    if config.compensate:
        try:
            check_compensable(model)  # fail before the calibration, not after it
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

    with stages.stage("calibration", "capturing block-input similarity"):
        calib = _windows_of(calibration, tokenizer, config.seq_len, config.windows)
        inputs = inputs_to_keep(model, calib, config)
        similarity = capture_similarity(
            model, calib, batch_size=config.batch_size, progress=stages.report, keep=inputs
        )
    calib_info: dict[str, Any] = {
        "windows": int(calib.shape[0]),
        "seq_len": int(calib.shape[1]),
        "tokens": int(calib.numel()),
    }
    names = dict(source_names or {})
    text_name = names.get("calibration", str(text))
    if text is not None:
        calib_info["source"] = text_name
    body = config.seq_len - 1 if bos else config.seq_len
    used_tokens = int(calib.shape[0]) * body  # text tokens consumed so far (text calibration)

    scoring_info: dict[str, Any] | None = None
    method = config.selection_method
    with stages.stage("selection", f"selecting {num_remove} of {depth} blocks ({method})"):
        if get_method(method).needs_model:
            score_count, score_len = config.scoring_shape
            score_w: torch.Tensor | None = scoring
            if score_w is not None:
                scoring_info = {"kind": "scoring windows given by the caller", "held_out": True}
            elif text is not None:
                score_w, used_tokens = windows_after(
                    tokenizer, text, score_len, score_count, used_tokens, bos
                )
                if score_w is not None:
                    scoring_info = {
                        "kind": "calibration text after the calibration windows",
                        "source": text_name,
                        "held_out": True,
                    }
            if score_w is None:
                score_w = calib[-score_count:, :score_len]
                scoring_info = {
                    "kind": "last calibration windows (no calibration text left over)",
                    "held_out": False,
                }
            assert scoring_info is not None
            scoring_info.update(windows=int(score_w.shape[0]), seq_len=int(score_w.shape[1]))
            max_passes = pass_budget(
                method,
                model,
                int(calib.numel()),
                (int(score_w.shape[0]), int(score_w.shape[1])),
                num_remove,
            )
            selection = search_layers(
                model,
                similarity,
                num_remove,
                method,
                score_w,
                num_clusters=config.num_clusters,
                batch_size=config.batch_size,
                candidates_per_slot=config.search_candidates,
                max_passes=max_passes,
                progress=stages.report,
            )
            scoring_info["passes"] = selection.details.get("passes")
        else:
            selection = select_layers(
                similarity, num_remove, method=method, num_clusters=config.num_clusters
            )

    compensation = None
    if config.compensate:
        with stages.stage("compensation", f"fitting linear maps for {selection.removed}"):
            compensation = fit_tuned_compensation(
                model,
                selection.removed,
                calib,
                fit_windows=config.compensation_windows,
                tune_windows=config.compensation_tune_windows,
                batch_size=config.batch_size,
                progress=stages.report,
                inputs=inputs,
            )
    if config.temperature:
        with stages.stage("temperature", "fitting the pruned model's logit scale"):
            compensation = fit_folded_temperature(
                model,
                compensation or temperature_only(selection.removed),
                calib[-config.temperature_windows :],
                batch_size=config.batch_size,
                progress=stages.report,
                inputs=inputs,
            )
    inputs = None  # the stored block inputs are not needed any more

    eval_windows: torch.Tensor | None = None
    eval_info: dict[str, Any] | None = None
    if evaluation is not None:
        eval_windows = _windows_of(evaluation, tokenizer, config.eval_seq_len, config.eval_windows)
        eval_info = {
            "kind": "evaluation text",
            "source": None
            if isinstance(evaluation, torch.Tensor)
            else names.get("evaluation", str(evaluation)),
        }
    elif config.holdout_windows > 0 and text is not None:
        eval_windows, _ = windows_after(
            tokenizer, text, config.seq_len, config.holdout_windows, used_tokens, bos
        )
        if eval_windows is not None:  # else the calibration text has no windows left over
            eval_info = {"kind": "held-out calibration windows", "source": text_name}
    quality = None
    if eval_windows is not None and eval_info is not None:
        eval_info.update(windows=int(eval_windows.shape[0]), seq_len=int(eval_windows.shape[1]))
        with stages.stage("evaluation", "dense vs pruned quality"):
            quality = compare_pruned(
                model,
                selection.removed,
                eval_windows,
                batch_size=config.batch_size,
                progress=stages.report,
                compensation=compensation,
            )

    flags = quality_flags(quality)
    gate = None
    if config.quality_gate is not None and config.quality_gate.active:
        gate = config.quality_gate.check(quality, "" if eval_info is None else _where(eval_info))

    def result(bench: BenchmarkResult | None, pruned: bool) -> PruneResult:
        return PruneResult(
            selection=selection,
            similarity=similarity,
            model=model,
            tokenizer=tokenizer,
            quality=quality,
            benchmark=bench,
            timings=stages.timings,
            calibration=calib_info,
            evaluation=eval_info,
            num_layers_before=depth,
            flags=flags,
            gate=gate,
            scoring=scoring_info,
            pruned=pruned,
            compensation=compensation,
        )

    if gate is not None and not gate.passed:
        if _on_refused is not None:
            _on_refused(result(None, pruned=False))
        raise QualityGateError(f"{gate.message}; blocks {selection.removed} were not removed")

    bench = None
    if config.benchmark is not None:
        with stages.stage("benchmark", "timing original vs pruned"):
            bench = benchmark(model, selection.removed, config.benchmark, progress=stages.report)

    with stages.stage("pruning", f"removing blocks {selection.removed}"):
        restore = None if compensation is None else apply_compensation(model, compensation)
        try:
            remove_blocks(model, selection.removed)
        except BaseException:
            if restore is not None:
                restore()  # the model stays whole and unchanged
            raise

    return result(bench, pruned=True)


def run_pipeline(
    model_source: str | Path,
    calibration: str | Path,
    out_dir: str | Path,
    config: PruneConfig,
    *,
    evaluation: str | Path | None = None,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    allow_hub: bool = False,
    progress: ProgressCallback | None = None,
    source_names: Mapping[str, str] | None = None,
) -> PipelineResult:
    """Load ``model_source``, prune it, and write ``out_dir/model/`` (checkpoint), ``report.json``,
    ``report.html``, ``report.md``, ``heatmap.png`` and ``similarity.npy``.

    ``source_names`` (keys ``model``, ``calibration``, ``evaluation``): how the report and the
    progress messages name the inputs, e.g. the URIs a service user submitted rather than the
    worker's local copies.

    When the quality gate refuses the result, no checkpoint is written: the reports are (with
    ``summary.status = "refused"`` and ``quality.gate``) and :class:`QualityGateError` is raised.
    """
    from .loading import load_model, save_pruned

    out = Path(out_dir)
    stages = _Stages(progress)
    model_name = (source_names or {}).get("model", str(model_source))
    report_options: dict[str, Any] = {"model_source": model_name, "dtype": dtype}

    def refused(partial: PruneResult) -> None:
        with stages.stage("report", "writing the refusal report (no checkpoint)"):
            try:
                report = make_report(partial, config, **report_options)
                write_reports(report, partial.similarity, out)
            except (LorpError, OSError, ValueError):
                pass  # the gate's error is what the caller must see

    with stages.stage("loading", f"loading {model_name}"):
        loaded = load_model(
            model_source,
            gguf_file=gguf_file,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            allow_hub=allow_hub,
        )
    report_options.update(gguf_file=loaded.gguf_file, device=str(loaded.device))
    result = prune(
        loaded.model,
        loaded.tokenizer,
        calibration,
        config,
        evaluation=evaluation,
        source_names=source_names,
        _stages=stages,
        _on_refused=refused,
    )
    with stages.stage("saving", "saving the pruned checkpoint"):
        checkpoint = out / "model"
        save_pruned(result.model, result.tokenizer, checkpoint)
    with stages.stage("report", "writing reports"):
        report = make_report(result, config, **report_options)
        files = write_reports(report, result.similarity, out)
    return PipelineResult(
        result=result, out_dir=out, checkpoint_dir=checkpoint, report=report, files=files
    )


def make_report(
    result: PruneResult,
    config: PruneConfig,
    *,
    model_source: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> dict[str, Any]:
    """The report.json content of a prune (see lorp/schemas/report.schema.json).

    Beyond :func:`lorp.report.build_report`: ``quality`` carries ``flags`` and ``gate``;
    ``summary`` carries ``status`` ("pruned" or "refused" by the quality gate), ``kl``,
    ``top1_agreement``, ``flags`` (messages) and ``quality_gate`` (None, or the gate result);
    ``extra.scoring`` describes the scoring windows of a model-in-the-loop method.
    """
    model = result.model
    params = sum(p.numel() for p in model.parameters())
    layers_after = num_blocks(model)
    if not result.pruned:  # refused: report what the pruned model would have been
        blocks = get_blocks(model)
        params -= sum(p.numel() for i in result.selection.removed for p in blocks[i].parameters())
        layers_after -= len(result.selection.removed)
    gate = None if result.gate is None else result.gate.to_dict()
    quality = None
    if result.quality is not None and result.evaluation is not None:
        quality = {
            "dataset": result.evaluation.get("source") or result.evaluation["kind"],
            **result.evaluation,
            **result.quality.to_dict(),
            "flags": result.flags,
            "flag_thresholds": dict(FLAG_THRESHOLDS),
            "gate": gate,
        }
    report = build_report(
        model={
            "source": model_source,
            "gguf_file": gguf_file,
            "architecture": type(model).__name__,
            "num_layers": result.num_layers_before,
            "num_layers_after": layers_after,
            "parameters_after": int(params),
            "dtype": dtype,
            "device": device,
        },
        budget={"requested": config.budget, "num_remove": len(result.selection.removed)},
        selection=result.selection,
        similarity=result.similarity,
        timings=dict(result.timings),
        benchmark=result.benchmark,
        quality=quality,
        extra={
            "calibration": result.calibration,
            "scoring": result.scoring,
            "compensation": None if result.compensation is None else result.compensation.to_dict(),
            "config": config.to_dict(),
        },
    )
    summary = report["summary"]
    summary["status"] = "pruned" if result.pruned else "refused"
    summary["kl"] = None if result.quality is None else result.quality.kl
    summary["top1_agreement"] = None if result.quality is None else result.quality.top1_agreement
    summary["flags"] = [f["message"] for f in result.flags]
    summary["quality_gate"] = gate
    return dict(json_safe(report))


__all__ = [
    "STAGES",
    "STORED_INPUT_BYTES",
    "PipelineResult",
    "PruneConfig",
    "PruneResult",
    "inputs_to_keep",
    "make_report",
    "prune",
    "run_pipeline",
    "windows_after",
]
