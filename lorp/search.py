"""Model-in-the-loop selection: the entry point of the methods that run the model.

The S-only methods (:func:`lorp.selection.select_layers`) decide from the similarity matrix
alone. The methods here (the registry's methods with ``needs_model``, :mod:`lorp.methods`:
``sleb``, ``lorp-kl``, ``lorp-loss``, ``auto``) also measure candidate removals on *scoring
windows*, a few short token windows of the calibration text that follow the calibration windows
(never the evaluation text; the pipeline draws them, see :func:`lorp.pipeline.prune`), with the
scoring engine of :mod:`lorp.scoring`. Each method's file in :mod:`lorp.methods` describes it.

:func:`search_layers` runs one of them; :func:`pass_budget` is the pass limit the pipeline gives
it (the method's ``pass_budget`` in the registry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._blocks import get_blocks
from .errors import InvalidInputError
from .methods import SelectionRequest, find_method, fold_methods, method_names
from .progress import ProgressCallback
from .selection import Selection, validate_similarity

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike
    from torch import nn

__all__ = [
    "ALL_METHODS",
    "CLUSTER_METHODS",
    "FOLD_METHODS",
    "SEARCH_METHODS",
    "pass_budget",
    "search_layers",
]

# The method lists, derived from the registry (lorp.methods) when this module is imported. Code
# in lorp/ asks the registry itself (lorp.methods.method_names); these stay for callers outside
# it (service/schemas.py, scripts/demo.py) until they read the registry too.

#: Methods that run the model on scoring windows.
SEARCH_METHODS: tuple[str, ...] = method_names(needs_model=True, fold=False)
#: Pipeline methods that are another method's selection with corrections on: name -> the
#: selection method (``lorp-fold``: ``lorp-loss``).
FOLD_METHODS: dict[str, str] = fold_methods()
#: Every method name the pipeline accepts.
ALL_METHODS: tuple[str, ...] = method_names()
#: Methods built on LoRP's phases, which accept a forced number of phases K.
CLUSTER_METHODS: tuple[str, ...] = method_names(takes_clusters=True)


def pass_budget(
    method: str,
    model: nn.Module,
    calibration_tokens: int,
    scoring_shape: tuple[int, int],
    num_remove: int,
) -> int | None:
    """The ``max_passes`` the pipeline gives ``method`` (a fold: the method it folds): the
    method's own ``pass_budget`` in the registry (``auto``: about 3/4 of the similarity
    capture; ``lorp-loss``: its local search, about one capture), ``None`` (no limit) for the
    methods without one."""
    info = find_method(method)
    if info is not None and info.fold is not None:
        info = find_method(info.fold.of)
    if info is None or info.pass_budget is None:
        return None
    return info.pass_budget(model, calibration_tokens, scoring_shape, num_remove)


def search_layers(
    model: nn.Module,
    similarity: ArrayLike,
    num_remove: int | float,
    method: str,
    windows: torch.Tensor,
    *,
    num_clusters: int | None = None,
    batch_size: int = 1,
    candidates_per_slot: int = 3,
    max_passes: int | None = None,
    progress: ProgressCallback | None = None,
) -> Selection:
    """Choose blocks with a model-in-the-loop ``method`` (one of :data:`SEARCH_METHODS`).

    ``windows``: scoring windows ``[W, T]`` (held out from the calibration windows, never the
    evaluation text). ``num_clusters`` forces K for the methods that take it (``lorp-kl``,
    ``lorp-loss``). ``candidates_per_slot``: candidates per removal slot (``lorp-kl``, and
    ``auto``'s lorp-kl candidate). ``max_passes`` limits the methods with a pass budget
    (``auto`` and ``lorp-loss``'s local search; see :func:`pass_budget`). Progress goes to stage
    ``"selection"``.
    """
    info = find_method(method)
    if info is None or not info.needs_model or info.fold is not None:
        valid = method_names(needs_model=True, fold=False)
        raise InvalidInputError(f"unknown search method {method!r}; valid: {', '.join(valid)}")
    if num_clusters is not None and not info.takes_clusters:
        takes = method_names(takes_clusters=True)
        raise InvalidInputError(
            f"num_clusters only applies to methods {', '.join(takes)}, not {method!r}"
        )
    matrix = validate_similarity(similarity)
    n = len(get_blocks(model))
    if matrix.shape[0] != n:
        raise InvalidInputError(
            f"similarity is {matrix.shape[0]}x{matrix.shape[0]}, model has {n} blocks"
        )
    request = SelectionRequest(
        similarity=matrix,
        num_remove=num_remove,
        num_clusters=num_clusters,
        model=model,
        windows=windows,
        batch_size=batch_size,
        candidates_per_slot=candidates_per_slot,
        max_passes=max_passes,
        progress=progress,
    )
    was_training = model.training
    model.eval()
    try:
        return info.select(request)
    finally:
        model.train(was_training)
