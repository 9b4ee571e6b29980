"""``lorp-fold``: lorp-loss's selection with both corrections folded into the weights.

The blocks are lorp-loss's (same selection, scoring windows and pass budget); the pipeline then
fits a linear stand-in for every removed run and folds it into the block before the run at the
strength chosen by calibration loss (:mod:`lorp.compensation`), and fits the pruned model's
logit temperature into the final norm (:mod:`lorp.temperature`): ``PruneConfig(method=
"lorp-fold")`` equals ``method="lorp-loss", compensate=True, temperature=True``. Models that
cannot take the fold (Gemma 2/3, GPT-2) are refused, naming lorp-loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from . import lorp_loss
from ._base import Fold

NAME = "lorp-fold"
LABEL = "LoRP-fold (lorp-loss with the tuned fold and the logit temperature)"


def explain(sel: Mapping[str, Any]) -> str:
    """lorp-loss's prose (the selection is lorp-loss's) and what is folded in on top."""
    return (
        f"{lorp_loss.explain(sel)} A linear stand-in for every removed run was then folded "
        "into the block before it, and the pruned model's logit temperature into its final norm."
    )


METHOD = replace(
    lorp_loss.METHOD,
    name=NAME,
    order=80,
    label=LABEL,
    description="lorp-loss's selection with the tuned linear fold (compensate) and the logit "
    "temperature",
    explain=explain,
    fold=Fold(of=lorp_loss.NAME, compensate=True, temperature=True),
)
