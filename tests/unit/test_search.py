"""Model-in-the-loop selection (lorp.search, lorp.scoring, lorp.methods): sleb, lorp-kl, lorp-loss,
auto, and their pipeline wiring."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from lorp._blocks import get_blocks
from lorp.cli import main
from lorp.errors import InvalidInputError
from lorp.methods.auto import auto_select
from lorp.methods.lorp_kl import lorp_kl_select
from lorp.methods.lorp_loss import lorp_loss_select, swap_moves
from lorp.methods.sleb import sleb_select
from lorp.pipeline import PruneConfig, prune, run_pipeline
from lorp.quality import compare_pruned, perplexity
from lorp.scoring import WindowScorer, affordable_passes, race
from lorp.search import ALL_METHODS, FOLD_METHODS, SEARCH_METHODS, search_layers
from lorp.selection import METHODS, select_layers
from lorp.similarity import capture_similarity
from lorp.surgery import pruned_view
from tests.tiny_models import (
    _COMMON,
    FAMILIES,
    TINY_TEXT,
    build_tiny,
    tiny_input_ids,
    tiny_tokenizer,
)

TEXT = TINY_TEXT


def build_deep(depth: int = 10, seed: int = 0) -> PreTrainedModel:
    """A tiny random Llama with more blocks than the shared tiny models (richer phases)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(**{**_COMMON, "num_hidden_layers": depth}), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def deep() -> tuple[PreTrainedModel, torch.Tensor, torch.Tensor]:
    model = build_deep()
    s = capture_similarity(model, tiny_input_ids(batch=4, length=32, seed=3))
    windows = tiny_input_ids(batch=2, length=24, seed=5)
    return model, torch.as_tensor(s), windows


def test_method_names() -> None:
    assert set(METHODS) < set(ALL_METHODS)
    assert set(SEARCH_METHODS) == {"sleb", "lorp-kl", "lorp-loss", "auto"}
    assert FOLD_METHODS == {"lorp-fold": "lorp-loss"}
    assert set(ALL_METHODS) == set(METHODS) | set(SEARCH_METHODS) | set(FOLD_METHODS)
    with pytest.raises(InvalidInputError):
        select_layers([[1, 0.5, 0.2], [0.5, 1, 0.5], [0.2, 0.5, 1]], 1, method="auto")


def test_scorer_matches_compare_pruned_and_caches() -> None:
    model = build_tiny("llama")
    windows = tiny_input_ids(batch=3, length=16, seed=7)
    scorer = WindowScorer(model, windows, batch_size=2)
    got = scorer.score([3, 1])
    ref = compare_pruned(model, [1, 3], windows, batch_size=1)
    assert got.removed == (1, 3)
    assert got.kl == pytest.approx(ref.kl, rel=1e-4)
    assert got.top1_agreement == pytest.approx(ref.top1_agreement)
    assert got.nll == pytest.approx(ref.pruned.nll, rel=1e-5)
    assert got.tokens == ref.tokens == 3 * 15
    assert scorer.passes == 2  # dense reference + this set
    assert scorer.score([1, 3]) is got and scorer.passes == 2  # cached
    dense = scorer.score([])
    assert dense.kl == 0.0 and dense.nll == pytest.approx(ref.dense.nll, rel=1e-5)
    nll_only = WindowScorer(model, windows, reference=False).score([2])
    assert nll_only.kl is None and nll_only.top1_agreement is None
    with pytest.raises(InvalidInputError):
        scorer.score([6])
    assert len(model.model.layers) == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_gives_the_same_scores_as_whole_passes(family: str) -> None:
    model = build_tiny(family)
    windows = tiny_input_ids(batch=3, length=20, seed=1)
    sets = [(1,), (2, 4), (3,), (4, 5), (1, 3)]  # (4, 5): nothing kept after block 4
    whole = WindowScorer(model, windows, batch_size=2, prefix_bytes=0)
    cached = WindowScorer(model, windows, batch_size=2)
    cached.prefetch(sets)  # dense reference pass, storing block inputs 1..3 on the way
    assert cached.passes == 1 and cached.prefix_passes == 0
    assert cached.info()["prefix_blocks"] == [1, 2, 3]
    nll_only = WindowScorer(model, windows, batch_size=2, reference=False)
    nll_only.prefetch(sets)  # a partial dense pass up to block 3's input
    assert nll_only.prefix_passes == 1 and nll_only.passes == 0
    argmax = WindowScorer(model, windows, batch_size=2, keep_distribution=False)
    for removed in sets:
        a, b, c, d = (s.score(removed) for s in (whole, cached, nll_only, argmax))
        assert a.start_block == 0
        assert b.start_block == (0 if removed == (4, 5) else removed[0])
        assert b.nll == pytest.approx(a.nll, abs=1e-5)
        assert c.nll == pytest.approx(a.nll, abs=1e-5)
        assert b.kl == pytest.approx(a.kl, abs=1e-5)
        assert b.top1_agreement == a.top1_agreement == d.top1_agreement
        assert d.kl is None and d.nll == pytest.approx(a.nll, abs=1e-5)
    assert len(get_blocks(model)) == 6


def test_prefix_cache_respects_its_memory_budget_and_skips_useless_passes() -> None:
    model = build_tiny("llama")
    windows = tiny_input_ids(batch=2, length=16, seed=2)
    per_block = windows.numel() * model.config.hidden_size * 4
    scorer = WindowScorer(model, windows, reference=False, prefix_bytes=2 * per_block)
    scorer.prefetch([(1,), (2,), (3,), (4,)])
    assert len(scorer.info()["prefix_blocks"]) == 2  # evenly spaced within the budget
    assert scorer.info()["prefix_blocks"] == [1, 3]
    assert [scorer.score([b]).start_block for b in (1, 2, 3, 4)] == [1, 1, 3, 3]
    one = WindowScorer(model, windows, reference=False)
    one.prefetch([(3,)])  # a partial pass to block 3 saves nothing for one pass from block 3
    assert one.prefix_passes == 0 and one.info()["prefix_blocks"] == []
    with pytest.raises(InvalidInputError):
        WindowScorer(model, windows, prefix_bytes=-1)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_leading_windows_then_the_rest_equal_a_whole_pass(family: str) -> None:
    model = build_tiny(family)
    windows = tiny_input_ids(batch=5, length=16, seed=4)
    whole = WindowScorer(model, windows, batch_size=2, prefix_bytes=0)
    parts = WindowScorer(model, windows, batch_size=2)
    sets = [(1,), (2, 3), (4,)]
    parts.prefetch(sets, windows=2)  # dense reference pass: block inputs of every window
    first = {s: parts.score(s, windows=2) for s in sets}
    nll_only = WindowScorer(model, windows, batch_size=2, reference=False)
    nll_only.prefetch(sets, windows=3)  # partial dense pass over batches 0-1 (windows 0-3)
    assert nll_only.prefix_passes == 1
    for s in sets:
        assert first[s].tokens == 2 * 15
        ref = compare_pruned(model, s, windows[:2])
        assert first[s].nll == pytest.approx(ref.pruned.nll, abs=1e-5)
        assert first[s].kl == pytest.approx(ref.kl, abs=1e-5)
        assert nll_only.score(s, windows=3).tokens == 4 * 15  # whole batches
    done = parts.batches_run
    nll_only.prefetch(sets)  # extends the stored inputs to the last batch
    for s in sets:
        a, b, c = whole.score(s), parts.score(s), nll_only.score(s)
        assert b.nll == pytest.approx(a.nll, abs=1e-5) and c.nll == pytest.approx(a.nll, abs=1e-5)
        assert b.kl == pytest.approx(a.kl, abs=1e-5)
        assert b.top1_agreement == a.top1_agreement and b.tokens == a.tokens == 5 * 15
        assert parts.score(s) is b and parts.cached(s)
    assert parts.batches_run == done + 2 * len(sets)  # only the batches not run before
    assert parts.passes == 1 + len(sets)  # distinct sets (and the dense reference)
    assert parts.info()["pass_equivalents"] == pytest.approx(parts.batches_run / 3, abs=1e-3)
    with pytest.raises(InvalidInputError):
        parts.score((1,), windows=0)


def test_race_drops_only_sets_far_behind_and_finishes_the_rest(deep: tuple) -> None:
    model, s, _ = deep
    windows = tiny_input_ids(batch=8, length=16, seed=9)
    sets = [tuple(select_layers(s, 4, method=m).removed) for m in ("lorp", "shortgpt")]
    sets = list(dict.fromkeys([*sets, (1, 2, 3, 4), (5, 6, 7, 8), (2, 4, 6, 8)]))

    def loss(removed: tuple[int, ...], w: torch.Tensor) -> float:
        with pruned_view(model, removed):
            return perplexity(model, w).nll

    first = {k: loss(k, windows[:2]) for k in sets}
    full = {k: loss(k, windows) for k in sets}
    lead = min(first.values())
    for margin in (0.0, 0.01, float("inf")):
        scorer = WindowScorer(model, windows, reference=False)
        res = race(scorer, sets, margin=margin)
        assert res.first_windows == 2
        assert res.alive == [k for k in sets if first[k] - lead <= margin]
        for k in sets:
            alive = k in res.alive and len(res.alive) > 1
            expect = full[k] if alive else first[k]
            assert res.scores[k].nll == pytest.approx(expect, abs=1e-5)
            assert res.scores[k].tokens == (8 if alive else 2) * 15
        assert res.best("nll") == min(res.alive, key=lambda k: res.scores[k].nll)
        if margin == float("inf"):
            assert res.best("nll") == min(sets, key=lambda k: full[k])
            assert scorer.info()["pass_equivalents"] == pytest.approx(len(sets))
        else:
            finished = len(res.alive) if len(res.alive) > 1 else 0
            assert scorer.batches_run == 2 * len(sets) + 6 * finished
    one = race(WindowScorer(model, windows[:1], reference=False), sets)
    assert one.first_windows == 0 and one.alive == sets  # one window: nothing to race on
    with pytest.raises(InvalidInputError):
        race(WindowScorer(model, windows, reference=False), sets, objective="kl")
    with pytest.raises(InvalidInputError):
        race(WindowScorer(model, windows), sets, margin=-1.0)


def test_sleb_removes_k_distinct_interior_blocks_greedily(deep: tuple) -> None:
    model, s, windows = deep
    n = len(model.model.layers)
    scorer = WindowScorer(model, windows, reference=False)
    sel = sleb_select(scorer, 4, similarity=s)
    assert sel.method == "sleb" and len(sel.removed) == 4 == len(set(sel.removed))
    assert all(1 <= b <= n - 2 for b in sel.removed)
    assert sel.details["passes"] == sum(n - 2 - i for i in range(4))
    # step 1 really is the block whose removal alone gives the lowest NLL
    single = {}
    for b in range(1, n - 1):
        with pruned_view(model, [b]):
            single[b] = perplexity(model, windows).nll
    first = sel.details["removal_order"][0]
    assert first == min(single, key=lambda b: single[b])
    assert sel.details["scores"][first] == pytest.approx(single[first], rel=1e-5)
    # every later step is the best given the earlier removals
    for i, step in enumerate(sel.details["steps"]):
        assert step["removed"] == sel.details["removal_order"][i]
        assert step["nll"] == min(step["nll_by_block"].values())
    assert len(model.model.layers) == n


@pytest.mark.parametrize(("k", "num_clusters"), [(3, None), (5, 3)])
def test_lorp_kl_respects_lorp_phase_quotas(deep: tuple, k: int, num_clusters: int | None) -> None:
    model, s, windows = deep
    lorp = select_layers(s, k, method="lorp", num_clusters=num_clusters)
    scorer = WindowScorer(model, windows)
    sel = lorp_kl_select(s, k, scorer, num_clusters=num_clusters, candidates_per_slot=3)
    assert sel.method == "lorp-kl" and sel.labels == lorp.labels
    assert sel.num_clusters == lorp.num_clusters
    assert len(sel.removed) == k and 0 not in sel.removed and 9 not in sel.removed
    quota = Counter(lorp.labels[b] for b in lorp.removed)
    assert Counter(sel.labels[b] for b in sel.removed) == quota
    assert sel.details["lorp_removed"] == lorp.removed
    for slot in sel.details["slots"]:
        assert all(sel.labels[c] == slot["phase"] for c in slot["candidates"])
        assert len(slot["candidates"]) <= 3
        if slot["kl"]:  # measured: the chosen block has the lowest KL of its candidates
            assert slot["kl"][str(slot["chosen"])] == min(slot["kl"].values())
    # the final KL is what compare_pruned measures for the chosen set
    assert sel.details["kl"] == pytest.approx(compare_pruned(model, sel.removed, windows).kl, 1e-4)
    # with one candidate per slot nothing is measured and the result is LoRP's
    one = lorp_kl_select(
        s, k, WindowScorer(model, windows), num_clusters=num_clusters, candidates_per_slot=1
    )
    assert one.removed == lorp.removed


@pytest.mark.parametrize(("k", "num_clusters", "max_passes"), [(3, None, None), (5, 3, 4)])
def test_lorp_loss_starts_from_the_best_s_selection_and_only_keeps_real_gains(
    deep: tuple, k: int, num_clusters: int | None, max_passes: int | None
) -> None:
    model, s, windows = deep
    lorp = select_layers(s, k, method="lorp", num_clusters=num_clusters)
    scorer = WindowScorer(model, windows, reference=False)
    sel = lorp_loss_select(s, k, scorer, num_clusters=num_clusters, max_passes=max_passes)
    d = sel.details
    assert sel.method == "lorp-loss" and sel.labels == lorp.labels
    assert sel.num_clusters == lorp.num_clusters and d["lorp_removed"] == lorp.removed
    assert len(sel.removed) == k and 0 not in sel.removed and 9 not in sel.removed

    def loss(removed: list[int], w: torch.Tensor) -> float:
        with pruned_view(model, removed):
            return perplexity(model, w).nll

    # starting points: LoRP (this K), the other K, ShortGPT, Streamline, each really measured
    names = [st["name"] for st in d["starts"]]
    assert names[0] == f"lorp (K={lorp.num_clusters})" and "streamline" in names
    assert {"shortgpt", "streamline"} <= set(names)
    # ... raced (lorp.scoring.race): each score is on the windows it reports
    for st in d["starts"]:
        w = windows[: st["windows"]]
        assert st["nll"] == pytest.approx(loss(st["removed"], w), rel=1e-5)
    best = min((st for st in d["starts"] if not st["eliminated"]), key=lambda st: st["nll"])
    assert d["start"] == best["name"]
    # the local search moves on half the windows, half as long, and only downhill
    search = d["search"]
    assert (search["windows"], search["seq_len"]) == (1, 12)
    if max_passes is not None:
        assert search["passes"] <= max_passes
    for r in search["rounds"]:
        assert r["accepted"] == (r["best_nll"] < r["nll"])
        assert len(r["best"]) == k
    for before, after in zip(search["rounds"], search["rounds"][1:], strict=False):
        assert after["nll"] < before["nll"] and after["from"] == before["best"]
    # the result is kept only if the (larger) scoring windows agree
    if d["improved"]:
        assert loss(sel.removed, windows) < loss(best["removed"], windows)
        assert sel.removed == search["result"]
    else:
        assert sel.removed == best["removed"]
    assert d["nll"] == pytest.approx(loss(sel.removed, windows[: d["nll_windows"]]), rel=1e-5)
    assert len(model.model.layers) == 10
    via_entry = search_layers(
        model, s, k, "lorp-loss", windows, num_clusters=num_clusters, max_passes=max_passes
    )
    assert via_entry.removed == sel.removed


def test_swap_moves_trade_one_block_at_run_ends() -> None:
    n = 12
    s = np.eye(n) + 0.0
    for i in range(n - 1):
        s[i, i + 1] = s[i + 1, i] = 0.5 + 0.01 * i  # deeper blocks look more redundant
    labels = [0] * 6 + [1] * 6
    current = (3, 4, 5, 9)
    moves = swap_moves(current, labels, s, 1)
    assert moves and len(set(moves)) == len(moves)
    for m in moves:
        assert len(m) == 4 and 0 not in m and n - 1 not in m
        out = set(current) - set(m)
        assert len(out) == 1 and out <= {3, 5, 9}  # a run's end leaves, never 4 (its interior)
    assert (2, 3, 4, 9) in moves and (4, 5, 6, 9) in moves  # the run 3-5 slides
    assert (3, 4, 5, 8) in moves and (3, 4, 5, 10) in moves  # the single run 9 slides
    gains = [max(s[b, b + 1] for b in set(m) - set(current)) for m in moves]
    assert gains[0] == max(gains)  # most S-redundant incoming block first


def test_auto_picks_the_lowest_kl_candidate_and_records_all(deep: tuple) -> None:
    model, s, windows = deep
    k = 3
    sel = auto_select(s, k, WindowScorer(model, windows), objective="kl")
    assert sel.details["objective"] == "kl"
    cands = sel.details["candidates"]
    names = [c["name"] for c in cands]
    policy_k = select_layers(s, k).num_clusters
    assert names[0] == f"lorp (K={policy_k}, policy)"
    expected_forced = {f"lorp (K={kk})" for kk in (2, 3, 4) if kk != policy_k}
    assert expected_forced <= set(names)
    assert "shortgpt" in names and "streamline" in names
    assert any(c["method"] == "lorp-kl" for c in cands)  # no pass limit: lorp-kl included
    for c in cands:  # every score is the real KL of that set on its windows, measured anew
        measured = compare_pruned(model, c["removed"], windows[: c["windows"]]).kl
        assert c["kl"] == pytest.approx(measured, rel=1e-4)
        assert c["select_s"] >= 0 and c["score_s"] >= 0
        assert c["windows"] == (1 if c["eliminated"] else 2)
    best = min((c for c in cands if not c["eliminated"]), key=lambda c: c["kl"])
    assert [c["chosen"] for c in cands].count(True) == 1
    assert next(c for c in cands if c["chosen"])["kl"] == best["kl"]
    assert sel.removed == best["removed"] and sel.method == "auto"
    assert sel.details["chosen"] == next(c["name"] for c in cands if c["chosen"])
    # identical selections are scored once and point at the first one
    seen: dict[tuple[int, ...], str] = {}
    for c in cands:
        key = tuple(c["removed"])
        assert c["same_as"] == seen.get(key)
        seen.setdefault(key, c["name"])
    json.dumps(sel.to_dict())  # JSON-safe


def test_auto_leaves_out_lorp_kl_when_not_affordable(deep: tuple) -> None:
    model, s, windows = deep
    sel = auto_select(s, 4, WindowScorer(model, windows), max_passes=3)
    assert all(c["method"] != "lorp-kl" for c in sel.details["candidates"])
    assert sel.details["lorp_kl"]["included"] is False
    assert "not affordable" in sel.details["lorp_kl"]["reason"]
    forced = auto_select(s, 4, WindowScorer(model, windows), include_lorp_kl=False)
    assert all(c["method"] != "lorp-kl" for c in forced.details["candidates"])


def test_affordable_passes_scales_with_calibration(deep: tuple) -> None:
    model, _, _ = deep
    small = affordable_passes(model, 4 * 32, 2 * 24, 3)
    big = affordable_passes(model, 64 * 32, 2 * 24, 3)
    assert 0 <= small < big
    assert affordable_passes(model, 1, 10**6, 3) == 0


def test_search_layers_validation(deep: tuple) -> None:
    model, s, windows = deep
    with pytest.raises(InvalidInputError, match="unknown search method"):
        search_layers(model, s, 2, "lorp", windows)
    with pytest.raises(InvalidInputError, match="num_clusters"):
        search_layers(model, s, 2, "auto", windows, num_clusters=3)
    with pytest.raises(InvalidInputError, match="candidates_per_slot"):
        search_layers(model, s, 2, "lorp-kl", windows, candidates_per_slot=0)
    with pytest.raises(InvalidInputError):
        search_layers(model, s[:5, :5], 2, "auto", windows)
    with pytest.raises(InvalidInputError):
        PruneConfig(method="magic", num_remove=2)
    with pytest.raises(InvalidInputError, match="num_clusters"):
        PruneConfig(method="sleb", num_remove=2, num_clusters=3)


def test_prune_auto_uses_held_out_scoring_windows(tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    tok = tiny_tokenizer()
    model = build_tiny("llama")
    config = PruneConfig(
        method="auto",
        num_remove=2,
        windows=4,
        seq_len=32,
        score_windows=2,
        score_seq_len=16,
        holdout_windows=3,
    )
    seen: list[str] = []
    res = prune(model, tok, text, config, progress=lambda st, f, m: seen.append(st))
    assert res.selection.method == "auto" and len(res.removed) == 2
    assert res.scoring is not None and res.scoring["held_out"] is True
    assert res.scoring["windows"] == 2 and res.scoring["seq_len"] == 16
    # scoring windows: the text right after the 4 x 32 calibration tokens; quality: after those
    ids = tok(TEXT, add_special_tokens=False).input_ids
    score_w = torch.tensor(ids[128 : 128 + 32]).view(2, 16)
    fresh = build_tiny("llama")
    cands = res.selection.details["candidates"]
    chosen = next(c for c in cands if c["chosen"])
    # auto ranks by loss on the scoring windows (no dense pass: no KL recorded per candidate)
    assert res.selection.details["objective"] == "nll"
    assert chosen["kl"] is None
    measured = compare_pruned(fresh, chosen["removed"], score_w[: chosen["windows"]]).pruned.nll
    assert chosen["nll"] == pytest.approx(measured, 1e-4)
    assert chosen["nll"] == min(c["nll"] for c in cands if not c["eliminated"])
    assert res.evaluation is not None and res.evaluation["kind"] == "held-out calibration windows"
    holdout = torch.tensor(ids[160 : 160 + 96]).view(3, 32)
    assert res.quality is not None
    assert res.quality.kl == pytest.approx(compare_pruned(fresh, res.removed, holdout).kl, 1e-4)
    assert "selection" in seen and len(model.model.layers) == 4


def test_run_pipeline_and_cli_with_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "tiny"
    build_tiny("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    code = main(
        [
            "prune", "--model", str(d), "--calibration", str(text), "--remove", "2",
            "--method", "auto", "--windows", "4", "--seq-len", "32", "--score-windows", "2",
            "--score-seq-len", "16", "--holdout-windows", "2", "--no-bench",
            "--out", str(tmp_path / "out"), "--quiet", "--json",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == "auto" and report["summary"]["status"] == "pruned"
    cands = report["selection"]["details"]["candidates"]
    assert len(cands) >= 4 and sum(c["chosen"] for c in cands) == 1
    assert report["selection"]["removed"] == json.loads(out)["removed"]
    assert report["extra"]["scoring"]["held_out"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Candidates (auto)" in md and "(chosen)" in md
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert reloaded.config.num_hidden_layers == 4

    res = run_pipeline(
        d,
        text,
        tmp_path / "out2",
        PruneConfig(method="lorp-kl", num_remove=2, windows=4, seq_len=32, score_seq_len=16),
    )
    assert res.report["method"] == "lorp-kl"
    assert res.report["selection"]["details"]["quotas"]

    res = run_pipeline(
        d,
        text,
        tmp_path / "out3",
        PruneConfig(method="lorp-loss", num_remove=2, windows=4, seq_len=32, score_seq_len=16),
    )
    details = res.report["selection"]["details"]
    assert res.report["method"] == "lorp-loss" and details["start"]
    budget = details["search"]["max_passes"]
    assert isinstance(budget, int) and details["search"]["passes"] <= budget
    explanation = res.report["selection"]["explanation"]
    assert "LoRP's phases" in explanation and details["start"] in explanation


def test_auto_default_objective_is_loss_without_a_dense_pass(deep: tuple) -> None:
    model, s, windows = deep
    scorer = WindowScorer(model, windows, reference=False)
    sel = auto_select(s, 3, scorer)
    cands = sel.details["candidates"]
    distinct = {tuple(c["removed"]) for c in cands}
    assert scorer.passes == len(distinct)  # one pass per distinct set, none for a dense reference
    for c in cands:
        measured = compare_pruned(model, c["removed"], windows[: c["windows"]]).pruned.nll
        assert c["nll"] == pytest.approx(measured, rel=1e-4)
    chosen = next(c for c in cands if c["chosen"])
    alive = [c for c in cands if not c["eliminated"]]
    assert chosen["nll"] == min(c["nll"] for c in alive) and sel.removed == chosen["removed"]
    # raced: the dropped ones were more than the margin behind on the first window
    assert sel.details["race"] == {"first_windows": 1, "margin": 0.25}
    first = [compare_pruned(model, c["removed"], windows[:1]).pruned.nll for c in cands]
    for c, nll in zip(cands, first, strict=True):
        assert c["eliminated"] == (nll - min(first) > 0.25)
    assert not any(c["method"] == "lorp-kl" for c in cands)
    assert "dense reference" in sel.details["lorp_kl"]["reason"]
    with pytest.raises(InvalidInputError, match="reference"):
        auto_select(s, 3, WindowScorer(model, windows, reference=False), objective="kl")


def test_strided_scorer_scores_every_stride_th_prediction_from_the_prefix() -> None:
    """stride=3: the NLL is the mean over positions 0, 3, 6, ... of the pruned model's own
    log-probabilities (the head runs only there), with and without the dense prefix cache; a
    stride needs reference=False."""
    from lorp.surgery import remove_blocks
    from tests.tiny_models import build_tiny

    model = build_tiny("llama")
    g = torch.Generator().manual_seed(11)
    windows = torch.randint(3, 100, (3, 20), generator=g)
    positions = torch.arange(0, 19, 3)
    pruned = build_tiny("llama")
    remove_blocks(pruned, [2, 4])
    with torch.no_grad():
        logp = torch.log_softmax(pruned(windows).logits[:, positions].float(), dim=-1)
    expected = float(-logp.gather(-1, windows[:, positions + 1].unsqueeze(-1)).mean())
    whole = WindowScorer(model, windows, reference=False, stride=3, prefix_bytes=0)
    once = WindowScorer(model, windows, reference=False, stride=3)
    once.prefetch([[2, 4]])  # one pass from block 2 saves no more than storing its input costs
    cached = WindowScorer(model, windows, reference=False, stride=3)
    cached.prefetch([[2, 4]], passes=2)
    assert once.info()["prefix_blocks"] == [] and cached.info()["prefix_blocks"] == [2]
    for scorer in (whole, cached):
        score = scorer.score([2, 4])
        assert score.nll == pytest.approx(expected, rel=1e-6)
        assert score.tokens == 3 * len(positions)
    assert whole.score([2, 4]).start_block == 0 and cached.score([2, 4]).start_block == 2
    with pytest.raises(InvalidInputError, match="reference=False"):
        WindowScorer(model, windows, stride=2)
    with pytest.raises(InvalidInputError, match="stride"):
        WindowScorer(model, windows, reference=False, stride=0)
    with pytest.raises(InvalidInputError, match="passes"):
        cached.prefetch([[2, 4]], passes=0)
