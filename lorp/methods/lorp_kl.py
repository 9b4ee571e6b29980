"""``lorp-kl``: LoRP's structure with a measured objective (model in the loop).

Phases (RLS policy K or a forced K, spectral clustering) and the two-stage allocation are
LoRP's, so every phase loses exactly as many blocks as in LoRP ("quotas") and the slots are
filled in LoRP's removal order. For each slot of phase c the candidates are the first
``candidates_per_slot`` (default 3) not yet removed members of c's LoRP candidate list
(redundancy order); each candidate is measured by mean KL(dense || pruned) on the scoring
windows with the blocks chosen so far plus the candidate removed
(:class:`lorp.scoring.WindowScorer` with the dense reference), and the lowest KL wins (ties:
LoRP's order). A slot with one candidate left is filled without measuring.
Cost: 1 dense pass + at most k × candidates_per_slot passes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ._base import MethodInfo, SelectionRequest, check_per_slot, selection_facts, windows_text

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from ..scoring import WindowScorer
    from ..selection import Selection

NAME = "lorp-kl"
LABEL = "LoRP-KL"


def _lorp_slots(base: Selection) -> tuple[list[int], list[int], list[list[int]]]:
    """(phase of every slot in LoRP's removal order, stage of every slot, candidate lists)."""
    assert base.labels is not None
    order = list(base.details["removal_order"])
    stages = list(base.details["stages"])
    candidates = [list(c) for c in base.details["candidates"]]
    return [base.labels[layer] for layer in order], stages, candidates


def planned_passes(base: Selection, per_slot: int) -> int:
    """Exact number of passes lorp-kl will run from the LoRP selection ``base`` with
    ``per_slot`` candidates per slot (pool sizes do not depend on the choices)."""
    phases, _, candidates = _lorp_slots(base)
    used: dict[int, int] = {}
    total = 0
    for c in phases:
        pool = len(candidates[c]) - used.get(c, 0)
        if pool >= 2:
            total += min(per_slot, pool)
        used[c] = used.get(c, 0) + 1
    return total


def lorp_kl_select(
    similarity: ArrayLike,
    num_remove: int | float,
    scorer: WindowScorer,
    *,
    num_clusters: int | None = None,
    candidates_per_slot: int = 3,
) -> Selection:
    """LoRP's phases and quotas, each slot filled by measured KL (module docstring)."""
    from ..selection import Selection, select_layers, validate_similarity

    per_slot = check_per_slot(candidates_per_slot)
    if not scorer.reference:
        raise InvalidInputError("lorp-kl needs a scorer with a dense reference (reference=True)")
    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    if n != scorer.num_layers:
        raise InvalidInputError(f"similarity is {n}x{n}, model has {scorer.num_layers} blocks")
    start = time.perf_counter()
    base = select_layers(matrix, num_remove, method="lorp", num_clusters=num_clusters)
    phases, stages, candidates = _lorp_slots(base)
    passes0 = scorer.passes
    planned = planned_passes(base, per_slot)
    scorer.planned = passes0 + planned + (0 if scorer.cached(()) else 1)
    removed: list[int] = []
    slots: list[dict[str, Any]] = []
    for c, stage in zip(phases, stages, strict=True):
        pool = [m for m in candidates[c] if m not in removed][:per_slot]
        kls: dict[int, float] = {}
        if len(pool) >= 2:
            scorer.prefetch([[*removed, m] for m in pool])
            for m in pool:
                kl = scorer.score([*removed, m]).kl
                assert kl is not None
                kls[m] = kl
            choice = min(pool, key=lambda m: kls[m])  # pool in LoRP order: ties keep it
        else:
            choice = pool[0]
        removed.append(choice)
        slots.append(
            {
                "phase": c,
                "stage": stage,
                "candidates": pool,
                "kl": {str(m): v for m, v in kls.items()},
                "chosen": choice,
                "lorp_choice": pool[0],
            }
        )
    final = scorer.score(removed)
    quotas = {str(c): phases.count(c) for c in sorted(set(phases))}
    details = {
        "objective": "kl",
        "num_clusters_source": base.details.get("num_clusters_source"),
        "scores": base.details.get("scores"),
        "removal_order": list(removed),
        "stages": stages,
        "candidates": candidates,
        "quotas": quotas,
        "slots": slots,
        "candidates_per_slot": per_slot,
        "lorp_removed": list(base.removed),
        "kl": final.kl,
        "nll": final.nll,
        "top1_agreement": final.top1_agreement,
        "passes": scorer.passes - passes0,
        "search_s": time.perf_counter() - start,
        "scoring": scorer.info(),
    }
    return Selection(
        method=NAME,
        num_layers=n,
        removed=sorted(removed),
        rls=base.rls,
        num_clusters=base.num_clusters,
        labels=base.labels,
        details=details,
    )


def select(request: SelectionRequest) -> Selection:
    scorer = request.scorer(reference=True)  # measures KL against the dense model
    return lorp_kl_select(
        request.similarity,
        request.num_remove,
        scorer,
        num_clusters=request.num_clusters,
        candidates_per_slot=request.candidates_per_slot,
    )


def explain(sel: Mapping[str, Any]) -> str:
    rls_text, _, _ = selection_facts(sel)
    details = sel.get("details") or {}
    return (
        f"{LABEL}: LoRP's phases (K = {sel.get('num_clusters')}, RLS = {rls_text}) and its "
        f"per-phase budget; within each phase the block to remove was chosen among the "
        f"{details.get('candidates_per_slot', '?')} most redundant by the lowest KL "
        f"divergence from the full model on {windows_text(sel)} of calibration text "
        f"({details.get('passes', '?')} forward passes; plain LoRP would remove "
        f"{details.get('lorp_removed')})."
    )


METHOD = MethodInfo(
    name=NAME,
    order=50,
    label=LABEL,
    description="LoRP's phases and quotas, each slot filled by the candidate with the lowest "
    "KL from the dense model on scoring windows",
    select=select,
    explain=explain,
    needs_model=True,
    takes_clusters=True,
    scoring=(4, 256),  # many passes, so fewer tokens per pass than auto
)
