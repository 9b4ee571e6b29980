"""Selection rules pinned on small hand-worked similarity matrices (no models needed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.cluster import SpectralClustering

from lorp.errors import BudgetError, InvalidInputError, SimilarityMatrixError
from lorp.selection import (
    METHODS,
    Selection,
    allocate,
    policy_num_clusters,
    representation_locality_score,
    resolve_budget,
    select_layers,
    shortgpt_layers,
    spectral_phases,
    streamline_layers,
    validate_similarity,
)


def sym(n: int, base: float, entries: dict[tuple[int, int], float]) -> np.ndarray:
    """An n×n symmetric matrix: ``base`` off the diagonal, 1 on it, ``entries`` (i, j) overrides."""
    s = np.full((n, n), base, dtype=np.float64)
    for (i, j), v in entries.items():
        s[i, j] = s[j, i] = v
    np.fill_diagonal(s, 1.0)
    return s


def block(groups: list[int], hi: float = 0.9, lo: float = 0.1) -> np.ndarray:
    """``hi`` between layers of the same group, ``lo`` across groups."""
    g = np.asarray(groups)
    s = np.where(g[:, None] == g[None, :], hi, lo).astype(np.float64)
    np.fill_diagonal(s, 1.0)
    return s


# ------------------------------------------------------------------------------------------
# RLS and the K policy
# ------------------------------------------------------------------------------------------


def test_rls_is_minus_log2_of_mean_upper_triangle() -> None:
    # Off-diagonal pairs (0,1)=0.5, (0,2)=0.25, (1,2)=0.75 -> mean 0.5 -> RLS = -log2(0.5) = 1.
    s = sym(3, 0.0, {(0, 1): 0.5, (0, 2): 0.25, (1, 2): 0.75})
    assert representation_locality_score(s) == pytest.approx(1.0, abs=1e-12)
    # All pairs 0.25 -> RLS = 2.
    assert representation_locality_score(sym(4, 0.25, {})) == pytest.approx(2.0, abs=1e-12)
    # The diagonal does not enter: a garbage diagonal gives the same RLS.
    noisy = sym(4, 0.25, {})
    np.fill_diagonal(noisy, 0.3)
    assert representation_locality_score(noisy) == pytest.approx(2.0, abs=1e-12)


def test_rls_is_infinite_when_similarity_has_fully_decayed() -> None:
    assert representation_locality_score(sym(4, 0.0, {})) == math.inf
    assert representation_locality_score(sym(4, -0.2, {})) == math.inf


@pytest.mark.parametrize(
    ("rls", "k"),
    [(5.0, 2), (1.0, 2), (0.9999, 3), (0.7, 3), (0.6999, 4), (0.0, 4), (math.inf, 2)],
)
def test_policy_boundaries(rls: float, k: int) -> None:
    assert policy_num_clusters(rls) == k


def test_policy_rejects_nan() -> None:
    with pytest.raises(InvalidInputError):
        policy_num_clusters(float("nan"))


def test_policy_applied_from_matrix() -> None:
    # mean 0.5 -> RLS exactly 1.0 -> K = 2 (boundary belongs to the upper range).
    sel = select_layers(sym(6, 0.5, {}), 1)
    assert sel.rls == pytest.approx(1.0, abs=1e-12)
    assert sel.num_clusters == 2
    # mean 0.6 -> RLS 0.737 -> K = 3 ; mean 0.7 -> RLS 0.515 -> K = 4.
    assert select_layers(sym(8, 0.6, {}), 1).num_clusters == 3
    assert select_layers(sym(8, 0.7, {}), 1).num_clusters == 4


# ------------------------------------------------------------------------------------------
# Spectral phases
# ------------------------------------------------------------------------------------------


def test_phases_renumbered_by_depth_of_first_appearance_non_contiguous() -> None:
    groups = [0, 0, 1, 1, 2, 2, 0, 1]  # group 0 comes back at layer 6, group 1 at layer 7
    s = block(groups)
    affinity = (s + 1) / 2
    raw = SpectralClustering(
        n_clusters=3, affinity="precomputed", random_state=0, assign_labels="kmeans"
    ).fit_predict(affinity)
    labels = spectral_phases(s, 3)
    assert labels == groups
    # Same partition as scikit-learn's raw labels, only renamed.
    mapping = {int(r): lab for r, lab in zip(raw, labels, strict=True)}
    assert [mapping[int(r)] for r in raw] == labels
    assert len(mapping) == 3


def test_phases_contiguous_blocks() -> None:
    assert spectral_phases(block([0, 0, 0, 1, 1, 1, 2, 2, 2]), 3) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_phases_k_equal_n_is_one_layer_per_phase() -> None:
    assert spectral_phases(block([0, 0, 1, 1, 2]), 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("bad", [1, 0, 7, True, 2.0, None])
def test_phases_reject_bad_k(bad: object) -> None:
    with pytest.raises(InvalidInputError):
        spectral_phases(block([0, 0, 0, 1, 1, 1]), bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Two-stage allocation, with hand-given labels
# ------------------------------------------------------------------------------------------


def test_stage1_covers_clusters_in_phase_order_and_ties_keep_depth() -> None:
    # Phase 0 = {0,1,2}: S01=.8, S02=.6, S12=.6 -> r(1)=(.8+.6)/2=.7, r(2)=(.6+.6)/2=.6
    #   -> candidates [1, 2] (0 protected).
    # Phase 1 = {3,4,5}: all .95 -> r(3)=r(4)=.95 tie -> depth order [3, 4] (5 protected).
    s = sym(
        6,
        0.1,
        {(0, 1): 0.8, (0, 2): 0.6, (1, 2): 0.6, (3, 4): 0.95, (3, 5): 0.95, (4, 5): 0.95},
    )
    labels = [0, 0, 0, 1, 1, 1]
    a = allocate(s, labels, 2)
    assert a.candidates == {0: [1, 2], 1: [3, 4]}
    assert a.redundancy[1] == pytest.approx(0.7)
    assert a.redundancy[2] == pytest.approx(0.6)
    assert a.order == [1, 3]
    assert a.stages == [1, 1]
    # k=1: stage 1 visits phase 0 first even though phase 1 is far more redundant.
    assert allocate(s, labels, 1).order == [1]


def test_candidate_ties_keep_depth_order_even_when_protected_layer_would_win() -> None:
    # Phase 0 = {0,1,2,3}, all pairs .5 except S01=.9: r(0)=r(1)=(.9+.5+.5)/3 highest;
    # r(2)=r(3)=.5 tie -> [1, 2, 3]; layer 0 never appears although it is as redundant as 1.
    s = sym(5, 0.0, {(0, 1): 0.9, (0, 2): 0.5, (0, 3): 0.5, (1, 2): 0.5, (1, 3): 0.5, (2, 3): 0.5})
    a = allocate(s, [0, 0, 0, 0, 1], 3)
    assert a.candidates == {0: [1, 2, 3], 1: []}
    assert a.order == [1, 2, 3]
    assert a.stages == [1, 2, 2]


def test_stage2_uses_mean_of_remaining_members() -> None:
    # Phase 0 = {0,1,2,3}: S01=.95, other pairs .5. Full-phase mean (.95+5*.5)/6=.575.
    #   r(1)=(.95+.5+.5)/3=.65 > r(2)=r(3)=.5 -> candidates [1,2,3].
    # Phase 1 = {4,5,6,7}: all pairs .55 (full mean .55 < .575). Candidates [4,5,6] (tie).
    # Stage 1 removes 1 and 4. Remaining: phase 0 {0,2,3} -> mean .5; phase 1 {5,6,7} -> .55.
    # So stage 2 goes to phase 1 (a full-phase mean would have picked phase 0): removes 5.
    within0 = {(i, j): 0.5 for i in range(4) for j in range(i + 1, 4)}
    within0[(0, 1)] = 0.95
    within1 = {(i, j): 0.55 for i in range(4, 8) for j in range(i + 1, 8)}
    s = sym(8, 0.0, within0 | within1)
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    a = allocate(s, labels, 3)
    assert a.candidates == {0: [1, 2, 3], 1: [4, 5, 6]}
    assert a.order == [1, 4, 5]
    assert a.stages == [1, 1, 2]
    # k=4: phase 0 {0,2,3} .5 vs phase 1 {6,7} .55 -> phase 1 again (6).
    assert allocate(s, labels, 4).order == [1, 4, 5, 6]
    # k=5: phase 1 has no candidates left -> phase 0; r(2)=r(3) -> 2.
    assert allocate(s, labels, 5).order == [1, 4, 5, 6, 2]
    # k=6=N-2: everything unprotected.
    assert allocate(s, labels, 6).removed == [1, 2, 3, 4, 5, 6]


def test_stage2_tie_goes_to_lowest_phase() -> None:
    # Two phases with every within-phase pair .5. Stage 1 removes 1 and 4; the remaining
    # {0,2,3} and {5,6,7} both have mean .5 -> tie -> phase 0 -> layer 2.
    within = {(i, j): 0.5 for i in range(4) for j in range(i + 1, 4)}
    within |= {(i, j): 0.5 for i in range(4, 8) for j in range(i + 1, 8)}
    s = sym(8, 0.0, within)
    a = allocate(s, [0, 0, 0, 0, 1, 1, 1, 1], 3)
    assert a.order == [1, 4, 2]
    # Renaming phases so the second block is phase 0 flips the winner.
    assert allocate(s, [1, 1, 1, 1, 0, 0, 0, 0], 3).order == [4, 1, 5]


def test_stage2_fallback_when_every_phase_scores_minus_inf() -> None:
    # Phase 0 = {0, 5}: only protected layers, no candidates (non-contiguous phase).
    # Phase 1 = {1, 2} (S12=.2), phase 2 = {3, 4} (S34=.9).
    # Stage 1: 1 (tie with 2 -> depth), then 3. Stage 2: remaining {2} and {4} both -inf,
    # so the lowest phase with candidates goes first regardless of redundancy: 2, then 4.
    s = sym(6, 0.0, {(1, 2): 0.2, (3, 4): 0.9, (0, 5): 0.7})
    a = allocate(s, [0, 1, 1, 2, 2, 0], 4)
    assert a.candidates == {0: [], 1: [1, 2], 2: [3, 4]}
    assert a.order == [1, 3, 2, 4]
    assert a.stages == [1, 1, 2, 2]


def test_singleton_phase_has_minus_inf_redundancy_and_is_still_covered() -> None:
    # Layer 3 is alone in phase 1 -> r(3) = -inf. Phase 0 = {0,1,2,4}.
    s = sym(5, 0.6, {(1, 2): 0.9})
    a = allocate(s, [0, 0, 0, 1, 0], 2)
    assert a.redundancy[3] == -math.inf
    assert a.candidates[1] == [3]
    # r(1)=r(2)=(.6+.9+.6)/3 -> 1 first; then stage 1 covers phase 1 -> 3.
    assert a.order == [1, 3]


def test_allocate_rejects_bad_inputs() -> None:
    s = block([0, 0, 0, 1, 1, 1])
    with pytest.raises(InvalidInputError):
        allocate(s, [0, 0, 1], 1)
    for k in (0, 5, 1.5, True):
        with pytest.raises(BudgetError):
            allocate(s, [0, 0, 0, 1, 1, 1], k)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# LoRP end to end
# ------------------------------------------------------------------------------------------


def test_lorp_end_to_end_on_two_blocks() -> None:
    # Blocks {0..3} and {4..7}: .9 inside, .1 across; S23=.95 and S56=.95.
    # Off-diagonal mean = (10*.9 + 2*.95 + 16*.1)/28 = 12.5/28 -> RLS = 1.163 -> K = 2.
    s = block([0, 0, 0, 0, 1, 1, 1, 1])
    for i, j in ((2, 3), (5, 6)):
        s[i, j] = s[j, i] = 0.95
    sel = select_layers(s, 2)
    assert sel.method == "lorp"
    assert sel.rls == pytest.approx(-math.log2(12.5 / 28))
    assert sel.num_clusters == 2
    assert sel.labels == [0, 0, 0, 0, 1, 1, 1, 1]
    # r(2)=r(3)=(.9+.9+.95)/3 > r(1)=.9 -> 2 ; r(5)=r(6)=(.9+.95+.9)/3 > r(4) -> 5.
    assert sel.removed == [2, 5]
    assert sel.details["stages"] == [1, 1]
    assert sel.details["removal_order"] == [2, 5]
    assert sel.kept == [0, 1, 3, 4, 6, 7]
    # A forced K overrides the policy.
    forced = select_layers(s, 2, num_clusters=4)
    assert forced.num_clusters == 4
    assert forced.details["num_clusters_source"] == "forced"


def test_lorp_with_k_equal_n_covers_layers_in_depth_order() -> None:
    # Every layer its own phase: all candidates have r=-inf, stage 1 walks phases 1,2,3...
    s = block([0, 0, 0, 1, 1, 1, 1])
    sel = select_layers(s, 3, num_clusters=7)
    assert sel.labels == list(range(7))
    assert sel.removed == [1, 2, 3]
    assert sel.details["scores"] == [None] * 7
    assert select_layers(s, 5, num_clusters=7).removed == [1, 2, 3, 4, 5]


def test_selection_to_dict_is_json_safe_and_round_trips() -> None:
    sel = select_layers(block([0, 0, 0, 1, 1, 1]), 2)
    d = sel.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert Selection.from_dict(d) == sel
    infinite = select_layers(sym(5, 0.0, {}), 1, method="shortgpt")
    assert infinite.rls == math.inf
    assert infinite.to_dict()["rls"] is None
    json.dumps(infinite.to_dict(), allow_nan=False)
    with pytest.raises(InvalidInputError):
        Selection.from_dict({"method": "lorp"})


# ------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------


def test_shortgpt_scores_by_next_layer_similarity() -> None:
    # Scores S[i, i+1]: 1:.7, 2:.9, 3:.7, 4:.95. S01=.99 but layer 0 is protected;
    # layer 5 (last) has no output, so it is never scored.
    s = sym(6, 0.0, {(0, 1): 0.99, (1, 2): 0.7, (2, 3): 0.9, (3, 4): 0.7, (4, 5): 0.95})
    assert shortgpt_layers(s, 1) == [4]  # S[i-1, i] would have picked layer 1 or 5
    assert shortgpt_layers(s, 2) == [2, 4]
    assert shortgpt_layers(s, 3) == [1, 2, 4]  # 1 and 3 tie at .7 -> lower index
    assert shortgpt_layers(s, 4) == [1, 2, 3, 4]
    sel = select_layers(s, 3, method="shortgpt")
    assert sel.removed == [1, 2, 4]
    assert sel.num_clusters is None and sel.labels is None
    assert sel.details["scores"] == [None, 0.7, 0.9, 0.7, 0.95, None]


def test_shortgpt_all_ties_take_lowest_indices() -> None:
    assert shortgpt_layers(sym(7, 0.3, {}), 3) == [1, 2, 3]


def test_streamline_contiguous_run_with_best_boundary() -> None:
    # k=2: starts s in 1..4, score S[s, s+2]: 1:.6, 2:.8, 3:.8, 4:.7; S02=.99 (s=0 forbidden).
    s = sym(7, 0.0, {(0, 2): 0.99, (1, 3): 0.6, (2, 4): 0.8, (3, 5): 0.8, (4, 6): 0.7})
    assert streamline_layers(s, 2) == [2, 3]  # tie 2 vs 3 -> smallest start
    # k=3: starts 1..3, S14=0, S25=0, S36=.4 -> run ends right before the protected last layer.
    s[3, 6] = s[6, 3] = 0.4
    assert streamline_layers(s, 3) == [3, 4, 5]
    # k=N-2: the only start is 1.
    assert streamline_layers(s, 5) == [1, 2, 3, 4, 5]
    sel = select_layers(s, 2, method="streamline")
    assert sel.removed == [2, 3]
    assert (sel.details["start"], sel.details["end"]) == (2, 4)
    assert sel.details["scores"] == [None, 0.6, 0.8, 0.8, 0.7, None, None]


def test_streamline_never_starts_at_zero_even_if_all_negative() -> None:
    s = sym(6, -0.5, {(0, 2): 0.9})
    assert streamline_layers(s, 2) == [1, 2]


def test_num_clusters_is_an_error_for_baselines() -> None:
    with pytest.raises(InvalidInputError, match="lorp"):
        select_layers(block([0, 0, 0, 1, 1, 1]), 1, method="shortgpt", num_clusters=2)


# ------------------------------------------------------------------------------------------
# Budgets and input validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "k"),
    [
        (3, 3),
        (np.int64(2), 2),
        (8, 8),  # N-2
        (0.25, 3),  # 2.5 -> halves round up
        (0.24, 2),  # 2.4
        (0.01, 1),  # 0.1 -> at least 1
        (np.float64(0.5), 5),
        (0.8, 8),
    ],
)
def test_resolve_budget_valid(budget: int | float, k: int) -> None:
    assert resolve_budget(10, budget) == k


@pytest.mark.parametrize(
    "budget", [0, -1, 9, 10, True, False, float("nan"), 0.0, 1.0, 1.5, -0.2, 0.85, "3", None]
)
def test_resolve_budget_invalid(budget: object) -> None:
    with pytest.raises(BudgetError, match="1 to 8"):
        resolve_budget(10, budget)  # type: ignore[arg-type]


def test_resolve_budget_too_few_layers() -> None:
    with pytest.raises(BudgetError, match="at least 3"):
        resolve_budget(2, 1)
    with pytest.raises(InvalidInputError):
        resolve_budget(True, 1)


def test_select_layers_budget_errors_and_fraction() -> None:
    s = block([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    for method in METHODS:
        assert len(select_layers(s, 0.3, method=method).removed) == 3
        with pytest.raises(BudgetError):
            select_layers(s, 9, method=method)
        with pytest.raises(BudgetError):
            select_layers(s, 0, method=method)


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(InvalidInputError, match="lorp, shortgpt, streamline"):
        select_layers(block([0, 0, 0, 1, 1, 1]), 1, method="magic")


@pytest.mark.parametrize("bad", [1, 7, True, 2.0])
def test_select_layers_rejects_bad_num_clusters(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="num_clusters"):
        select_layers(block([0, 0, 0, 1, 1, 1]), 1, num_clusters=bad)  # type: ignore[arg-type]


def _asym() -> np.ndarray:
    s = sym(4, 0.5, {})
    s[0, 1] = 0.6
    return s


def _with(value: float) -> np.ndarray:
    s = sym(4, 0.5, {})
    s[1, 2] = s[2, 1] = value
    return s


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        (np.full((3, 4), 0.5), "square"),
        (np.full(5, 0.5), "square"),
        (np.full((3, 3, 3), 0.5), "square"),
        (_asym(), "symmetric"),
        (_with(float("nan")), "finite"),
        (_with(float("inf")), "finite"),
        (sym(2, 0.5, {}), "at least 3"),
        (_with(1.5), r"\[-1, 1\]"),
        ([["a", "b", "c"]] * 3, "numeric"),
    ],
)
def test_similarity_validation_errors(matrix: object, match: str) -> None:
    with pytest.raises(SimilarityMatrixError, match=match):
        validate_similarity(matrix)  # type: ignore[arg-type]
    with pytest.raises(SimilarityMatrixError):
        select_layers(matrix, 1)  # type: ignore[arg-type]


def test_validate_returns_float64_copy_with_unit_diagonal() -> None:
    raw = [[0.5, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.5]]
    out = validate_similarity(raw)
    assert out.dtype == np.float64
    assert np.array_equal(np.diag(out), np.ones(3))
    src = np.array(raw, dtype=np.float32)
    out2 = validate_similarity(src)
    out2[0, 1] = 9.0
    assert src[0, 1] == np.float32(0.2)
    # float32 rounding noise is tolerated.
    noisy = sym(4, 0.5, {})
    noisy[0, 1] += 1e-7
    noisy[2, 3] = noisy[3, 2] = 1.0 + 1e-6
    validate_similarity(noisy)


# ------------------------------------------------------------------------------------------
# Properties over random matrices
# ------------------------------------------------------------------------------------------


def _random_similarity(rng: np.random.Generator, n: int) -> np.ndarray:
    """Cosines between the states of a random walk (looks like a residual stream)."""
    x = np.cumsum(rng.normal(size=(n, 16)), axis=0) + rng.normal(size=16) * rng.uniform(0, 4)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    return s


@pytest.mark.parametrize("seed", range(6))
def test_random_matrices_give_valid_deterministic_selections(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 24))
    s = _random_similarity(rng, n)
    for method in METHODS:
        for k in sorted({1, 2, n // 3, n - 2}):
            sel = select_layers(s, k, method=method)
            removed = sel.removed
            assert removed == sorted(set(removed))
            assert len(removed) == k
            assert 0 not in removed and n - 1 not in removed
            assert all(1 <= i <= n - 2 for i in removed)
            assert select_layers(s.copy(), k, method=method) == sel
            if method == "streamline":
                assert removed == list(range(removed[0], removed[0] + k))
            if method == "lorp":
                assert sel.labels is not None and sel.labels[0] == 0
                assert sel.num_clusters == policy_num_clusters(sel.rls)
    # Forced K (including K close to N, where some phases hold only protected layers).
    for forced in sorted({2, n // 2, n - 1, n}):
        sel = select_layers(s, n - 2, num_clusters=forced)
        assert sel.removed == list(range(1, n - 1))
        sel = select_layers(s, 2, num_clusters=forced)
        assert len(sel.removed) == 2 and 0 not in sel.removed and n - 1 not in sel.removed
        assert sel.labels is not None
        # Labels are numbered by first appearance.
        seen: list[int] = []
        for c in sel.labels:
            if c not in seen:
                seen.append(c)
        assert seen == list(range(len(seen)))
