"""``shortgpt``: Block Influence, the k blocks whose input and output are most alike.

Removes the k layers i in 1..N-2 with the highest ``S[i, i+1]`` (ties: the lower index;
:func:`lorp.selection.shortgpt_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._base import MethodInfo, SelectionRequest, selection_facts, similarity_facts

if TYPE_CHECKING:
    from ..selection import Selection

NAME = "shortgpt"
LABEL = "ShortGPT"


def select(request: SelectionRequest) -> Selection:
    from ..selection import Selection, shortgpt_layers

    matrix, n, k, details, rls = similarity_facts(request)
    removed = shortgpt_layers(matrix, k)
    details["scores"] = [float(matrix[i, i + 1]) if 1 <= i <= n - 2 else None for i in range(n)]
    return Selection(method=NAME, num_layers=n, removed=removed, rls=rls, details=details)


def explain(sel: Mapping[str, Any]) -> str:
    rls_text, _, k = selection_facts(sel)
    return (
        f"{LABEL}: the {k} blocks whose input and output are most alike (highest cosine "
        f"S[i, i+1], Block Influence) were removed. RLS = {rls_text} (for information)."
    )


METHOD = MethodInfo(
    name=NAME,
    order=20,
    label=LABEL,
    description="ShortGPT's Block Influence: the blocks whose input and output are most "
    "alike in S (S[i, i+1])",
    select=select,
    explain=explain,
)
