"""``lorp``: Locality-Aware Redundancy Pruning, from the similarity matrix S alone.

The Representation Locality Score (RLS) picks a number of phases K (or K is forced), spectral
clustering splits the layers into K phases, and a two-stage allocation removes the most
redundant layers phase by phase (:func:`lorp.selection.allocate`; ``docs/LORP_METHOD.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._base import MethodInfo, SelectionRequest, selection_facts, similarity_facts

if TYPE_CHECKING:
    from ..selection import Selection

NAME = "lorp"
LABEL = "LoRP"


def select(request: SelectionRequest) -> Selection:
    """LoRP at the RLS policy's K, or at ``request.num_clusters`` when given."""
    from ..selection import (
        Selection,
        allocate,
        check_num_clusters,
        policy_num_clusters,
        spectral_phases,
    )

    matrix, n, k, details, rls = similarity_facts(request)
    if request.num_clusters is None:
        num_k = policy_num_clusters(rls)
        details["num_clusters_source"] = "policy"
    else:
        num_k = check_num_clusters(request.num_clusters, n)
        details["num_clusters_source"] = "forced"
    labels = spectral_phases(matrix, num_k)
    alloc = allocate(matrix, labels, k)
    details["scores"] = [r if math.isfinite(r) else None for r in alloc.redundancy]
    details["removal_order"] = list(alloc.order)
    details["stages"] = list(alloc.stages)
    details["candidates"] = [list(alloc.candidates.get(c, [])) for c in range(num_k)]
    return Selection(
        method=NAME,
        num_layers=n,
        removed=alloc.removed,
        rls=rls,
        num_clusters=num_k,
        labels=labels,
        details=details,
    )


def explain(sel: Mapping[str, Any]) -> str:
    rls_text, n, k = selection_facts(sel)
    rls = sel.get("rls")
    kind = "n/a"
    if rls is not None:
        kind = (
            "localised (similarity decays fast with depth)"
            if rls >= 1.0
            else "intermediate"
            if rls >= 0.7
            else "distributed (blocks similar across depth)"
        )
    clusters = sel.get("num_clusters")
    return (
        f"{LABEL}: the Representation Locality Score RLS = {rls_text} marks this model's "
        f"representations as {kind}; it was split into K = {clusters} phases by spectral "
        f"clustering of S. Every phase first loses its most redundant block (coverage), the "
        f"rest of the budget goes to the phases whose remaining blocks are most alike, "
        f"giving {k} of {n} blocks removed. The first and the last block are never removed."
    )


METHOD = MethodInfo(
    name=NAME,
    order=10,
    label=LABEL,
    description="Locality-Aware Redundancy Pruning: phases of S (RLS policy K, spectral "
    "clustering), the most redundant blocks removed phase by phase",
    select=select,
    explain=explain,
    takes_clusters=True,
)
