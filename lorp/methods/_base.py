"""The record every selection method registers, and small helpers its file may share.

Nothing here imports torch, numpy, scikit-learn or transformers (directly or through another
``lorp`` module), and neither may a method file at import time: the API process reads the
registry without loading them. A method file imports what its :attr:`MethodInfo.select` needs
inside that function (the registry's only reason for function-level imports).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ..progress import ProgressCallback

if TYPE_CHECKING:
    from ..scoring import WindowScorer
    from ..selection import Selection

__all__ = [
    "DEFAULT_SCORING",
    "Fold",
    "MethodInfo",
    "PassBudget",
    "SelectionRequest",
    "check_per_slot",
    "generic_explain",
    "selection_facts",
    "similarity_facts",
    "windows_text",
]

#: Scoring windows (count, tokens) for a model-in-the-loop method that declares none, and what
#: :attr:`lorp.pipeline.PruneConfig.scoring_shape` reports for the S-only methods.
DEFAULT_SCORING: tuple[int, int] = (4, 256)

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class SelectionRequest:
    """What a method's :attr:`MethodInfo.select` gets.

    ``similarity``: the block-input similarity matrix S (N x N; already validated when it comes
    from :func:`lorp.selection.select_layers` or :func:`lorp.search.search_layers`).
    ``num_remove``: a block count or a fraction (:func:`lorp.selection.resolve_budget`).
    ``num_clusters``: a forced number of LoRP phases (only for methods with ``takes_clusters``).
    The rest is for methods with ``needs_model``: the model (in eval mode), its scoring windows
    ``[W, T]``, the batch size, ``candidates_per_slot`` (lorp-kl, auto), ``max_passes`` (the
    method's :attr:`MethodInfo.pass_budget`, ``None``: no limit) and the progress callback.
    """

    similarity: Any
    num_remove: int | float
    num_clusters: int | None = None
    model: Any = None
    windows: Any = None
    batch_size: int = 1
    candidates_per_slot: int = 3
    max_passes: int | None = None
    progress: ProgressCallback | None = None

    def scorer(self, *, reference: bool = False) -> WindowScorer:
        """A :class:`lorp.scoring.WindowScorer` over this request's model and windows
        (``reference``: keep the dense log-probabilities, for KL; the loss needs none)."""
        from ..scoring import WindowScorer

        return WindowScorer(
            self.model,
            self.windows,
            batch_size=self.batch_size,
            reference=reference,
            progress=self.progress,
        )


#: ``pass_budget(model, calibration_tokens, (windows, tokens), num_remove)``: the ``max_passes``
#: the pipeline gives a model-in-the-loop method.
PassBudget = Callable[[Any, int, tuple[int, int], int], int | None]


#: Healing a fold's maps (:mod:`lorp.heal`): Adam's default learning rate on the maps, the most
#: steps one heal may take, and every how many steps the held-out loss is measured. Here, free
#: of heavy imports, so the CLI and the job spec (its admission estimate) share them.
HEAL_LR = 1e-3
MAX_HEAL_STEPS = 10_000
HEAL_EVAL_EVERY = 5


@dataclass(frozen=True)
class Fold:
    """A pipeline method that is another method's selection with corrections turned on
    (:class:`lorp.pipeline.PruneConfig` sets ``compensate`` / ``temperature``)."""

    of: str
    compensate: bool = False
    temperature: bool = False


@dataclass(frozen=True)
class MethodInfo:
    """One selection method, as the library, the CLI, the REST API and the reports see it.

    ``name``: what users type (``--method``, ``PruneConfig.method``, the REST enum).
    ``order``: place in every method list (ascending). ``label``: the name the report prints.
    ``description``: one line for the CLI and REST help. ``select``: the entry point.
    ``explain``: the report's prose for a selection of this method (its JSON dict, as in
    ``report.json``'s ``selection``). ``needs_model``: the method runs the model on scoring
    windows (``scoring``: their default (count, tokens)) and may have a ``pass_budget``.
    ``takes_clusters``: accepts a forced number of LoRP phases. ``fold``: the method is
    another's selection with corrections (its ``select`` is that method's).
    """

    name: str
    order: int
    label: str
    description: str
    select: Callable[[SelectionRequest], Selection]
    explain: Callable[[Mapping[str, Any]], str]
    needs_model: bool = False
    takes_clusters: bool = False
    scoring: tuple[int, int] | None = None
    pass_budget: PassBudget | None = None
    fold: Fold | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"method name {self.name!r}: lowercase letters, digits and '-'")
        for field_name in ("label", "description"):
            text = getattr(self, field_name)
            if not isinstance(text, str) or not text.strip() or "\n" in text:
                raise ValueError(f"method {self.name!r}: {field_name} must be one non-empty line")
        if self.needs_model != (self.scoring is not None):
            raise ValueError(f"method {self.name!r}: scoring defaults go with needs_model")
        if self.pass_budget is not None and not self.needs_model:
            raise ValueError(f"method {self.name!r}: a pass budget needs needs_model")
        if self.fold is not None and self.fold.of == self.name:
            raise ValueError(f"method {self.name!r} cannot be a fold of itself")

    @property
    def scoring_shape(self) -> tuple[int, int]:
        """(windows, tokens) of the scoring windows by default (:data:`DEFAULT_SCORING` for a
        method that runs no model)."""
        return self.scoring or DEFAULT_SCORING


# --------------------------------------------------------------------------------------------
# Helpers for method files
# --------------------------------------------------------------------------------------------


def check_per_slot(candidates_per_slot: int) -> int:
    """A positive integer count of candidates (per removal slot or per phase)."""
    if isinstance(candidates_per_slot, bool) or not isinstance(candidates_per_slot, int):
        raise InvalidInputError(
            f"candidates_per_slot must be an integer, got {candidates_per_slot!r}"
        )
    if candidates_per_slot < 1:
        raise InvalidInputError(
            f"candidates_per_slot must be at least 1, got {candidates_per_slot}"
        )
    return candidates_per_slot


def similarity_facts(request: SelectionRequest) -> tuple[Any, int, int, dict[str, Any], float]:
    """What every S-only method starts from: the validated matrix S, its size N, the number of
    blocks to remove k, ``details`` holding S's mean similarity, and the RLS."""
    from ..selection import mean_and_rls, resolve_budget, validate_similarity

    matrix = validate_similarity(request.similarity)
    n = matrix.shape[0]
    k = resolve_budget(n, request.num_remove)
    mean, rls = mean_and_rls(matrix)
    return matrix, n, k, {"mean_similarity": mean}, rls


def selection_facts(sel: Mapping[str, Any]) -> tuple[str, Any, int]:
    """(RLS as text, number of blocks, number removed) of a selection dict, for prose."""
    rls = sel.get("rls")
    rls_text = "n/a" if rls is None else f"{rls:.3f}"
    return rls_text, sel.get("num_layers"), len(sel.get("removed") or [])


def windows_text(sel: Mapping[str, Any]) -> str:
    """ "W scoring windows x T tokens" from a model-in-the-loop selection's details."""
    scoring = (sel.get("details") or {}).get("scoring") or {}
    return f"{scoring.get('windows', '?')} scoring windows x {scoring.get('seq_len', '?')} tokens"


def generic_explain(sel: Mapping[str, Any], label: str) -> str:
    """The report's prose for a method with nothing more specific to say."""
    rls_text, n, k = selection_facts(sel)
    return f"{label}: {k} of {n} blocks removed. RLS = {rls_text}."
