"""Every error lorp raises. Each carries a stable ``code`` that the CLI and the service map to
exit messages and HTTP/job error codes; nothing else in lorp defines exception classes."""

from __future__ import annotations

from typing import Any


class LorpError(Exception):
    """Base class of all lorp errors."""

    code = "lorp_error"


class InvalidInputError(LorpError, ValueError):
    """An argument or input file is malformed (bad budget, bad matrix, unknown method...)."""

    code = "invalid_input"


class BudgetError(InvalidInputError):
    """The removal budget cannot be met (too many blocks, not a valid fraction...)."""

    code = "invalid_budget"


class SimilarityMatrixError(InvalidInputError):
    """The similarity matrix is not square, not symmetric, or not finite."""

    code = "invalid_similarity"


class UnsupportedModelError(LorpError):
    """The model's architecture is not supported (its block list cannot be found...)."""

    code = "unsupported_model"


class UnsafeWeightsError(LorpError):
    """Weights in a format that can execute code (pickle) and loading them was not allowed."""

    code = "unsafe_weights"


class ModelLoadError(LorpError):
    """A model or tokenizer could not be loaded (missing, corrupt, wrong shapes...)."""

    code = "model_load_failed"


class ModelTooLargeError(LorpError):
    """The model needs more memory than the caller allows."""

    code = "model_too_large"


class CancelledError(LorpError):
    """Raised from a progress callback to stop the work at the next stage boundary."""

    code = "cancelled"


class QualityGateError(LorpError):
    """The pruned model broke a quality limit the caller set.

    ``result``: the refused prune (a :class:`lorp.pipeline.PruneResult` with ``pruned`` False:
    the selection and everything measured, the model still whole). ``report``: the refusal
    report (the report.json document, ``summary.status`` "refused") and ``summary``: its job
    summary (:func:`lorp.report.job_summary`), both set by :func:`lorp.pipeline.run_pipeline`
    (None from :func:`lorp.pipeline.prune`, or when the report could not be built).
    """

    code = "quality_gate"

    def __init__(
        self,
        message: str,
        *,
        result: Any = None,
        report: dict[str, Any] | None = None,
        summary: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.result = result
        self.report = report
        self.summary = summary


#: What a job that ran out of memory could use instead (sequential onloading: one block on the
#: device at a time), as a job and as the CLI spell it.
OFFLOAD_HINT = 'offload: "sequential" in a job, --offload sequential on the CLI'


def out_of_memory(exc: BaseException, stage: str) -> ModelTooLargeError | None:
    """The :class:`ModelTooLargeError` for ``exc`` when it is an allocation failure during
    ``stage`` (a device's ``torch.OutOfMemoryError``, Python's ``MemoryError``, or torch's CPU
    allocator refusing: a ``RuntimeError`` "can't allocate memory"); None for any other error.
    The message names the stage, the memory and :data:`OFFLOAD_HINT`. (Recognised by class
    name: this module imports no torch.)"""
    if any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        where = "device"
    elif isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    ):
        where = "CPU"
    else:
        return None
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return ModelTooLargeError(
        f"out of {where} memory during the {stage} stage ({detail}): the model and its "
        f"activations do not fit; rerun with sequential onloading ({OFFLOAD_HINT}), a smaller "
        "batch_size or fewer/shorter windows"
    )
