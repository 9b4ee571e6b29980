"""``lorp-loss``: LoRP's phases with the measured loss as the objective (model in the loop).

The companion study's point: the objective matters more than the search. (1) Starting points:
LoRP at its policy K (or the forced K) and the other S-based selections (LoRP at K = 2..4,
ShortGPT, LLM-Streamline; :func:`lorp.methods.auto.candidate_specs`), raced by mean NLL on the
scoring windows (default 8 x 512 tokens; :func:`lorp.scoring.race`); the lowest is the start.
(2) Best-improvement local search from the start on cheaper *search windows* (the first half of
the scoring windows, each cut to half its length): a move swaps one block — an end of a run of
removed blocks leaves, and either the block just past a run's end (the run slides) or one of
the ``candidates_per_phase`` (default 2) kept blocks with the highest local redundancy
S[b, b+1] in each LoRP phase comes in (:func:`swap_moves`); every move of a round is measured,
the best is taken if it lowers the loss, and the search stops when no move helps or
``max_passes`` is spent (:func:`pass_budget`, i.e. :func:`lorp.scoring.local_search_passes`:
about one capture's worth). (3) The search result replaces the start only if the full scoring
windows agree that its loss is lower, so the method never returns a set that measured worse
than the best S-based selection. Cost: the raced S-based candidates (about auto's) + at most
``max_passes`` cheap passes + 2; about 2-3x LoRP's selection time. (Racing the moves too, to
afford more rounds in the same time, lowered the search-window loss further but raised
WikiText-2 perplexity on SmolLM2 at 3 blocks, 44.02 -> 46.67: more search on a few calibration
windows over-fits them, so the moves are measured in full. Scoring only every 4th prediction on
Gemma-3-270M, whose 262k-token output head dominates a pass, was tried too: 3.0-3.2x LoRP's
time instead of 4.2-4.7x, but worse sets at 2 and 5 blocks, e.g. WikiText-2 587.5 instead of
273.0 at 5; so every prediction is scored.)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ._base import MethodInfo, SelectionRequest, check_per_slot, selection_facts, windows_text
from .auto import candidate_specs

if TYPE_CHECKING:
    import numpy as np
    import torch
    from numpy.typing import ArrayLike

    from ..scoring import WindowScorer
    from ..selection import Selection

NAME = "lorp-loss"
LABEL = "LoRP-loss (LoRP phases, greedy by calibration loss)"


def swap_moves(
    removed: Sequence[int], labels: Sequence[int], matrix: np.ndarray, per_phase: int
) -> list[tuple[int, ...]]:
    """Neighbouring removal sets of ``removed``, most promising first (see lorp_loss_select).

    A move takes one block out of the set and puts another in: out, an end of a run of removed
    blocks (the interior of a run stays); in, the block just past either end of a run (the run
    slides) or one of the ``per_phase`` kept blocks of each phase with the highest local
    redundancy S[c, c+1] (a removal moves to another place or phase). Blocks 0 and N−1 never
    enter. Ordered by the S-based gain S[in, in+1] − S[out, out+1], largest first.
    """
    from ..surgery import block_runs

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
    race_margin: float | None = None,
) -> Selection:
    """LoRP's phases with the measured loss as the objective (module docstring).

    ``scorer``: the scoring windows that decide (NLL). ``search_windows``: the cheaper windows the
    local search moves on (default: the first half of the scoring windows, each cut to half its
    length). ``max_passes``: local-search passes allowed on them (``None``: until no move helps).
    ``race_margin``: for the starting points (:func:`lorp.scoring.race`; ``None``:
    :data:`lorp.scoring.RACE_MARGIN`).
    """
    from ..scoring import RACE_MARGIN, WindowScorer, race
    from ..selection import (
        Selection,
        policy_num_clusters,
        representation_locality_score,
        resolve_budget,
        select_layers,
        validate_similarity,
    )

    if race_margin is None:
        race_margin = RACE_MARGIN
    per_phase = check_per_slot(candidates_per_phase)
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
    for name, method, forced in candidate_specs(n, rls):
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
        moves = [m for m in swap_moves(current, labels, matrix, per_phase) if not fast.cached(m)]
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
        method=NAME,
        num_layers=n,
        removed=sorted(chosen),
        rls=rls,
        num_clusters=lorp.num_clusters,
        labels=labels,
        details=details,
    )


def select(request: SelectionRequest) -> Selection:
    scorer = request.scorer()  # ranks by loss: no dense pass
    return lorp_loss_select(
        request.similarity,
        request.num_remove,
        scorer,
        num_clusters=request.num_clusters,
        max_passes=request.max_passes,
    )


def pass_budget(
    model: Any, calibration_tokens: int, scoring_shape: tuple[int, int], num_remove: int
) -> int:
    """The local search's passes on its search windows: about one similarity capture
    (:func:`lorp.scoring.local_search_passes`)."""
    from ..scoring import local_search_passes

    return local_search_passes(model, calibration_tokens, scoring_shape, num_remove)


def explain(sel: Mapping[str, Any]) -> str:
    rls_text, n, k = selection_facts(sel)
    details = sel.get("details") or {}
    search = details.get("search") or {}
    outcome = (
        f"a local search of {search.get('passes', '?')} swaps found a better set, confirmed "
        "on the scoring windows"
        if details.get("improved")
        else f"no swap tried by the local search ({search.get('passes', '?')} passes) did "
        "better, so it was kept"
    )
    return (
        f"{LABEL}: LoRP's phases (K = {sel.get('num_clusters')}, RLS = {rls_text}). The "
        f"S-based selections were measured by their loss on {windows_text(sel)} of calibration "
        f"text; the best, {details.get('start')}, was the start, and {outcome} ({k} of {n} "
        f"blocks; plain LoRP would remove {details.get('lorp_removed')})."
    )


METHOD = MethodInfo(
    name=NAME,
    order=60,
    label=LABEL,
    description="LoRP's phases with the measured loss: the best S-based selection on scoring "
    "windows, refined by a local search of block swaps",
    select=select,
    explain=explain,
    needs_model=True,
    takes_clusters=True,
    scoring=(8, 512),  # like auto: its starting points are whole sets with close losses
    pass_budget=pass_budget,
)
