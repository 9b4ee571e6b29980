"""The report's words for a selection: each method's label and prose come from the method
registry (:mod:`lorp.methods`, a method's ``label`` and ``explain``); a method the registry does
not know gets its name and a plain summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..methods import find_method, generic_explain

__all__ = ["block_ranges", "explain", "method_label"]


def method_label(method: str) -> str:
    """The name the report prints for ``method`` (the registry's label; else the name itself)."""
    info = find_method(method)
    return method if info is None else info.label


def explain(sel: Mapping[str, Any]) -> str:
    """The report's prose for a selection dict: its method's ``explain`` in the registry
    (:mod:`lorp.methods`); a method the registry does not know gets a plain summary."""
    method = str(sel.get("method", ""))
    info = find_method(method)
    if info is None:
        return generic_explain(sel, method)
    return info.explain(sel)


def block_ranges(members: Sequence[int]) -> str:
    """Block indices as runs: [0,1,2,5,7,8] -> '0–2, 5, 7–8'."""
    runs: list[list[int]] = []
    for m in members:
        if runs and m == runs[-1][-1] + 1:
            runs[-1].append(m)
        else:
            runs.append([m])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)
