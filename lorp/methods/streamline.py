"""``streamline``: LLM-Streamline, one contiguous run of blocks.

Removes the run ``[s, s+k)`` whose boundary inputs are most alike, ``S[s, s+k]`` (ties: the
smallest start; :func:`lorp.selection.streamline_layers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._base import MethodInfo, SelectionRequest, selection_facts, similarity_facts

if TYPE_CHECKING:
    from ..selection import Selection

NAME = "streamline"
LABEL = "LLM-Streamline"


def select(request: SelectionRequest) -> Selection:
    from ..selection import Selection, streamline_layers

    matrix, n, k, details, rls = similarity_facts(request)
    removed = streamline_layers(matrix, k)
    details["scores"] = [float(matrix[s, s + k]) if 1 <= s <= n - k - 1 else None for s in range(n)]
    details["start"] = removed[0]
    details["end"] = removed[-1] + 1
    return Selection(method=NAME, num_layers=n, removed=removed, rls=rls, details=details)


def explain(sel: Mapping[str, Any]) -> str:
    rls_text, _, k = selection_facts(sel)
    return (
        f"{LABEL}: one contiguous run of {k} blocks was removed where the input before the "
        f"run and the input after it are most alike. RLS = {rls_text} (for information)."
    )


METHOD = MethodInfo(
    name=NAME,
    order=30,
    label=LABEL,
    description="LLM-Streamline: one contiguous run of blocks whose boundary inputs are most "
    "alike in S",
    select=select,
    explain=explain,
)
