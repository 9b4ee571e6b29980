"""LoRP: training-free depth pruning of decoder LLMs (Locality-Aware Redundancy Pruning).

The public API is small:

- :func:`prune` / :func:`run_pipeline` and :class:`PruneConfig`: the whole job on a model in memory
  or from a checkpoint to an output directory;
- :func:`capture_similarity` and :func:`select_layers`: the method's two halves (S-only methods
  ``lorp``, ``shortgpt``, ``streamline``); :func:`search_layers` for the model-in-the-loop methods
  ``sleb``, ``lorp-kl``, ``lorp-loss`` and ``auto``;
- :func:`remove_blocks` / :func:`pruned_view`: physical block removal (permanent or temporary);
- :func:`fit_compensation` / :func:`tune_strength` / :func:`apply_compensation`: a fitted linear
  stand-in for each removed run, the share of it to fold chosen by calibration loss, folded into
  the block before the run (``PruneConfig(compensate=True)`` does all three);
- :func:`fit_temperature`: the pruned model's logit scale, folded into the final norm
  (``PruneConfig(temperature=True)``);
- :func:`load_model`, :func:`save_pruned`, :func:`text_windows`, :func:`perplexity`,
  :func:`compare_pruned`, :func:`benchmark`.

Errors are in :mod:`lorp.errors`; every one is a :class:`LorpError` with a stable ``code``.
The selection methods are registered in :mod:`lorp.methods` (one module per method).

Importing :mod:`lorp` loads nothing heavy: each public name is imported from its module on first
use (PEP 562), so ``import lorp.methods`` or ``from lorp.errors import ...`` does not load torch.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bench import BenchmarkConfig, BenchmarkResult, benchmark
    from .compensation import Compensation, apply_compensation, fit_compensation, tune_strength
    from .data import text_windows
    from .errors import (
        BudgetError,
        CancelledError,
        InvalidInputError,
        LorpError,
        ModelLoadError,
        ModelTooLargeError,
        QualityGateError,
        SimilarityMatrixError,
        UnsafeWeightsError,
        UnsupportedModelError,
    )
    from .gate import GateResult, QualityGate
    from .loading import (
        LoadedModel,
        bundled_model_path,
        estimate_weight_bytes,
        load_model,
        save_pruned,
    )
    from .pipeline import PipelineResult, PruneConfig, PruneResult, prune, run_pipeline
    from .quality import PerplexityResult, QualityComparison, compare_pruned, perplexity
    from .report import REPORT_SCHEMA_VERSION, build_report, write_reports
    from .search import ALL_METHODS, SEARCH_METHODS, search_layers
    from .selection import METHODS, Selection, resolve_budget, select_layers
    from .similarity import capture_similarity
    from .surgery import pruned_view, remove_blocks
    from .temperature import Temperature, fit_temperature

__version__ = "0.1.0"

#: Public name -> the module (in this package) that defines it.
_EXPORTS: dict[str, str] = {
    "BenchmarkConfig": "bench",
    "BenchmarkResult": "bench",
    "benchmark": "bench",
    "Compensation": "compensation",
    "apply_compensation": "compensation",
    "fit_compensation": "compensation",
    "tune_strength": "compensation",
    "text_windows": "data",
    "BudgetError": "errors",
    "CancelledError": "errors",
    "InvalidInputError": "errors",
    "LorpError": "errors",
    "ModelLoadError": "errors",
    "ModelTooLargeError": "errors",
    "QualityGateError": "errors",
    "SimilarityMatrixError": "errors",
    "UnsafeWeightsError": "errors",
    "UnsupportedModelError": "errors",
    "GateResult": "gate",
    "QualityGate": "gate",
    "LoadedModel": "loading",
    "bundled_model_path": "loading",
    "estimate_weight_bytes": "loading",
    "load_model": "loading",
    "save_pruned": "loading",
    "PipelineResult": "pipeline",
    "PruneConfig": "pipeline",
    "PruneResult": "pipeline",
    "prune": "pipeline",
    "run_pipeline": "pipeline",
    "PerplexityResult": "quality",
    "QualityComparison": "quality",
    "compare_pruned": "quality",
    "perplexity": "quality",
    "REPORT_SCHEMA_VERSION": "report",
    "build_report": "report",
    "write_reports": "report",
    "ALL_METHODS": "search",
    "SEARCH_METHODS": "search",
    "search_layers": "search",
    "METHODS": "selection",
    "Selection": "selection",
    "resolve_budget": "selection",
    "select_layers": "selection",
    "capture_similarity": "similarity",
    "pruned_view": "surgery",
    "remove_blocks": "surgery",
    "Temperature": "temperature",
    "fit_temperature": "temperature",
    "heal_maps": "heal",
}

__all__ = [
    "ALL_METHODS",
    "METHODS",
    "REPORT_SCHEMA_VERSION",
    "SEARCH_METHODS",
    "BenchmarkConfig",
    "BenchmarkResult",
    "BudgetError",
    "CancelledError",
    "Compensation",
    "GateResult",
    "InvalidInputError",
    "LoadedModel",
    "LorpError",
    "ModelLoadError",
    "ModelTooLargeError",
    "PerplexityResult",
    "PipelineResult",
    "PruneConfig",
    "PruneResult",
    "QualityComparison",
    "QualityGate",
    "QualityGateError",
    "Selection",
    "SimilarityMatrixError",
    "Temperature",
    "UnsafeWeightsError",
    "UnsupportedModelError",
    "__version__",
    "apply_compensation",
    "benchmark",
    "build_report",
    "bundled_model_path",
    "capture_similarity",
    "compare_pruned",
    "estimate_weight_bytes",
    "fit_compensation",
    "fit_temperature",
    "heal_maps",
    "load_model",
    "perplexity",
    "prune",
    "pruned_view",
    "remove_blocks",
    "resolve_budget",
    "run_pipeline",
    "save_pruned",
    "search_layers",
    "select_layers",
    "text_windows",
    "tune_strength",
    "write_reports",
]


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, e.g. ``lorp.pipeline``) on first use."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
