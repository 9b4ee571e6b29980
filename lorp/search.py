"""Model-in-the-loop selection: methods that run the model on a few scoring windows.

The S-only methods (:mod:`lorp.selection`) decide from the similarity matrix alone. The methods
here also measure candidate removals on *scoring windows*: a few short token windows of the
calibration text that follow the calibration windows (never the evaluation text; the pipeline
draws them, see :func:`lorp.pipeline.prune`). A candidate removal set R is measured by one
forward pass of the model with the blocks in R skipped (:func:`lorp.surgery.pruned_view`) over
the scoring windows, compared with the dense model's next-token log-probabilities, which are
computed once and cached (memory: windows × (tokens − 1) × vocabulary float32, e.g. 200 MB for
4 × 256 tokens and SmolLM2's 49,152 tokens). Scores are cached per removal set, so a set is
never measured twice. One such forward is a *pass*; every method records how many it ran.
A pass need not start at the embeddings: nothing changes before the first removed block, so
the dense hidden states entering the blocks where the candidates start are stored once
(:meth:`WindowScorer.prefetch`) and each pass resumes from there (same numbers, fewer blocks
run: for SLEB on SmolLM2 about half of them).

``sleb``
    SLEB-style iterative removal. Start from the dense model; at each of k steps try removing
    every remaining interior block b (1..N−2, like every method here the first and last blocks
    are protected) on top of the blocks already removed, and remove the b with the lowest mean
    NLL on the scoring windows (ties: the shallower block). Needs no similarity matrix.
    Cost: Σ_{s=0}^{k−1} (N−2−s) passes (SmolLM2, N=30, k=9: 216 passes) — far more than LoRP.
``lorp-kl``
    LoRP's structure with a measured objective. Phases (RLS policy K or a forced K, spectral
    clustering) and the two-stage allocation are LoRP's, so every phase loses exactly as many
    blocks as in LoRP ("quotas") and the slots are filled in LoRP's removal order. For each slot
    of phase c the candidates are the first ``candidates_per_slot`` (default 3) not yet removed
    members of c's LoRP candidate list (redundancy order); each candidate is measured by mean
    KL(dense || pruned) on the scoring windows with the blocks chosen so far plus the candidate
    removed, and the lowest KL wins (ties: LoRP's order). A slot with one candidate left is
    filled without measuring. Cost: 1 dense pass + at most k × candidates_per_slot passes.
``lorp-loss``
    LoRP's phase structure with the measured loss as the objective (the companion study's point:
    the objective matters more than the search). (1) Starting points: LoRP at its policy K (or
    the forced K) and the other S-based selections (LoRP at K = 2..4, ShortGPT, LLM-Streamline),
    raced by mean NLL on the scoring windows (default 8 x 512 tokens; :func:`race`); the
    lowest is the start. (2) Best-improvement local search from the start on cheaper *search
    windows* (the first half of the scoring windows, each cut to half its length): a move
    swaps one block — an end of a run of removed blocks leaves, and either the block just past
    a run's end (the run slides) or one of the ``candidates_per_phase`` (default 2) kept blocks
    with the highest local redundancy S[b, b+1] in each LoRP phase comes in; every move of a
    round is measured, the best is taken if it lowers the loss, and the search stops when no
    move helps or ``max_passes`` is spent (:func:`local_search_passes`: about one capture's
    worth). (3) The search result replaces the start only if the full scoring windows agree
    that its loss is lower, so the method never returns a set that measured worse than the
    best S-based selection. Cost: the raced S-based candidates (about auto's) + at most
    ``max_passes`` cheap passes + 2; about 2-3x LoRP's selection time. (Racing the moves too,
    to afford more rounds in the same time, lowered the search-window loss further but raised
    WikiText-2 perplexity on SmolLM2 at 3 blocks, 44.02 -> 46.67: more search on a few
    calibration windows over-fits them, so the moves are measured in full. Scoring only every
    4th prediction on Gemma-3-270M, whose 262k-token output head dominates a pass, was tried
    too: 3.0-3.2x LoRP's time instead of 4.2-4.7x, but worse sets at 2 and 5 blocks, e.g.
    WikiText-2 587.5 instead of 273.0 at 5; so every prediction is scored.)
``auto``
    Compute candidate selections from S with every S-based method — LoRP with the policy K,
    LoRP with K forced to each other value in 2..4, ShortGPT, LLM-Streamline — plus ``lorp-kl``
    when affordable and a dense reference is kept (below), dedupe them, measure each distinct
    removal set by its mean next-token loss (NLL) on the scoring windows (default 8 x 512
    tokens; ``objective="kl"`` ranks by KL(dense || pruned) instead, at one more pass) and keep
    the lowest (ties: the order above). The sets are raced (:func:`race`): all are measured on
    the first quarter of the windows, those more than :data:`RACE_MARGIN` (0.25 nats) behind
    the best there are dropped, the rest finish (a lone survivor has won); on SmolLM2 at 3, 6
    and 9 removed blocks this cut auto's scoring time (relative to the capture) by 30 %, 36 %
    and 78 % and changed no choice. NLL is the default because it is what held-out perplexity
    measures, needs no dense pass, and on SmolLM2 ranked the candidates as WikiText-2
    perplexity does at 3, 6 and 9 removed blocks (KL on 4 x 256 tokens did not at 3). All
    candidates with their KL, NLL/perplexity, top-1 agreement and times are recorded in
    ``Selection.details["candidates"]``. Affordable: with ``max_passes`` given (the pipeline
    passes :func:`affordable_passes`, sized so that auto's scoring costs about 3/4 of the
    similarity capture, i.e. auto's capture + selection stays near 2× LoRP's), lorp-kl joins
    when its planned passes fit in what the S-based candidates leave; its per-slot candidate
    count is lowered (down to 2) to fit, else it is left out and the reason recorded. Caveat:
    lorp-kl chose its blocks on the same scoring windows auto compares on, so its score is an
    in-sample one; the report's quality measurement (evaluation text or other held-out windows)
    is not affected.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from ._blocks import get_blocks
from .errors import InvalidInputError
from .progress import ProgressCallback
from .scoring import (
    RACE_MARGIN,
    RaceResult,
    WindowScore,
    WindowScorer,
    affordable_passes,
    local_search_passes,
    race,
)
from .selection import (
    METHODS,
    Selection,
    policy_num_clusters,
    representation_locality_score,
    resolve_budget,
    select_layers,
    validate_similarity,
)
from .surgery import block_runs

__all__ = [
    "ALL_METHODS",
    "CLUSTER_METHODS",
    "FOLD_METHODS",
    "SEARCH_METHODS",
    "RaceResult",
    "WindowScore",
    "WindowScorer",
    "affordable_passes",
    "auto_select",
    "local_search_passes",
    "lorp_kl_select",
    "lorp_loss_select",
    "pass_budget",
    "race",
    "search_layers",
    "sleb_select",
]

#: Methods that run the model on scoring windows.
SEARCH_METHODS: tuple[str, ...] = ("sleb", "lorp-kl", "lorp-loss", "auto")
#: Pipeline methods that are a search method's selection with the corrections on
#: (:class:`lorp.pipeline.PruneConfig` turns on ``compensate`` and ``temperature``): name ->
#: the selection method. ``lorp-fold``: lorp-loss's blocks, the tuned linear fold
#: (:mod:`lorp.compensation`) and the logit temperature (:mod:`lorp.temperature`).
FOLD_METHODS: dict[str, str] = {"lorp-fold": "lorp-loss"}
#: Every method name the pipeline accepts.
ALL_METHODS: tuple[str, ...] = METHODS + SEARCH_METHODS + tuple(FOLD_METHODS)
#: Methods built on LoRP's phases, which accept a forced number of phases K.
CLUSTER_METHODS: tuple[str, ...] = ("lorp", "lorp-kl", "lorp-loss", "lorp-fold")

#: The range of forced K that ``auto`` tries besides the policy K.
AUTO_CLUSTER_RANGE = (2, 4)


def pass_budget(
    method: str,
    model: nn.Module,
    calibration_tokens: int,
    scoring_shape: tuple[int, int],
    num_remove: int,
) -> int | None:
    """The ``max_passes`` the pipeline gives ``method``: :func:`affordable_passes` for ``auto``,
    :func:`local_search_passes` for ``lorp-loss``, ``None`` (no limit) for the others."""
    if method == "auto":
        tokens = scoring_shape[0] * scoring_shape[1]
        return affordable_passes(model, calibration_tokens, tokens, num_remove)
    if method == "lorp-loss":
        return local_search_passes(model, calibration_tokens, scoring_shape, num_remove)
    return None


# --------------------------------------------------------------------------------------------
# SLEB
# --------------------------------------------------------------------------------------------


def _rls(matrix: np.ndarray | None) -> float:
    return math.nan if matrix is None else representation_locality_score(matrix)


def sleb_select(
    scorer: WindowScorer, num_remove: int | float, *, similarity: ArrayLike | None = None
) -> Selection:
    """SLEB-style greedy removal by scoring-window NLL (module docstring). ``similarity`` is
    optional (only for the RLS in the result)."""
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
        method="sleb",
        num_layers=n,
        removed=sorted(removed),
        rls=_rls(matrix),
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


# --------------------------------------------------------------------------------------------
# LoRP-KL
# --------------------------------------------------------------------------------------------


def _lorp_slots(base: Selection) -> tuple[list[int], list[int], list[list[int]]]:
    """(phase of every slot in LoRP's removal order, stage of every slot, candidate lists)."""
    assert base.labels is not None
    order = list(base.details["removal_order"])
    stages = list(base.details["stages"])
    candidates = [list(c) for c in base.details["candidates"]]
    return [base.labels[layer] for layer in order], stages, candidates


def _planned_lorp_kl_passes(base: Selection, per_slot: int) -> int:
    """Exact number of passes lorp-kl will run (pool sizes do not depend on the choices)."""
    phases, _, candidates = _lorp_slots(base)
    used: dict[int, int] = {}
    total = 0
    for c in phases:
        pool = len(candidates[c]) - used.get(c, 0)
        if pool >= 2:
            total += min(per_slot, pool)
        used[c] = used.get(c, 0) + 1
    return total


def _check_per_slot(candidates_per_slot: int) -> int:
    if isinstance(candidates_per_slot, bool) or not isinstance(candidates_per_slot, int):
        raise InvalidInputError(
            f"candidates_per_slot must be an integer, got {candidates_per_slot!r}"
        )
    if candidates_per_slot < 1:
        raise InvalidInputError(
            f"candidates_per_slot must be at least 1, got {candidates_per_slot}"
        )
    return candidates_per_slot


def lorp_kl_select(
    similarity: ArrayLike,
    num_remove: int | float,
    scorer: WindowScorer,
    *,
    num_clusters: int | None = None,
    candidates_per_slot: int = 3,
) -> Selection:
    """LoRP's phases and quotas, each slot filled by measured KL (module docstring)."""
    per_slot = _check_per_slot(candidates_per_slot)
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
    planned = _planned_lorp_kl_passes(base, per_slot)
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
        method="lorp-kl",
        num_layers=n,
        removed=sorted(removed),
        rls=base.rls,
        num_clusters=base.num_clusters,
        labels=base.labels,
        details=details,
    )


# --------------------------------------------------------------------------------------------
# LoRP-loss
# --------------------------------------------------------------------------------------------


def _swap_moves(
    removed: Sequence[int], labels: Sequence[int], matrix: np.ndarray, per_phase: int
) -> list[tuple[int, ...]]:
    """Neighbouring removal sets of ``removed``, most promising first (see lorp_loss_select).

    A move takes one block out of the set and puts another in: out, an end of a run of removed
    blocks (the interior of a run stays); in, the block just past either end of a run (the run
    slides) or one of the ``per_phase`` kept blocks of each phase with the highest local
    redundancy S[c, c+1] (a removal moves to another place or phase). Blocks 0 and N−1 never
    enter. Ordered by the S-based gain S[in, in+1] − S[out, out+1], largest first.
    """
    n = matrix.shape[0]
    current = set(removed)

    def local(b: int) -> float:
        return float(matrix[b, b + 1])

    def free(b: int) -> bool:
        return 0 < b < n - 1 and b not in current

    ends: set[int] = set()
    incoming: set[int] = set()
    for run in block_runs(removed):
        ends.update((run[0], run[-1]))
        incoming.update(b for b in (run[0] - 1, run[-1] + 1) if free(b))
    for phase in sorted(set(labels)):
        kept = [b for b in range(n) if labels[b] == phase and free(b)]
        incoming.update(sorted(kept, key=lambda b: -local(b))[:per_phase])
    scored: dict[tuple[int, ...], float] = {}
    for out in sorted(ends):
        for inc in sorted(incoming):
            move = tuple(sorted((current - {out}) | {inc}))
            gain = local(inc) - local(out)
            scored[move] = max(gain, scored.get(move, -math.inf))
    return sorted(scored, key=lambda m: -scored[m])  # stable: equal gains keep index order


def lorp_loss_select(
    similarity: ArrayLike,
    num_remove: int | float,
    scorer: WindowScorer,
    *,
    num_clusters: int | None = None,
    candidates_per_phase: int = 2,
    max_passes: int | None = None,
    search_windows: torch.Tensor | None = None,
    race_margin: float = RACE_MARGIN,
) -> Selection:
    """LoRP's phases with the measured loss as the objective (module docstring).

    ``scorer``: the scoring windows that decide (NLL). ``search_windows``: the cheaper windows the
    local search moves on (default: the first half of the scoring windows, each cut to half its
    length). ``max_passes``: local-search passes allowed on them (``None``: until no move helps).
    """
    per_phase = _check_per_slot(candidates_per_phase)
    matrix = validate_similarity(similarity)
    n = matrix.shape[0]
    if n != scorer.num_layers:
        raise InvalidInputError(f"similarity is {n}x{n}, model has {scorer.num_layers} blocks")
    if max_passes is not None and max_passes < 0:
        raise InvalidInputError(f"max_passes must be >= 0, got {max_passes}")
    k = resolve_budget(n, num_remove)
    start = time.perf_counter()
    passes0 = scorer.passes
    rls = representation_locality_score(matrix)
    lorp = select_layers(matrix, k, method="lorp", num_clusters=num_clusters)
    assert lorp.labels is not None
    labels = lorp.labels

    # 1. Starting points: every S-based selection, ranked by loss on the scoring windows.
    built: list[tuple[str, Selection]] = [(f"lorp (K={lorp.num_clusters})", lorp)]
    for name, method, forced in _candidate_specs(n, rls):
        if method == "lorp" and (forced or policy_num_clusters(rls)) == lorp.num_clusters:
            continue
        built.append((name, select_layers(matrix, k, method=method, num_clusters=forced)))
    raced = race(scorer, [sel.removed for _, sel in built], margin=race_margin)
    origin = raced.best("nll")
    best_start = next(i for i, (_, sel) in enumerate(built) if tuple(sel.removed) == origin)
    width = scorer.windows.shape[1] - 1
    starts = [
        {
            "name": name,
            "removed": list(sel.removed),
            "nll": raced.scores[tuple(sel.removed)].nll,
            "windows": raced.scores[tuple(sel.removed)].tokens // width,
            "eliminated": tuple(sel.removed) not in raced.alive,
        }
        for name, sel in built
    ]

    # 2. Local search from the best start, on the cheaper windows: best-improvement swaps.
    if search_windows is None:
        w, t = scorer.windows.shape
        search_windows = scorer.windows[: max(1, w // 2), : max(2, t // 2)]
    fast = WindowScorer(
        scorer.model,
        search_windows,
        batch_size=scorer.batch_size,
        reference=False,
        prefix_bytes=scorer.prefix_bytes,
        progress=scorer.progress,
        stage=scorer.stage,
    )
    current = origin
    current_nll = fast.score(current).nll
    rounds: list[dict[str, Any]] = []
    while max_passes is None or fast.passes < max_passes:
        moves = [m for m in _swap_moves(current, labels, matrix, per_phase) if not fast.cached(m)]
        if max_passes is not None:
            moves = moves[: max_passes - fast.passes]
        if not moves:
            break
        fast.prefetch(moves)
        tried = {m: fast.score(m).nll for m in moves}
        best = min(moves, key=lambda m: tried[m])  # moves in S-gain order: ties keep it
        rounds.append(
            {
                "from": list(current),
                "nll": current_nll,
                "moves": len(moves),
                "best": list(best),
                "best_nll": tried[best],
                "accepted": tried[best] < current_nll,
            }
        )
        if tried[best] >= current_nll:
            break
        current, current_nll = best, tried[best]

    # 3. Keep the local-search result only if the scoring windows agree it is better.
    chosen = origin
    if current != origin and scorer.score(current).nll < scorer.score(origin).nll:
        chosen = current
    final = scorer.score(chosen) if scorer.cached(chosen) else raced.scores[chosen]
    quotas = Counter(labels[b] for b in chosen)
    phases = sorted(set(labels))
    details = {
        "objective": "nll",
        "num_clusters_source": lorp.details.get("num_clusters_source"),
        "scores": lorp.details.get("scores"),
        "starts": starts,
        "start": starts[best_start]["name"],
        "search": {
            "windows": int(search_windows.shape[0]),
            "seq_len": int(search_windows.shape[1]),
            "passes": fast.passes,
            "prefix_passes": fast.prefix_passes,
            "seconds": fast.seconds,
            "max_passes": max_passes,
            "candidates_per_phase": per_phase,
            "rounds": rounds,
            "result": list(current),
        },
        "improved": chosen != origin,
        "nll": final.nll,
        "nll_windows": final.tokens // width,
        "race": {"first_windows": raced.first_windows, "margin": race_margin},
        "quotas": {str(c): quotas.get(c, 0) for c in phases},
        "lorp_removed": list(lorp.removed),
        "lorp_quotas": {str(c): sum(1 for b in lorp.removed if labels[b] == c) for c in phases},
        "passes": scorer.passes - passes0 + fast.passes,
        "search_s": time.perf_counter() - start,
        "scoring": scorer.info(),
    }
    return Selection(
        method="lorp-loss",
        num_layers=n,
        removed=sorted(chosen),
        rls=rls,
        num_clusters=lorp.num_clusters,
        labels=labels,
        details=details,
    )


# --------------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------------


def _candidate_specs(n: int, rls: float) -> list[tuple[str, str, int | None]]:
    """(name, method, forced K or None) of every S-based candidate, in tie-break order."""
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
    race_margin: float = RACE_MARGIN,
) -> Selection:
    """Best of the S-based selections (and lorp-kl when affordable) on the scoring windows.

    ``objective``: ``"nll"`` (mean next-token loss; needs no dense pass) or ``"kl"``
    (KL(dense || pruned); needs a scorer with the dense reference). ``max_passes``: scoring
    passes allowed (``None``: no limit). ``include_lorp_kl``: ``None`` decides by ``max_passes``;
    ``True``/``False`` force it; lorp-kl needs the dense reference in any case.
    """
    per_slot = _check_per_slot(candidates_per_slot)
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
    for name, method, forced in _candidate_specs(n, rls):
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
            need = _planned_lorp_kl_passes(lorp_base, m)
            if unlimited or (left is not None and need <= left):
                kl_per_slot = m
                kl_plan = {"included": True, "candidates_per_slot": m, "planned_passes": need}
                break
        if kl_per_slot is None:
            kl_plan["reason"] = (
                f"not affordable: {_planned_lorp_kl_passes(lorp_base, lowest)} passes needed "
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
        method="auto",
        num_layers=n,
        removed=list(chosen.removed),
        rls=rls,
        num_clusters=chosen.num_clusters,
        labels=chosen.labels,
        details=details,
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def search_layers(
    model: nn.Module,
    similarity: ArrayLike,
    num_remove: int | float,
    method: str,
    windows: torch.Tensor,
    *,
    num_clusters: int | None = None,
    batch_size: int = 1,
    candidates_per_slot: int = 3,
    max_passes: int | None = None,
    progress: ProgressCallback | None = None,
) -> Selection:
    """Choose blocks with a model-in-the-loop ``method`` (one of :data:`SEARCH_METHODS`).

    ``windows``: scoring windows ``[W, T]`` (held out from the calibration windows, never the
    evaluation text). ``num_clusters`` forces K for ``lorp-kl`` and ``lorp-loss`` only.
    ``candidates_per_slot``: candidates per removal slot (``lorp-kl``). ``max_passes`` limits
    ``auto`` and ``lorp-loss``'s local search (see :func:`pass_budget`). Progress goes to
    stage ``"selection"``.
    """
    if method not in SEARCH_METHODS:
        raise InvalidInputError(
            f"unknown search method {method!r}; valid: {', '.join(SEARCH_METHODS)}"
        )
    if num_clusters is not None and method not in CLUSTER_METHODS:
        raise InvalidInputError(
            f"num_clusters only applies to methods {', '.join(CLUSTER_METHODS)}, not {method!r}"
        )
    matrix = validate_similarity(similarity)
    n = len(get_blocks(model))
    if matrix.shape[0] != n:
        raise InvalidInputError(
            f"similarity is {matrix.shape[0]}x{matrix.shape[0]}, model has {n} blocks"
        )
    # lorp-kl measures KL against the dense model; sleb and auto rank by loss (no dense pass)
    scorer = WindowScorer(
        model, windows, batch_size=batch_size, reference=method == "lorp-kl", progress=progress
    )
    was_training = model.training
    model.eval()
    try:
        if method == "sleb":
            return sleb_select(scorer, num_remove, similarity=matrix)
        if method == "lorp-loss":
            return lorp_loss_select(
                matrix,
                num_remove,
                scorer,
                num_clusters=num_clusters,
                max_passes=max_passes,
            )
        if method == "lorp-kl":
            return lorp_kl_select(
                matrix,
                num_remove,
                scorer,
                num_clusters=num_clusters,
                candidates_per_slot=candidates_per_slot,
            )
        return auto_select(
            matrix,
            num_remove,
            scorer,
            candidates_per_slot=candidates_per_slot,
            max_passes=max_passes,
        )
    finally:
        model.train(was_training)
