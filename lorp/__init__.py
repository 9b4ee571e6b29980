"""LoRP: training-free depth pruning of decoder LLMs (Locality-Aware Redundancy Pruning).

The public API is small:

- :func:`prune` / :func:`run_pipeline` and :class:`PruneConfig`: the whole job on a model in memory
  or from a checkpoint to an output directory;
- :func:`capture_similarity` and :func:`select_layers`: the method's two halves;
- :func:`remove_blocks` / :func:`pruned_view`: physical block removal (permanent or temporary);
- :func:`load_model`, :func:`save_pruned`, :func:`text_windows`, :func:`perplexity`,
  :func:`compare_pruned`, :func:`benchmark`.

Errors are in :mod:`lorp.errors`; every one is a :class:`LorpError` with a stable ``code``.
"""

from .bench import BenchmarkConfig, BenchmarkResult, benchmark
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
from .loading import LoadedModel, bundled_model_path, load_model, save_pruned
from .pipeline import PipelineResult, PruneConfig, PruneResult, prune, run_pipeline
from .quality import PerplexityResult, QualityComparison, compare_pruned, perplexity
from .selection import METHODS, Selection, select_layers
from .similarity import capture_similarity
from .surgery import pruned_view, remove_blocks

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "BenchmarkConfig",
    "BenchmarkResult",
    "BudgetError",
    "CancelledError",
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
    "QualityGateError",
    "Selection",
    "SimilarityMatrixError",
    "UnsafeWeightsError",
    "UnsupportedModelError",
    "__version__",
    "benchmark",
    "bundled_model_path",
    "capture_similarity",
    "compare_pruned",
    "load_model",
    "perplexity",
    "prune",
    "pruned_view",
    "remove_blocks",
    "run_pipeline",
    "save_pruned",
    "select_layers",
    "text_windows",
]
