"""The progress callback every long-running step of the library accepts.

Kept apart (and free of heavy imports) so any module, including the torch-free method registry
(:mod:`lorp.methods`), can name the type.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["STAGES", "ProgressCallback"]

#: The pipeline's stages in the order they run (:func:`lorp.pipeline.run_pipeline`); the name a
#: :data:`ProgressCallback` receives. Here, free of heavy imports, so a client can follow a job.
STAGES: tuple[str, ...] = (
    "loading",
    "calibration",
    "selection",
    "compensation",
    "healing",
    "temperature",
    "evaluation",
    "benchmark",
    "pruning",
    "saving",
    "report",
)

#: ``progress(stage, fraction, message)``: ``stage`` is one of the pipeline's stage names
#: (:data:`STAGES`), ``fraction`` the share of that stage done (0..1).
ProgressCallback = Callable[[str, float, str], None]
