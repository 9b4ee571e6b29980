"""The whole pruning job: calibrate, select, measure, remove, save, report.

``prune`` works on a model already in memory (the Python API); ``run_pipeline`` adds loading,
saving the checkpoint and writing the reports (the CLI's ``lorp prune`` and the service worker).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._blocks import num_blocks
from .bench import BenchmarkConfig, BenchmarkResult, benchmark
from .data import text_windows
from .errors import InvalidInputError
from .quality import QualityComparison, compare_pruned
from .report import build_report, write_reports
from .selection import METHODS, Selection, resolve_budget, select_layers
from .similarity import capture_similarity
from .surgery import remove_blocks

ProgressCallback = Callable[[str, float, str], None]

STAGES = (
    "loading",
    "calibration",
    "selection",
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(
                f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"
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
        for name in ("windows", "seq_len", "batch_size", "eval_windows", "eval_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2 or self.eval_seq_len < 2:
            raise InvalidInputError("sequence lengths must be at least 2 tokens")
        if (
            isinstance(self.holdout_windows, bool)
            or not isinstance(self.holdout_windows, int)
            or self.holdout_windows < 0
        ):
            raise InvalidInputError(f"holdout_windows must be >= 0, got {self.holdout_windows!r}")
        if isinstance(self.benchmark, dict):
            self.benchmark = BenchmarkConfig.from_dict(self.benchmark)

    @property
    def budget(self) -> int | float:
        return self.num_remove if self.num_remove is not None else float(self.fraction or 0.0)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "benchmark"}
        out["benchmark"] = None if self.benchmark is None else self.benchmark.to_dict()
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


def prune(
    model: nn.Module,
    tokenizer: Any,
    calibration: str | Path | torch.Tensor,
    config: PruneConfig,
    *,
    evaluation: str | Path | torch.Tensor | None = None,
    progress: ProgressCallback | None = None,
    _stages: _Stages | None = None,
) -> PruneResult:
    """Select and remove blocks of ``model`` in place; measure what it cost and gained.

    ``calibration``: a UTF-8 text file or token windows ``[W, T]``. ``evaluation``: a held-out text
    (or windows) for dense-vs-pruned quality; without it, ``config.holdout_windows`` windows of the
    calibration text that follow the calibration windows are used (none when calibration is given
    as windows). Progress stages: calibration, selection, evaluation, benchmark, pruning.
    """
    stages = _stages or _Stages(progress)
    depth = num_blocks(model)
    num_remove = resolve_budget(depth, config.budget)

    with stages.stage("calibration", "capturing block-input similarity"):
        calib = _windows_of(calibration, tokenizer, config.seq_len, config.windows)
        similarity = capture_similarity(
            model, calib, batch_size=config.batch_size, progress=stages.report
        )
    calib_info = {
        "windows": int(calib.shape[0]),
        "seq_len": int(calib.shape[1]),
        "tokens": int(calib.numel()),
    }
    if isinstance(calibration, str | Path):
        calib_info["source"] = str(calibration)

    with stages.stage("selection", f"selecting {num_remove} of {depth} blocks ({config.method})"):
        selection = select_layers(
            similarity, num_remove, method=config.method, num_clusters=config.num_clusters
        )

    eval_windows: torch.Tensor | None = None
    eval_info: dict[str, Any] | None = None
    if evaluation is not None:
        eval_windows = _windows_of(evaluation, tokenizer, config.eval_seq_len, config.eval_windows)
        eval_info = {
            "kind": "evaluation text",
            "source": None if isinstance(evaluation, torch.Tensor) else str(evaluation),
        }
    elif config.holdout_windows > 0 and not isinstance(calibration, torch.Tensor):
        try:
            eval_windows = text_windows(
                tokenizer,
                calibration,
                config.seq_len,
                config.holdout_windows,
                skip_windows=int(calib.shape[0]),
            )
            eval_info = {"kind": "held-out calibration windows", "source": str(calibration)}
        except InvalidInputError:
            eval_windows = None  # the calibration text has no windows left over
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
            )

    bench = None
    if config.benchmark is not None:
        with stages.stage("benchmark", "timing original vs pruned"):
            bench = benchmark(model, selection.removed, config.benchmark, progress=stages.report)

    with stages.stage("pruning", f"removing blocks {selection.removed}"):
        remove_blocks(model, selection.removed)

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
    )


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
) -> PipelineResult:
    """Load ``model_source``, prune it, and write ``out_dir/model/`` (checkpoint), ``report.json``,
    ``report.html``, ``report.md``, ``heatmap.png`` and ``similarity.npy``."""
    from .loading import load_model, save_pruned

    out = Path(out_dir)
    stages = _Stages(progress)
    with stages.stage("loading", f"loading {model_source}"):
        loaded = load_model(
            model_source,
            gguf_file=gguf_file,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            allow_hub=allow_hub,
        )
    result = prune(
        loaded.model, loaded.tokenizer, calibration, config, evaluation=evaluation, _stages=stages
    )
    with stages.stage("saving", "saving the pruned checkpoint"):
        checkpoint = out / "model"
        save_pruned(result.model, result.tokenizer, checkpoint)
    with stages.stage("report", "writing reports"):
        report = make_report(
            result,
            config,
            model_source=str(model_source),
            gguf_file=loaded.gguf_file,
            dtype=dtype,
            device=str(loaded.device),
        )
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
    """The report.json content of a finished prune (see lorp/schemas/report.schema.json)."""
    model = result.model
    params = sum(p.numel() for p in model.parameters())
    quality = None
    if result.quality is not None and result.evaluation is not None:
        quality = {
            "dataset": result.evaluation.get("source") or result.evaluation["kind"],
            **result.evaluation,
            **result.quality.to_dict(),
        }
    return build_report(
        model={
            "source": model_source,
            "gguf_file": gguf_file,
            "architecture": type(model).__name__,
            "num_layers": result.num_layers_before,
            "num_layers_after": num_blocks(model),
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
        extra={"calibration": result.calibration, "config": config.to_dict()},
    )


__all__ = [
    "STAGES",
    "PipelineResult",
    "PruneConfig",
    "PruneResult",
    "make_report",
    "prune",
    "run_pipeline",
]
