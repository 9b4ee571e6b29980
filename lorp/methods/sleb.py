"""``sleb``: SLEB-style iterative removal by the measured loss (model in the loop).

Start from the dense model; at each of k steps try removing every remaining interior block b
(1..N−2, like every method here the first and last blocks are protected) on top of the blocks
already removed, and remove the b with the lowest mean NLL on the scoring windows (ties: the
shallower block; :class:`lorp.scoring.WindowScorer`). Needs no similarity matrix.
Cost: Σ_{s=0}^{k−1} (N−2−s) passes (SmolLM2, N=30, k=9: 216 passes) — far more than LoRP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ._base import MethodInfo, SelectionRequest, selection_facts, windows_text

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from ..scoring import WindowScorer
    from ..selection import Selection

NAME = "sleb"
LABEL = "SLEB (iterative, by calibration loss)"


def sleb_select(
    scorer: WindowScorer, num_remove: int | float, *, similarity: ArrayLike | None = None
) -> Selection:
    """SLEB-style greedy removal by scoring-window NLL (module docstring). ``similarity`` is
    optional (only for the RLS in the result)."""
    from ..selection import (
        Selection,
        representation_locality_score,
        resolve_budget,
        validate_similarity,
    )

    n = scorer.num_layers
    matrix = None if similarity is None else validate_similarity(similarity)
    if matrix is not None and matrix.shape[0] != n:
        raise InvalidInputError(
            f"similarity is {matrix.shape[0]}x{matrix.shape[0]}, model has {n} blocks"
        )
    k = resolve_budget(n, num_remove)
    start = time.perf_counter()
    passes0 = scorer.passes
    scorer.planned = passes0 + sum(n - 2 - s for s in range(k))
    removed: list[int] = []
    steps: list[dict[str, Any]] = []
    first_scores: list[float | None] = [None] * n
    for step in range(k):
        pool = [b for b in range(1, n - 1) if b not in removed]
        scorer.prefetch([[*removed, b] for b in pool])
        nll = {b: scorer.score([*removed, b]).nll for b in pool}
        best = min(pool, key=lambda b: nll[b])  # pool ascending: ties go to the shallower block
        if step == 0:
            for b, v in nll.items():
                first_scores[b] = v
        removed.append(best)
        steps.append(
            {
                "removed": best,
                "nll": nll[best],
                "nll_by_block": {str(b): v for b, v in nll.items()},
                "elapsed_s": time.perf_counter() - start,
            }
        )
    return Selection(
        method=NAME,
        num_layers=n,
        removed=sorted(removed),
        rls=math.nan if matrix is None else representation_locality_score(matrix),
        details={
            "objective": "nll",
            "scores": first_scores,
            "removal_order": list(removed),
            "steps": steps,
            "passes": scorer.passes - passes0,
            "search_s": time.perf_counter() - start,
            "scoring": scorer.info(),
        },
    )


def select(request: SelectionRequest) -> Selection:
    scorer = request.scorer()  # ranks by loss: no dense pass
    return sleb_select(scorer, request.num_remove, similarity=request.similarity)


def explain(sel: Mapping[str, Any]) -> str:
    rls_text, _, k = selection_facts(sel)
    details = sel.get("details") or {}
    return (
        f"{LABEL}: starting from the full model, {k} times the block whose removal gave the "
        f"lowest loss on {windows_text(sel)} of calibration text was removed "
        f"({details.get('passes', '?')} forward passes). RLS = {rls_text} (for information)."
    )


METHOD = MethodInfo(
    name=NAME,
    order=40,
    label=LABEL,
    description="SLEB: removes blocks one at a time, each the one whose removal gives the "
    "lowest loss on scoring windows",
    select=select,
    explain=explain,
    needs_model=True,
    scoring=(4, 256),  # many passes, so fewer tokens per pass than auto
)
