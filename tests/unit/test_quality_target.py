"""Budgets by quality target (issue 23 item 5): the depth searched on held-out calibration
windows, checked against ratios computed here independently (the method's choice at each depth,
lorp.quality.compare_pruned on the same windows); the confirmation on the evaluation data and its
bounded step back; the corrections fitted once; task-retention targets; bad targets refused; the
job spec, the report, the plot and the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from pydantic import ValidationError

from jobcore.spec import JobCreate, JobSummary
from lorp.cli import main
from lorp.data import text_windows
from lorp.errors import BudgetError, InvalidInputError
from lorp.loading import bundled_model_path
from lorp.pipeline import (
    PruneConfig,
    calibrate,
    draw_scoring,
    find_depth,
    prune,
    run_pipeline,
    windows_after,
)
from lorp.quality import compare_pruned
from lorp.report import job_summary, load_schema
from lorp.selection import select_layers
from lorp.similarity import capture_similarity
from lorp.target import CONFIRM_STEPS, QualityTarget, search_depth
from tests.tiny_models import TINY_TEXT, build_tiny, tiny_tokenizer
from tests.tiny_tasks import write_tiny_tasks

#: The tiny model whose held-out ratios grow with the depth and exceed 1 (a random model's
#: pruned perplexity can also come out lower than the dense one's).
FAMILY, SEED = "qwen2", 1
SMALL: dict[str, Any] = {"windows": 4, "seq_len": 32, "holdout_windows": 4}


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("target") / "calibration.txt"
    p.write_text(TINY_TEXT)
    return p


def brute_force_ratios(
    model: torch.nn.Module, tokenizer: Any, text: Path, method: str, windows: torch.Tensor | None
) -> tuple[list[list[int]], list[float]]:
    """Independently of the pipeline: S on the calibration windows, the S-only method's choice at
    each depth 1..N-2, and its perplexity ratio on ``windows`` (default: the held-out windows
    right after the calibration windows)."""
    calibration = text_windows(tokenizer, text, SMALL["seq_len"], SMALL["windows"])
    held = windows
    if held is None:
        held = text_windows(
            tokenizer,
            text,
            SMALL["seq_len"],
            SMALL["holdout_windows"],
            skip_windows=SMALL["windows"],
        )
    similarity = capture_similarity(model, calibration)
    removed = [
        list(select_layers(similarity, k, method=method).removed)
        for k in range(1, len(model.model.layers) - 1)
    ]
    return removed, [compare_pruned(model, r, held).ppl_ratio for r in removed]


def scan_choice(ratios: list[float], target: float) -> int:
    """The search's rule: the depth before the first that misses (0: the first misses)."""
    for k, ratio in enumerate(ratios, start=1):
        if ratio > target:
            return k - 1
    return len(ratios)


# -- the target and the scan ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_ppl_ratio": 1.0}, "max_ppl_ratio must be above 1"),
        ({"target_ppl_ratio": 0.5}, "max_ppl_ratio must be above 1"),
        ({"target_ppl_ratio": math.nan}, "finite number"),
        ({"target_ppl_ratio": True}, "finite number"),
        ({"target_task_retention": 0.0, "tasks": ("piqa",)}, r"must be in \(0, 1\]"),
        ({"target_task_retention": 1.01, "tasks": ("piqa",)}, r"must be in \(0, 1\]"),
        ({"target_ppl_ratio": 1.5, "target_task_retention": 0.9}, "exactly one budget"),
        ({"target_ppl_ratio": 1.5, "num_remove": 2}, "exactly one budget"),
        ({"target_ppl_ratio": 1.5, "fraction": 0.2}, "exactly one budget"),
        ({"target_task_retention": 0.9}, "needs tasks"),
        ({"target_task_retention": 0.9, "tasks": ("piqa",), "task_limit": None}, "task_limit"),
        ({"target_ppl_ratio": 1.5, "holdout_windows": 0}, "holdout_windows must be at least 1"),
        ({"target_ppl_ratio": 1.5, "target_task_items": 0}, "target_task_items"),
    ],
)
def test_bad_targets_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        PruneConfig(**kwargs)


def test_a_target_has_no_block_budget() -> None:
    config = PruneConfig(target_ppl_ratio=1.5)
    assert config.quality_target == QualityTarget("max_ppl_ratio", 1.5)
    assert config.requested_budget == {"max_ppl_ratio": 1.5}
    with pytest.raises(BudgetError, match="no block budget"):
        _ = config.budget
    at3 = config.at_depth(3)
    assert (at3.num_remove, at3.quality_target, at3.budget) == (3, None, 3)
    assert PruneConfig.from_dict(config.to_dict()) == config


def test_the_scan_stops_at_the_first_miss_and_keeps_the_curve() -> None:
    """Depths 1, 2, ... each the method's choice, measured in order; the first miss ends the scan
    (a later depth that would meet the target again is not measured)."""
    values = {1: 1.1, 2: 1.3, 3: 1.6, 4: 1.2, 5: 2.0}
    asked: list[int] = []
    seen: list[tuple[str, float]] = []

    def choose(k: int) -> list[int]:
        asked.append(k)
        return list(range(1, k + 1))

    search = search_depth(
        QualityTarget("max_ppl_ratio", 1.5),
        5,
        choose,
        lambda removed: (values[len(removed)], 10 * values[len(removed)]),
        dense=10.0,
        progress=lambda stage, fraction, message: seen.append((stage, fraction)),
    )
    assert asked == [1, 2, 3]
    assert [p.num_remove for p in search.points] == [1, 2, 3]
    assert [p.met for p in search.points] == [True, True, False]
    assert search.chosen == 2 and search.final_depth == 2 and search.confirmed is None
    assert search.points[1].removed == (1, 2) and search.points[1].quality == 13.0
    assert "depth 3 missed" in search.stopped
    assert [f for _, f in seen] == [0.2, 0.4, 0.6] and {s for s, _ in seen} == {"selection"}
    data = search.to_dict()
    assert data["target"] == {"max_ppl_ratio": 1.5} and data["metric"] == "ppl_ratio"
    assert [p["value"] for p in data["curve"]] == [1.1, 1.3, 1.6]

    # every depth meets: the deepest allowed; retention targets meet from above
    everything = search_depth(
        QualityTarget("min_task_retention", 0.8), 3, choose, lambda r: (0.9, None)
    )
    assert everything.chosen == 3 and "every depth" in everything.stopped
    # one block already misses: a clear error naming what was measured
    with pytest.raises(BudgetError, match=r"no depth meets.*removing one block \(\[1\]\).*1\.1"):
        search_depth(QualityTarget("max_ppl_ratio", 1.05), 5, choose, lambda r: (1.1, None))
    with pytest.raises(BudgetError, match="no depth to search"):
        search_depth(QualityTarget("max_ppl_ratio", 1.5), 0, choose, lambda r: (1.0, None))


# -- the search on a tiny model ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chosen_depth_is_the_deepest_meeting_the_target(text: Path, dtype: torch.dtype) -> None:
    """The search's curve is the method's choice at each depth and its held-out ratio (computed
    here independently, on the windows after the calibration windows); the chosen depth is the
    brute-force answer for several targets."""
    model, tokenizer = build_tiny(FAMILY, seed=SEED, dtype=dtype), tiny_tokenizer()
    removed, ratios = brute_force_ratios(model, tokenizer, text, "shortgpt", None)
    assert ratios[0] > 1.0  # the setup this test needs: ratios above 1 that grow
    calib = calibrate(model, tokenizer, text, PruneConfig(num_remove=1, **SMALL))
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    distinct = sorted(set(ratios))
    targets = [(a + b) / 2 for a, b in itertools.pairwise(distinct)]
    targets = [t for t in targets if min(abs(t - r) for r in ratios) > 2 * tolerance]
    targets.append(max(ratios) + 0.5)
    assert len(targets) >= 3, ratios
    chosen = set()
    for target in targets:
        config = PruneConfig(method="shortgpt", target_ppl_ratio=target, **SMALL)
        found = find_depth(model, tokenizer, calib, config)
        search = found.search
        expected = scan_choice(ratios, target)
        assert search.chosen == expected, (target, ratios)
        chosen.add(search.chosen)
        # the curve: depth 1, 2, ... up to the first miss (or the deepest allowed), every point
        # but the last meets the target, each the method's choice at that depth
        depths = [p.num_remove for p in search.points]
        assert depths == list(range(1, len(depths) + 1))
        assert all(p.met for p in search.points[:-1])
        assert search.points[-1].met == (expected == len(ratios))
        for p in search.points:
            assert list(p.removed) == removed[p.num_remove - 1]
            assert p.value == pytest.approx(ratios[p.num_remove - 1], rel=tolerance)
            assert p.quality == pytest.approx(p.value * search.dense, rel=1e-6)
        assert search.data["kind"] == "held-out calibration windows"
        assert (search.data["windows"], search.data["seq_len"]) == (4, 32)
        assert sorted(found.choices) == depths
    assert len(chosen) >= 3  # the targets probe different depths


def test_prune_confirms_on_the_evaluation_data_and_steps_back(text: Path) -> None:
    """The evaluation misses the target at the depth the search chose: the prune steps back one
    depth at a time (bounded) until the evaluation meets it, and removes that depth's blocks."""
    tokenizer = tiny_tokenizer()
    evaluation = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(SEED))
    model = build_tiny(FAMILY, seed=SEED)
    _, held = brute_force_ratios(model, tokenizer, text, "lorp", None)
    removed, on_eval = brute_force_ratios(model, tokenizer, text, "lorp", evaluation)
    target = 1.25
    chosen = scan_choice(held, target)
    # what the prune must do, from the independent ratios: step back while the evaluation misses
    expected = [chosen]
    while on_eval[expected[-1] - 1] > target and len(expected) <= CONFIRM_STEPS:
        if expected[-1] == 1:
            break
        expected.append(expected[-1] - 1)
    assert len(expected) >= 2 and on_eval[expected[-1] - 1] <= target, (held, on_eval)

    config = PruneConfig(method="lorp", target_ppl_ratio=target, **SMALL)
    result = prune(model, tokenizer, text, config, evaluation=evaluation)
    search = result.depth_search
    assert search is not None and search.chosen == chosen
    assert [c["num_remove"] for c in search.confirmations] == expected
    assert [c["met"] for c in search.confirmations] == [False] * (len(expected) - 1) + [True]
    for c in search.confirmations:
        assert c["value"] == pytest.approx(on_eval[c["num_remove"] - 1], rel=1e-4)
        assert c["data"]["kind"] == "evaluation text" and c["folded"] is False
    assert search.final_depth == expected[-1] and search.confirmed is True
    assert result.removed == removed[expected[-1] - 1] and result.pruned
    assert len(model.model.layers) == 6 - expected[-1]
    assert result.quality is not None and result.quality.ppl_ratio <= target
    assert "target_not_confirmed" not in {f["code"] for f in result.flags}

    # a target the evaluation misses at every depth tried: bounded, flagged, never below 1 block
    model = build_tiny(FAMILY, seed=SEED)
    strict = PruneConfig(method="lorp", target_ppl_ratio=1.08, **SMALL)
    depth = scan_choice(held, 1.08)
    assert depth >= 1 and all(r > 1.08 for r in on_eval[:depth]), (held, on_eval)
    result = prune(model, tokenizer, text, strict, evaluation=evaluation)
    search = result.depth_search
    assert search is not None and len(search.confirmations) <= CONFIRM_STEPS + 1
    assert not any(c["met"] for c in search.confirmations)
    assert min(c["num_remove"] for c in search.confirmations) >= 1
    assert "target_not_confirmed" in {f["code"] for f in result.flags}


def test_without_an_evaluation_text_the_confirmation_uses_later_windows(text: Path) -> None:
    """The search's held-out windows follow the calibration windows; the evaluation's follow
    the search's, so the confirmation is on windows the search never saw."""
    model, tokenizer = build_tiny(FAMILY, seed=SEED), tiny_tokenizer()
    config = PruneConfig(method="shortgpt", target_ppl_ratio=1.3, **SMALL)
    result = prune(model, tokenizer, text, config)
    assert result.evaluation is not None
    assert result.evaluation["kind"] == "held-out calibration windows"
    search = result.depth_search
    assert search is not None
    later = text_windows(tokenizer, text, 32, 4, skip_windows=8)
    dense = build_tiny(FAMILY, seed=SEED)
    ratio = compare_pruned(dense, result.removed, later).ppl_ratio
    assert search.confirmations[-1]["value"] == pytest.approx(ratio, rel=1e-4)


def test_fold_methods_search_the_selection_then_fold_once(text: Path) -> None:
    """lorp-fold: each depth is measured with the plain selection (no map fitted per depth);
    the corrections are fitted once, for the depth the prune keeps, and the confirmation is the
    folded model's (the saved weights)."""
    model, tokenizer = build_tiny(FAMILY, seed=SEED), tiny_tokenizer()
    evaluation = text_windows(tokenizer, text, 32, 4, skip_windows=12)
    config = PruneConfig(
        method="lorp-fold",
        target_ppl_ratio=1.3,
        compensation_windows=2,
        compensation_tune_windows=1,
        temperature_windows=1,
        score_windows=2,
        score_seq_len=16,
        **SMALL,
    )
    dense = build_tiny(FAMILY, seed=SEED)
    result = prune(model, tokenizer, text, config, evaluation=evaluation)
    search = result.depth_search
    assert search is not None and result.compensation is not None
    assert all(c["folded"] for c in search.confirmations)
    # the curve is the plain selection's ratio on the search windows (after the calibration and
    # the scoring windows)
    calib = calibrate(dense, tokenizer, text, config)
    scoring = draw_scoring(tokenizer, calib, config)
    held, _ = windows_after(tokenizer, text, 32, 4, scoring.text_tokens, calib.bos)
    assert held is not None
    for p in search.points:
        assert p.value == pytest.approx(compare_pruned(dense, p.removed, held).ppl_ratio, rel=1e-4)
    assert result.quality is not None
    assert search.confirmations[-1]["value"] == pytest.approx(result.quality.ppl_ratio)
    assert search.confirmations[-1]["num_remove"] == len(result.removed)


def test_task_retention_target_searches_items_the_evaluation_does_not_score(
    text: Path, tmp_path: Path
) -> None:
    tasks_dir = write_tiny_tasks(tmp_path / "tasks", items=12)
    model, tokenizer = build_tiny(FAMILY, seed=SEED), tiny_tokenizer()
    config = PruneConfig(
        method="shortgpt",
        target_task_retention=0.5,
        tasks=("piqa", "boolq"),
        task_limit=4,
        target_task_items=6,
        task_data_dir=tasks_dir,
        **SMALL,
    )
    result = prune(model, tokenizer, text, config)
    search = result.depth_search
    assert search is not None and search.target.metric == "task_retention"
    assert search.data == {
        "kind": "task items after the evaluation's",
        "first_item": 4,
        "items": {"piqa": 6, "boolq": 6},
    }
    assert all(p.met for p in search.points[:-1])
    assert result.tasks is not None and result.tasks.dense.tasks["piqa"].n == 4
    assert search.confirmations[-1]["value"] == result.tasks.average_retention

    model = build_tiny(FAMILY, seed=SEED)
    no_items = PruneConfig(**{**config.to_dict(), "task_limit": 12})
    with pytest.raises(InvalidInputError, match=r"after the first task_limit=12.*no more items"):
        prune(model, tokenizer, text, no_items)


def test_the_search_needs_held_out_calibration_text(text: Path) -> None:
    model, tokenizer = build_tiny(FAMILY, seed=SEED), tiny_tokenizer()
    windows = text_windows(tokenizer, text, 32, 4)
    with pytest.raises(InvalidInputError, match="give the calibration as a text"):
        prune(model, tokenizer, windows, PruneConfig(target_ppl_ratio=1.5, **SMALL))
    every = int(text_windows(tokenizer, text, 32).shape[0])  # the calibration takes them all
    greedy = PruneConfig(target_ppl_ratio=1.5, windows=every, seq_len=32, holdout_windows=4)
    with pytest.raises(InvalidInputError, match="no 32-token window left"):
        prune(model, tokenizer, text, greedy)
    assert len(model.model.layers) == 6  # nothing removed


# -- job spec, report, CLI ---------------------------------------------------------------------

MINIMAL = {"model": "/m", "calibration": "corpus:c"}


def test_job_budget_by_quality_target_round_trips() -> None:
    spec = JobCreate.model_validate({**MINIMAL, "budget": {"max_ppl_ratio": 1.5}})
    config = spec.prune_config(PruneConfig)
    assert (config.num_remove, config.fraction, config.target_ppl_ratio) == (None, None, 1.5)
    assert config.quality_target == QualityTarget("max_ppl_ratio", 1.5)
    again = JobCreate.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec and again.budget.value() == {"max_ppl_ratio": 1.5}
    tasks = JobCreate.model_validate(
        {**MINIMAL, "budget": {"min_task_retention": 0.95}, "tasks": ["piqa"]}
    )
    config = tasks.prune_config(PruneConfig)
    assert config.target_task_retention == 0.95 and config.target_task_items == 50
    cost = spec.estimated_tokens()
    assert cost["depth_search"] > 0
    assert (
        JobCreate.model_validate({**MINIMAL, "budget": {"blocks": 2}}).estimated_tokens()[
            "depth_search"
        ]
        == 0
    )


@pytest.mark.parametrize(
    ("budget", "extra", "message"),
    [
        ({"max_ppl_ratio": 1.0}, {}, "greater than 1"),
        ({"max_ppl_ratio": 0.9}, {}, "greater than 1"),
        ({"min_task_retention": 0.0}, {"tasks": ["piqa"]}, "greater than 0"),
        ({"min_task_retention": 1.5}, {"tasks": ["piqa"]}, "less than or equal to 1"),
        ({"max_ppl_ratio": 1.5, "min_task_retention": 0.9}, {"tasks": ["piqa"]}, "exactly one"),
        ({"max_ppl_ratio": 1.5, "blocks": 2}, {}, "exactly one"),
        ({"min_task_retention": 0.9}, {}, "needs tasks"),
        ({"max_ppl_ratio": 1.5}, {"holdout_windows": 0}, "holdout_windows"),
    ],
)
def test_bad_job_targets_are_field_errors(
    budget: dict[str, Any], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        JobCreate.model_validate({**MINIMAL, "budget": budget, **extra})


def test_report_curve_plot_and_summary(tiny_dir: Path, text: Path, tmp_path: Path) -> None:
    config = PruneConfig(target_ppl_ratio=1e6, benchmark=None, **SMALL)
    out = run_pipeline(tiny_dir, text, tmp_path / "out", config)
    report = out.report
    jsonschema.validate(report, load_schema())
    search = report["depth_search"]
    assert search["target"] == {"max_ppl_ratio": 1e6}
    assert search["chosen"] == search["final"] == 4  # every depth meets: the deepest allowed
    assert [p["num_remove"] for p in search["curve"]] == [1, 2, 3, 4]
    assert report["budget"] == {"requested": {"max_ppl_ratio": 1e6}, "num_remove": 4}
    assert report["summary"]["target_depth"] == 4 and report["summary"]["target_confirmed"]
    summary = job_summary(report)
    assert summary["quality_target"] == {"max_ppl_ratio": 1e6}
    assert summary["target_depth"] == 4 and summary["target_confirmed"] is True
    assert JobSummary.model_validate(summary).target_depth == 4
    assert (tmp_path / "out" / "depth.png").stat().st_size > 1000
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Quality vs depth" in html and "Budget by quality target" in html
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "![quality vs depth](depth.png)" in markdown
    assert len(json.loads((tmp_path / "out" / "report.json").read_text())["depth_search"]["curve"])


def test_cli_target_flags(
    tiny_dir: Path, text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["prune", "--model", str(tiny_dir), "--calibration", str(text), "--no-bench"]
    small = ["--windows", "4", "--seq-len", "32", "--holdout-windows", "4"]
    assert main([*base, *small, "--target-ppl-ratio", "1.0", "--out", str(tmp_path / "a")]) != 0
    assert "max_ppl_ratio must be above 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one budget only (argparse)
        main([*base, "--remove", "2", "--target-ppl-ratio", "1.5", "--out", str(tmp_path / "b")])
    capsys.readouterr()
    code = main([*base, *small, "--target-ppl-ratio", "1e6", "--out", str(tmp_path / "c")])
    assert code == 0
    assert "depth 4 chosen on held-out calibration windows" in capsys.readouterr().out


# -- the bundled SmolLM2 -----------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.slow
def test_smollm2_checkpoint_meets_the_target_on_the_evaluation_text(tmp_path: Path) -> None:
    """max_ppl_ratio 1.5 on the bundled SmolLM2-135M (few short windows): a depth, the curve,
    and a saved checkpoint whose perplexity on the evaluation text, measured here after
    reloading it, is within 1.5x the dense model's."""
    from lorp.loading import load_model
    from lorp.quality import perplexity

    evaluation = SHARED_DATA / "eval" / "debian-reference.en.txt"
    config = PruneConfig(
        target_ppl_ratio=1.5,
        windows=4,
        seq_len=128,
        holdout_windows=2,
        eval_windows=4,
        eval_seq_len=128,
        benchmark=None,
    )
    out = run_pipeline(
        bundled_model_path(),
        SHARED_DATA / "calibration" / "debian-handbook.en.txt",
        tmp_path / "out",
        config,
        evaluation=evaluation,
        device="cpu",
        dtype="float32",
    )
    search = out.report["depth_search"]
    depth = search["final"]
    assert depth >= 1 and search["confirmed"] is True
    assert [p["num_remove"] for p in search["curve"]] == list(range(1, len(search["curve"]) + 1))
    assert out.report["model"]["num_layers_after"] == 30 - depth

    reloaded = load_model(out.checkpoint_dir, device="cpu", dtype="float32")
    assert len(reloaded.model.model.layers) == 30 - depth
    windows = text_windows(reloaded.tokenizer, evaluation, 128, 4)
    pruned = perplexity(reloaded.model, windows).ppl
    dense = out.report["quality"]["dense"]["ppl"]
    assert pruned / dense <= 1.5
    assert pruned == pytest.approx(out.report["quality"]["pruned"]["ppl"], rel=1e-3)
