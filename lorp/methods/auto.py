"""``auto``: the best of the S-based selections, measured on scoring windows (model in the loop).

Compute candidate selections from S with every S-based method — LoRP with the policy K, LoRP
with K forced to each other value in 2..4, ShortGPT, LLM-Streamline — plus ``lorp-kl`` when
affordable and a dense reference is kept (below), dedupe them, measure each distinct removal
set by its mean next-token loss (NLL) on the scoring windows (default 8 x 512 tokens;
``objective="kl"`` ranks by KL(dense || pruned) instead, at one more pass) and keep the lowest
(ties: the order above). The sets are raced (:func:`lorp.scoring.race`): all are measured on the
first quarter of the windows, those more than :data:`lorp.scoring.RACE_MARGIN` (0.25 nats)
behind the best there are dropped, the rest finish (a lone survivor has won); on SmolLM2 at 3,
6 and 9 removed blocks this cut auto's scoring time (relative to the capture) by 30 %, 36 % and
78 % and changed no choice. NLL is the default because it is what held-out perplexity measures,
needs no dense pass, and on SmolLM2 ranked the candidates as WikiText-2 perplexity does at 3, 6
and 9 removed blocks (KL on 4 x 256 tokens did not at 3). All candidates with their KL,
NLL/perplexity, top-1 agreement and times are recorded in ``Selection.details["candidates"]``.
Affordable: with ``max_passes`` given (the pipeline passes :func:`pass_budget`, i.e.
:func:`lorp.scoring.affordable_passes`, sized so that auto's scoring costs about 3/4 of the
similarity capture, i.e. auto's capture + selection stays near 2× LoRP's), lorp-kl joins when
its planned passes fit in what the S-based candidates leave; its per-slot candidate count is
lowered (down to 2) to fit, else it is left out and the reason recorded. Caveat: lorp-kl chose
its blocks on the same scoring windows auto compares on, so its score is an in-sample one; the
report's quality measurement (evaluation text or other held-out windows) is not affected.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ._base import MethodInfo, SelectionRequest, check_per_slot, selection_facts, windows_text
from .lorp_kl import lorp_kl_select, planned_passes

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from ..scoring import WindowScorer
    from ..selection import Selection

NAME = "auto"
LABEL = "auto"

#: The range of forced K that ``auto`` (and lorp-loss's starting points) try besides the
#: policy K.
AUTO_CLUSTER_RANGE = (2, 4)


def candidate_specs(n: int, rls: float) -> list[tuple[str, str, int | None]]:
    """(name, method, forced K or None) of every S-based candidate, in tie-break order."""
    from ..selection import policy_num_clusters

    policy = policy_num_clusters(rls)
    lo, hi = AUTO_CLUSTER_RANGE
    specs: list[tuple[str, str, int | None]] = [(f"lorp (K={policy}, policy)", "lorp", None)]
    specs += [(f"lorp (K={k})", "lorp", k) for k in range(lo, min(hi, n) + 1) if k != policy]
    specs += [("shortgpt", "shortgpt", None), ("streamline", "streamline", None)]
    return specs


def auto_select(
    similarity: ArrayLike,
    num_remove: int | float,
    scorer: WindowScorer,
    *,
    candidates_per_slot: int = 3,
    max_passes: int | None = None,
    include_lorp_kl: bool | None = None,
    objective: str = "nll",
    race_margin: float | None = None,
) -> Selection:
    """Best of the S-based selections (and lorp-kl when affordable) on the scoring windows.

    ``objective``: ``"nll"`` (mean next-token loss; needs no dense pass) or ``"kl"``
    (KL(dense || pruned); needs a scorer with the dense reference). ``max_passes``: scoring
    passes allowed (``None``: no limit). ``include_lorp_kl``: ``None`` decides by ``max_passes``;
    ``True``/``False`` force it; lorp-kl needs the dense reference in any case.
    ``race_margin``: see :func:`lorp.scoring.race` (``None``: :data:`lorp.scoring.RACE_MARGIN`).
    """
    from ..scoring import RACE_MARGIN, race
    from ..selection import (
        Selection,
        representation_locality_score,
        resolve_budget,
        select_layers,
        validate_similarity,
    )

    if race_margin is None:
        race_margin = RACE_MARGIN
    per_slot = check_per_slot(candidates_per_slot)
    if objective not in ("nll", "kl"):
        raise InvalidInputError(f"auto's objective must be 'nll' or 'kl', got {objective!r}")
    if objective == "kl" and not scorer.reference:
        raise InvalidInputError("objective 'kl' needs a scorer with a dense reference")
    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    if n != scorer.num_layers:
        raise InvalidInputError(f"similarity is {n}x{n}, model has {scorer.num_layers} blocks")
    k = resolve_budget(n, num_remove)
    start = time.perf_counter()
    passes0 = scorer.passes
    rls = representation_locality_score(matrix)

    built: list[tuple[str, Selection, float]] = []
    for name, method, forced in candidate_specs(n, rls):
        t = time.perf_counter()
        sel = select_layers(matrix, k, method=method, num_clusters=forced)
        built.append((name, sel, time.perf_counter() - t))
    distinct = {tuple(sel.removed) for _, sel, _ in built}
    base_passes = len(distinct) + (1 if scorer.reference and not scorer.cached(()) else 0)

    # Is lorp-kl affordable? Its base selection is the policy-K LoRP candidate.
    lorp_base = built[0][1]
    kl_plan: dict[str, Any] = {"included": False}
    kl_per_slot: int | None = None
    if include_lorp_kl is False:
        kl_plan["reason"] = "excluded by the caller"
    elif not scorer.reference:
        kl_plan["reason"] = "lorp-kl needs the dense reference (objective 'kl')"
    else:
        left = None if max_passes is None else max_passes - base_passes
        unlimited = include_lorp_kl is True or left is None
        lowest = per_slot if unlimited else min(2, per_slot)
        for m in range(per_slot, lowest - 1, -1):
            need = planned_passes(lorp_base, m)
            if unlimited or (left is not None and need <= left):
                kl_per_slot = m
                kl_plan = {"included": True, "candidates_per_slot": m, "planned_passes": need}
                break
        if kl_per_slot is None:
            kl_plan["reason"] = (
                f"not affordable: {planned_passes(lorp_base, lowest)} passes needed "
                f"with {lowest} candidates per slot, {max(left or 0, 0)} left of {max_passes} "
                "after the S-based candidates"
            )
    scorer.planned = passes0 + base_passes + int(kl_plan.get("planned_passes", 0))

    records: list[dict[str, Any]] = []
    selections: list[Selection] = []
    first_name: dict[tuple[int, ...], str] = {}
    if scorer.reference:  # the dense reference first, storing the candidates' block inputs
        scorer.prefetch([sel.removed for _, sel, _ in built])
        scorer.score(())
    raced = race(
        scorer, [sel.removed for _, sel, _ in built], objective=objective, margin=race_margin
    )
    for name, sel, select_s in built:
        key = tuple(sel.removed)
        res = raced.scores[key]
        alive = key in raced.alive
        records.append(
            {
                "name": name,
                "method": sel.method,
                "num_clusters": sel.num_clusters,
                "removed": list(sel.removed),
                "kl": res.kl,
                "nll": res.nll,
                "ppl": res.ppl,
                "top1_agreement": res.top1_agreement,
                "windows": res.tokens // (scorer.windows.shape[1] - 1),
                "eliminated": not alive,
                "select_s": select_s,
                "score_s": 0.0 if key in first_name else res.seconds,
                "same_as": first_name.get(key),
            }
        )
        first_name.setdefault(key, name)
        selections.append(sel)
    if kl_per_slot is not None:
        t = time.perf_counter()
        p0 = scorer.passes
        sel = lorp_kl_select(matrix, k, scorer, candidates_per_slot=kl_per_slot)
        search_s = time.perf_counter() - t
        key = tuple(sel.removed)
        res = scorer.score(key)
        records.append(
            {
                "name": f"lorp-kl (K={sel.num_clusters}, {kl_per_slot} per slot)",
                "method": "lorp-kl",
                "num_clusters": sel.num_clusters,
                "removed": list(sel.removed),
                "kl": res.kl,
                "nll": res.nll,
                "ppl": res.ppl,
                "top1_agreement": res.top1_agreement,
                "windows": res.tokens // (scorer.windows.shape[1] - 1),
                "eliminated": False,
                "select_s": search_s,
                "score_s": 0.0,  # included in select_s (its search measured it)
                "passes": scorer.passes - p0,
                "same_as": first_name.get(key),
            }
        )
        first_name.setdefault(key, records[-1]["name"])
        selections.append(sel)

    # the lowest of the candidates measured on every window (ties: first in order)
    best = min(
        (i for i, rec in enumerate(records) if not rec["eliminated"]),
        key=lambda i: records[i][objective],
    )
    for i, rec in enumerate(records):
        rec["chosen"] = i == best
    chosen = selections[best]
    details = {
        "objective": objective,
        "chosen": records[best]["name"],
        "chosen_method": chosen.method,
        "candidates": records,
        "race": {"first_windows": raced.first_windows, "margin": race_margin},
        "lorp_kl": kl_plan,
        "max_passes": max_passes,
        "passes": scorer.passes - passes0,
        "search_s": time.perf_counter() - start,
        "scoring": scorer.info(),
        "scores": chosen.details.get("scores"),
        "chosen_details": chosen.details,
    }
    return Selection(
        method=NAME,
        num_layers=n,
        removed=list(chosen.removed),
        rls=rls,
        num_clusters=chosen.num_clusters,
        labels=chosen.labels,
        details=details,
    )


def select(request: SelectionRequest) -> Selection:
    scorer = request.scorer()  # ranks by loss: no dense pass
    return auto_select(
        request.similarity,
        request.num_remove,
        scorer,
        candidates_per_slot=request.candidates_per_slot,
        max_passes=request.max_passes,
    )


def pass_budget(
    model: Any, calibration_tokens: int, scoring_shape: tuple[int, int], num_remove: int
) -> int:
    """Scoring passes costing about 3/4 of the similarity capture
    (:func:`lorp.scoring.affordable_passes`)."""
    from ..scoring import affordable_passes

    tokens = scoring_shape[0] * scoring_shape[1]
    return affordable_passes(model, calibration_tokens, tokens, num_remove)


def explain(sel: Mapping[str, Any]) -> str:
    rls_text, n, k = selection_facts(sel)
    details = sel.get("details") or {}
    cands = details.get("candidates") or []
    objective = (
        "KL divergence of its next-token predictions from the full model's"
        if details.get("objective") == "kl"
        else "next-token loss"
    )
    race = details.get("race") or {}
    dropped = sum(1 for c in cands if isinstance(c, Mapping) and c.get("eliminated"))
    raced = (
        f" ({dropped} dropped after the first {race.get('first_windows')} windows for being "
        f"more than {race.get('margin')} nats behind the best there)"
        if dropped
        else ""
    )
    return (
        f"{LABEL}: {len(cands)} candidate selections were built and each was scored by its "
        f"{objective} on {windows_text(sel)} held out from the calibration windows{raced}; the "
        f"lowest, {details.get('chosen')}, was kept ({k} of {n} blocks). RLS = {rls_text}."
    )


METHOD = MethodInfo(
    name=NAME,
    order=70,
    label=LABEL,
    description="every S-based selection (and lorp-kl when affordable) measured on scoring "
    "windows, keeping the one with the lowest loss",
    select=select,
    explain=explain,
    needs_model=True,
    # auto compares a handful of whole candidate sets whose losses can be close (SmolLM2, 3 of 30
    # blocks: ShortGPT vs LLM-Streamline differ by 0.3% in NLL), so it measures more tokens than
    # sleb and lorp-kl, which run many more passes
    scoring=(8, 512),
    pass_budget=pass_budget,
)
