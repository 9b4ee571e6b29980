"""Which blocks to remove, decided from the block-input similarity matrix S alone.

The S-only methods of the registry (:mod:`lorp.methods`: ``lorp``, ``shortgpt``,
``streamline``) share one entry point, :func:`select_layers`; this module holds what they and
the model-in-the-loop methods build on:

- LoRP's pieces: the Representation Locality Score (RLS) and its policy for the number of
  phases K, spectral clustering into K phases, and the two-stage allocation that removes the
  most redundant layers phase by phase (see ``docs/LORP_METHOD.md``);
- ShortGPT's Block Influence (the k layers whose input and output are most alike,
  ``S[i, i+1]``) and LLM-Streamline's run ``[s, s+k)`` whose boundary inputs are most alike,
  ``S[s, s+k]``;
- :class:`Selection` (every method's result), :func:`validate_similarity` and
  :func:`resolve_budget`.

Everything here is a pure function of S (an N×N float matrix, N = number of blocks, ``S[i, j]``
= mean per-token cosine between the inputs of blocks i and j). Layers 0 and N−1 are never removed
by any method, so a budget is valid when 1 ≤ k ≤ N−2.

Tie rules (all deterministic; they agree with the authors' reference code):

* LoRP candidate order inside a phase: redundancy descending, equal redundancy keeps depth order.
* LoRP stage 2: equal residual redundancy goes to the lowest phase index.
* ShortGPT: equal scores go to the lower layer index first.
* Streamline: equal boundary similarity goes to the smallest start.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .errors import BudgetError, InvalidInputError, SimilarityMatrixError
from .methods import SelectionRequest, find_method, method_names

__all__ = [
    "METHODS",
    "Allocation",
    "Selection",
    "allocate",
    "check_num_clusters",
    "mean_and_rls",
    "policy_num_clusters",
    "representation_locality_score",
    "resolve_budget",
    "select_layers",
    "shortgpt_layers",
    "spectral_phases",
    "streamline_layers",
    "validate_similarity",
]

#: The S-only methods of the registry (:mod:`lorp.methods`), in order.
METHODS: tuple[str, ...] = method_names(needs_model=False, fold=False)

# A cosine-similarity matrix computed in float32 is symmetric and inside [-1, 1] only up to
# rounding; these are the slacks validate_similarity allows.
SYMMETRY_TOLERANCE = 1e-5
RANGE_TOLERANCE = 1e-3

# scikit-learn's own symmetry test for a precomputed affinity (``check_symmetric`` default tol).
_SKLEARN_SYMMETRY_TOL = 1e-10


@dataclass(frozen=True)
class Selection:
    """The outcome of a selection: which blocks go, and why.

    ``removed`` is sorted ascending. ``rls`` is computed for every method (it describes the
    model, not the method); it is ``inf`` when the mean off-diagonal similarity is ≤ 0.
    ``num_clusters``/``labels`` (phase of every layer, numbered by depth of first appearance)
    are set for ``lorp`` only. ``details`` holds JSON-safe, method-specific evidence:
    ``scores`` (one entry per layer, ``None`` where the method gives no score) plus, for
    ``lorp``, the removal order, the stage of each removal and each phase's candidate list, and
    for ``streamline`` the chosen run.
    """

    method: str
    num_layers: int
    removed: list[int]
    rls: float
    num_clusters: int | None = None
    labels: list[int] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_removed(self) -> int:
        return len(self.removed)

    @property
    def kept(self) -> list[int]:
        """Indices of the blocks that stay, ascending."""
        gone = set(self.removed)
        return [i for i in range(self.num_layers) if i not in gone]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (a non-finite ``rls`` becomes ``None``)."""
        return {
            "method": self.method,
            "num_layers": self.num_layers,
            "num_removed": self.num_removed,
            "removed": list(self.removed),
            "kept": self.kept,
            "rls": self.rls if math.isfinite(self.rls) else None,
            "num_clusters": self.num_clusters,
            "labels": None if self.labels is None else list(self.labels),
            "details": _json_safe(self.details),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        """Inverse of :meth:`to_dict` (derived keys ``num_removed``/``kept`` are ignored)."""
        try:
            rls = data["rls"]
            labels = data.get("labels")
            return cls(
                method=str(data["method"]),
                num_layers=int(data["num_layers"]),
                removed=sorted(int(i) for i in data["removed"]),
                rls=math.inf if rls is None else float(rls),
                num_clusters=None
                if data.get("num_clusters") is None
                else int(data["num_clusters"]),
                labels=None if labels is None else [int(c) for c in labels],
                details=dict(data.get("details") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"not a selection dict: {exc}") from exc


@dataclass(frozen=True)
class Allocation:
    """The two-stage allocation's trace. ``order`` is the removal order (not sorted)."""

    order: list[int]
    stages: list[int]  # 1 (coverage) or 2 (residual), one per entry of ``order``
    candidates: dict[int, list[int]]  # phase -> unprotected members, most redundant first
    redundancy: list[float]  # member redundancy r(l) of every layer (-inf for a singleton phase)

    @property
    def removed(self) -> list[int]:
        return sorted(self.order)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def validate_similarity(similarity: ArrayLike) -> np.ndarray:
    """Check S and return it as a new float64 array with its diagonal set to 1.

    Raises :class:`SimilarityMatrixError` unless S is a finite, symmetric (within
    ``SYMMETRY_TOLERANCE``) N×N matrix with N ≥ 3 and entries in [−1, 1] (within
    ``RANGE_TOLERANCE``). The diagonal is never used by any method; it is normalised to 1.
    """
    try:
        matrix = np.array(similarity, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise SimilarityMatrixError(f"similarity matrix is not numeric: {exc}") from exc
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise SimilarityMatrixError(
            f"similarity matrix must be square (N×N), got shape {tuple(matrix.shape)}"
        )
    n = matrix.shape[0]
    if n < 3:
        raise SimilarityMatrixError(
            f"similarity matrix must cover at least 3 layers (first and last are protected), "
            f"got {n}"
        )
    if not np.all(np.isfinite(matrix)):
        bad = np.argwhere(~np.isfinite(matrix))[0]
        raise SimilarityMatrixError(
            f"similarity matrix must be finite; entry {tuple(int(i) for i in bad)} is "
            f"{matrix[tuple(bad)]}"
        )
    asym = float(np.max(np.abs(matrix - matrix.T)))
    if asym > SYMMETRY_TOLERANCE:
        raise SimilarityMatrixError(
            f"similarity matrix must be symmetric; max |S - S.T| = {asym:.3g} "
            f"(tolerance {SYMMETRY_TOLERANCE:g})"
        )
    lo, hi = float(matrix.min()), float(matrix.max())
    if lo < -1.0 - RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise SimilarityMatrixError(
            f"similarity entries must be cosines in [-1, 1], got range [{lo:.4g}, {hi:.4g}]"
        )
    np.fill_diagonal(matrix, 1.0)
    return matrix


def resolve_budget(num_layers: int, budget: int | float) -> int:
    """Turn a budget into a number of blocks to remove.

    An ``int`` is a block count; a ``float`` strictly between 0 and 1 is a fraction of
    ``num_layers``, rounded to the nearest count (halves round up) and at least 1. The result
    must lie in 1..N−2 because layers 0 and N−1 are protected; anything else (including
    ``bool``, NaN and floats outside (0, 1)) raises :class:`BudgetError`.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral):
        raise InvalidInputError(f"num_layers must be an integer, got {num_layers!r}")
    n = int(num_layers)
    max_k = n - 2
    if max_k < 1:
        raise BudgetError(
            f"a model with {n} layers has no removable blocks (layers 0 and N-1 are protected; "
            f"at least 3 layers are needed)"
        )
    limits = (
        f"a block count from 1 to {max_k} (layers 0 and {n - 1} of {n} are protected) "
        f"or a fraction strictly between 0 and 1"
    )
    if isinstance(budget, bool):
        raise BudgetError(f"budget must be {limits}, got a bool ({budget!r})")
    if isinstance(budget, numbers.Integral):
        k = int(budget)
        if not 1 <= k <= max_k:
            raise BudgetError(f"budget must be {limits}, got {k} blocks")
        return k
    if isinstance(budget, numbers.Real):
        fraction = float(budget)
        if not (0.0 < fraction < 1.0):  # also rejects NaN
            raise BudgetError(f"budget must be {limits}, got {fraction!r}")
        k = max(1, math.floor(fraction * n + 0.5))
        if k > max_k:
            raise BudgetError(
                f"fraction {fraction:g} of {n} layers is {k} blocks; budget must be {limits}"
            )
        return k
    raise BudgetError(f"budget must be {limits}, got {budget!r}")


# --------------------------------------------------------------------------------------------
# LoRP
# --------------------------------------------------------------------------------------------


def mean_and_rls(matrix: np.ndarray) -> tuple[float, float]:
    """(mean_{i<j} S_ij, RLS) of a validated S (:func:`validate_similarity`); the RLS is
    ``inf`` when the mean is ≤ 0."""
    n = matrix.shape[0]
    mean = float(matrix[np.triu_indices(n, k=1)].mean())
    return mean, (math.inf if mean <= 0.0 else -math.log2(mean))


def representation_locality_score(similarity: ArrayLike) -> float:
    """RLS = −log2(mean_{i<j} S_ij); ``inf`` if that mean is ≤ 0 (similarity fully decayed)."""
    return mean_and_rls(validate_similarity(similarity))[1]


def policy_num_clusters(rls: float) -> int:
    """Number of phases K from the RLS: ≥ 1.0 → 2, [0.7, 1.0) → 3, < 0.7 → 4."""
    if math.isnan(rls):
        raise InvalidInputError("RLS is NaN")
    if rls >= 1.0:
        return 2
    if rls >= 0.7:
        return 3
    return 4


def check_num_clusters(num_clusters: Any, num_layers: int) -> int:
    """A forced number of LoRP phases: an integer from 2 to ``num_layers``."""
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, numbers.Integral):
        raise InvalidInputError(f"num_clusters must be an integer, got {num_clusters!r}")
    k = int(num_clusters)
    if not 2 <= k <= num_layers:
        raise InvalidInputError(
            f"num_clusters must be from 2 to the number of layers ({num_layers}), got {k}"
        )
    return k


def _renumber_by_depth(raw: Sequence[int]) -> list[int]:
    """Relabel clusters so the one holding layer 0 is 0, the next new one met going deeper 1..."""
    mapping: dict[int, int] = {}
    for c in raw:
        mapping.setdefault(int(c), len(mapping))
    return [mapping[int(c)] for c in raw]


def spectral_phases(similarity: ArrayLike, num_clusters: int) -> list[int]:
    """Phase label of every layer: spectral clustering of A = (S + 1) / 2 (diagonal 1).

    Uses scikit-learn ``SpectralClustering(n_clusters=K, affinity="precomputed",
    random_state=0, assign_labels="kmeans")``; labels are renumbered by depth of first
    appearance. Phases need not be contiguous, and k-means may return fewer than K distinct
    phases on degenerate matrices. K equal to the number of layers puts every layer in its own
    phase without running the clustering.
    """
    from sklearn.cluster import SpectralClustering

    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    k = check_num_clusters(num_clusters, n)
    if k == n:
        return list(range(n))
    affinity = np.clip((matrix + 1.0) / 2.0, 0.0, None)
    np.fill_diagonal(affinity, 1.0)
    if not np.allclose(affinity, affinity.T, atol=_SKLEARN_SYMMETRY_TOL):
        # What scikit-learn would do itself (after a warning) for a slightly asymmetric input.
        affinity = 0.5 * (affinity + affinity.T)
    model = SpectralClustering(
        n_clusters=k, affinity="precomputed", random_state=0, assign_labels="kmeans"
    )
    raw = model.fit_predict(affinity)
    return _renumber_by_depth([int(c) for c in raw])


def _pairwise_mean(matrix: np.ndarray, members: Sequence[int]) -> float:
    """Mean of S over pairs i<j of ``members`` (−inf for fewer than 2), summed in pair order."""
    m = len(members)
    if m < 2:
        return -math.inf
    block = matrix[np.ix_(members, members)]
    values = block[np.triu_indices(m, k=1)]
    # Left-to-right summation (cumsum is sequential), so exact ties resolve like a plain loop.
    return float(np.cumsum(values)[-1]) / values.size


def allocate(similarity: ArrayLike, labels: Sequence[int], num_remove: int) -> Allocation:
    """LoRP's two-stage, redundancy-aware allocation of ``num_remove`` removals over phases.

    ``labels[l]`` is the phase of layer l (any integers; phases are visited in ascending label
    order). Layers 0 and N−1 are protected. Raises :class:`BudgetError` if ``num_remove`` is not
    in 1..N−2 (with that budget the allocation always succeeds).
    """
    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    if len(labels) != n:
        raise InvalidInputError(f"need one label per layer ({n}), got {len(labels)}")
    k = _integer_budget(n, num_remove)
    phase_of = [int(c) for c in labels]
    members: dict[int, list[int]] = {}
    for layer, c in enumerate(phase_of):
        members.setdefault(c, []).append(layer)  # depth order
    phases = sorted(members)
    protected = {0, n - 1}

    redundancy = [-math.inf] * n
    for layer in range(n):
        others = [m for m in members[phase_of[layer]] if m != layer]
        if others:
            redundancy[layer] = float(np.mean(matrix[layer, others]))

    # Stable sort on negated redundancy: highest first, equal values keep depth order.
    candidates = {
        c: sorted((m for m in members[c] if m not in protected), key=lambda m: -redundancy[m])
        for c in phases
    }
    next_idx = dict.fromkeys(phases, 0)
    order: list[int] = []
    stages: list[int] = []
    removed: set[int] = set()

    def take(c: int, stage: int) -> None:
        layer = candidates[c][next_idx[c]]
        next_idx[c] += 1
        order.append(layer)
        stages.append(stage)
        removed.add(layer)

    # Stage 1 (coverage): one removal per phase, in phase order.
    for c in phases:
        if len(order) >= k:
            break
        if next_idx[c] < len(candidates[c]):
            take(c, 1)

    # Stage 2 (residual): the phase whose remaining members are most alike gives up its next one.
    while len(order) < k:
        open_phases = [c for c in phases if next_idx[c] < len(candidates[c])]
        if not open_phases:  # impossible when k <= N-2; kept as a guard
            raise BudgetError(f"only {len(order)} of {k} blocks could be allocated")
        best: int | None = None
        best_score = -math.inf
        for c in open_phases:
            score = _pairwise_mean(matrix, [m for m in members[c] if m not in removed])
            if score > best_score:  # strict: ties keep the lower phase; -inf never wins
                best, best_score = c, score
        take(open_phases[0] if best is None else best, 2)

    return Allocation(
        order=order,
        stages=stages,
        candidates=candidates,
        redundancy=redundancy,
    )


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def shortgpt_layers(similarity: ArrayLike, num_remove: int) -> list[int]:
    """ShortGPT: the k layers i ∈ [1, N−2] with the highest S[i, i+1], ascending.

    Layer 0 is protected and layer N−1 has no output in S, so neither is scored. Equal scores
    go to the lower index first.
    """
    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    k = _integer_budget(n, num_remove)
    scored = range(1, n - 1)
    ranked = sorted(scored, key=lambda i: -matrix[i, i + 1])  # stable: ties keep lower index
    return sorted(ranked[:k])


def _streamline_start(matrix: np.ndarray, k: int) -> int:
    n = matrix.shape[0]
    best_s, best = 1, -math.inf
    for s in range(1, n - k):  # s + k <= N - 1
        value = float(matrix[s, s + k])
        if value > best:  # strict: ties keep the smallest start
            best_s, best = s, value
    return best_s


def streamline_layers(similarity: ArrayLike, num_remove: int) -> list[int]:
    """LLM-Streamline: the run [s, s+k), s ∈ [1, N−k−1], maximising S[s, s+k] (ties: smallest s)."""
    matrix = validate_similarity(similarity)
    k = _integer_budget(matrix.shape[0], num_remove)
    s = _streamline_start(matrix, k)
    return list(range(s, s + k))


def _integer_budget(num_layers: int, num_remove: int) -> int:
    if isinstance(num_remove, bool) or not isinstance(num_remove, numbers.Integral):
        raise BudgetError(f"num_remove must be an integer block count, got {num_remove!r}")
    return resolve_budget(num_layers, num_remove)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def select_layers(
    similarity: ArrayLike,
    num_remove: int | float,
    method: str = "lorp",
    num_clusters: int | None = None,
) -> Selection:
    """Choose the blocks to remove with the S-only ``method`` (one of :data:`METHODS`).

    ``num_remove`` is a block count or a fraction of the layers (see :func:`resolve_budget`).
    ``num_clusters`` forces LoRP's K (2..N) instead of the RLS policy; it is an error for the
    methods that take no K. Raises :class:`InvalidInputError` (unknown method, bad
    ``num_clusters``), :class:`SimilarityMatrixError` or :class:`BudgetError`.
    """
    info = find_method(method)
    if info is None or info.needs_model or info.fold is not None:
        valid = method_names(needs_model=False, fold=False)
        raise InvalidInputError(
            f"unknown selection method {method!r}; valid methods: {', '.join(valid)}"
        )
    matrix = validate_similarity(similarity)
    k = resolve_budget(matrix.shape[0], num_remove)
    if num_clusters is not None and not info.takes_clusters:
        takes = method_names(needs_model=False, fold=False, takes_clusters=True)
        raise InvalidInputError(
            f"num_clusters only applies to method{'s' if len(takes) > 1 else ''} "
            f"{', '.join(repr(m) for m in takes)}, not {method!r}"
        )
    return info.select(SelectionRequest(similarity=matrix, num_remove=k, num_clusters=num_clusters))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_safe(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    return str(value)
