"""lorp.report: the JSON document against its schema, the files, escaping."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from lorp.bench import BenchmarkConfig, benchmark
from lorp.errors import InvalidInputError, SimilarityMatrixError
from lorp.report import (
    REPORT_SCHEMA_VERSION,
    build_report,
    explain,
    job_summary,
    load_schema,
    method_label,
    write_reports,
)
from lorp.selection import select_layers
from tests.tiny_models import DEPTH, build_tiny

EVIL = '<script>alert("x")</script> & co'


def _similarity(n: int = DEPTH) -> np.ndarray:
    idx = np.arange(n)
    s = 0.2 + 0.8 * np.exp(-np.abs(idx[:, None] - idx[None, :]) / 3.0)
    np.fill_diagonal(s, 1.0)
    return s


def _validate(report: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(
        load_schema(), format_checker=jsonschema.FormatChecker()
    )
    validator.validate(report)


@pytest.fixture(scope="module")
def bench_dict() -> dict[str, Any]:
    model = build_tiny("llama")
    cfg = BenchmarkConfig(
        prefill=[(1, 8)],
        decode=[(1, 4, 3)],
        warmup=0,
        repetitions=2,
        block_repetitions=1,
        allow_few_repetitions=True,
    )
    selection = select_layers(_similarity(), 2)
    return benchmark(model, selection.removed, cfg).to_dict()


def _report(bench: Any = None, quality: Any = None, **model: Any) -> dict[str, Any]:
    s = _similarity()
    selection = select_layers(s, 2)
    return build_report(
        model={
            "source": "tiny-llama",
            "num_layers": DEPTH,
            "dtype": "float32",
            "device": "cpu",
            **model,
        },
        budget={"requested": 2, "num_remove": 2},
        selection=selection,
        similarity=s,
        timings={"calibration": 1.25, "selection": 0.01},
        benchmark=bench,
        quality=quality,
        extra={"note": "test"},
    )


QUALITY = {
    "dataset": "held-out text",
    "dense": {"ppl": 20.0, "nll": 3.0, "tokens": 1000},
    "pruned": {"ppl": 30.0, "nll": 3.4, "tokens": 1000},
    "kl": 0.4,
    "top1_agreement": 0.7,
}


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema())


def test_full_report_validates(bench_dict: dict[str, Any]) -> None:
    report = _report(bench_dict, QUALITY)
    _validate(report)
    assert report["schema_version"] == REPORT_SCHEMA_VERSION
    json.dumps(report, allow_nan=False)
    sel = report["selection"]
    assert sel["removed"] == bench_dict["removed"]
    assert sel["rls"] is not None and sel["num_clusters"] is not None
    assert len(sel["labels"]) == DEPTH
    assert sum(len(p["layers"]) for p in sel["phases"]) == DEPTH
    assert sorted(i for p in sel["phases"] for i in p["removed"]) == sel["removed"]
    assert np.allclose(np.asarray(report["similarity"]["matrix"]), _similarity())
    assert [w["name"] for w in report["speed"]] == ["prefill_b1_t8", "decode_b1_p4_n3"]
    first = bench_dict["workloads"][0]
    assert report["summary"]["speedups"]["prefill_b1_t8"] == pytest.approx(first["speedup"])
    assert report["memory"]["weights_saved_bytes"] == bench_dict["weights"]["saved_bytes"]
    assert report["summary"]["ppl_ratio"] == pytest.approx(1.5)
    assert report["environment"]["device"] == "cpu"
    assert report["environment"]["dtype"] == "float32"


def test_report_without_benchmark_or_quality_validates() -> None:
    report = _report()
    _validate(report)
    assert report["benchmark"] is None and report["quality"] is None
    assert report["speed"] == [] and report["memory"] is None
    assert report["summary"]["ppl_dense"] is None
    assert report["environment"]["python"]


def test_selection_as_dict_and_non_finite_numbers(bench_dict: dict[str, Any]) -> None:
    bench = copy.deepcopy(bench_dict)
    bench["workloads"][0]["speedup"] = float("inf")
    s = _similarity()
    report = build_report(
        model={"source": "m"},
        budget={"fraction": 0.3},
        selection=select_layers(s, 2, method="shortgpt").to_dict(),
        similarity=s,
        timings={},
        benchmark=bench,
        quality=None,
    )
    _validate(report)
    assert report["speed"][0]["speedup"] is None
    assert report["method"] == "shortgpt"
    assert report["selection"]["phases"] == []


def test_schema_rejects_broken_reports() -> None:
    report = _report()
    broken = copy.deepcopy(report)
    del broken["selection"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = copy.deepcopy(report)
    broken["schema_version"] = "0.1"
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = copy.deepcopy(report)
    broken["selection"]["removed"] = [-1]
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_bad_inputs() -> None:
    s = _similarity()
    selection = select_layers(s, 2)
    kwargs: dict[str, Any] = {
        "model": {},
        "budget": {},
        "timings": {},
        "benchmark": None,
        "quality": None,
    }
    with pytest.raises(SimilarityMatrixError):
        build_report(selection=selection, similarity=_similarity(DEPTH + 1), **kwargs)
    with pytest.raises(SimilarityMatrixError):
        build_report(selection=selection, similarity=np.ones((2, 3)), **kwargs)
    bad = s.copy()
    bad[0, 1] = np.nan
    with pytest.raises(SimilarityMatrixError):
        build_report(selection=selection, similarity=bad, **kwargs)
    with pytest.raises(InvalidInputError):
        build_report(selection={"method": "lorp"}, similarity=s, **kwargs)


def test_write_reports(tmp_path: Path, bench_dict: dict[str, Any]) -> None:
    report = _report(bench_dict, QUALITY)
    paths = write_reports(report, _similarity(), tmp_path / "out")
    names = {p.name for p in paths}
    assert names == {
        "report.json",
        "similarity.npy",
        "heatmap.png",
        "speedup.png",
        "report.html",
        "report.md",
    }
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    for png in ("heatmap.png", "speedup.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.load(tmp_path / "out" / "similarity.npy"), _similarity())
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    _validate(written)
    assert written == report
    html_text = (tmp_path / "out" / "report.html").read_text()
    assert html_text.count("data:image/png;base64,") == 2  # self-contained
    removed = ", ".join(map(str, report["selection"]["removed"]))
    assert removed in html_text
    assert "Perplexity: 20.00 → 30.00 (+50.0%)" in html_text
    md = (tmp_path / "out" / "report.md").read_text()
    assert "](heatmap.png)" in md and "](speedup.png)" in md
    assert "| weights |" in md


def test_write_reports_without_benchmark(tmp_path: Path) -> None:
    paths = write_reports(_report(), _similarity(), tmp_path)
    assert {p.name for p in paths} == {
        "report.json",
        "similarity.npy",
        "heatmap.png",
        "report.html",
        "report.md",
    }
    html_text = (tmp_path / "report.html").read_text()
    assert "Speed: not measured." in html_text
    assert "Quality: not measured" in html_text


def test_every_string_is_escaped(tmp_path: Path, bench_dict: dict[str, Any]) -> None:
    quality = {**QUALITY, "dataset": EVIL}
    report = _report(bench_dict, quality, source=EVIL, name=EVIL)
    write_reports(report, _similarity(), tmp_path)
    for name in ("report.html", "report.md"):
        text = (tmp_path / name).read_text()
        assert "<script>" not in text
        assert "&lt;script&gt;" in text
    html_text = (tmp_path / "report.html").read_text()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in html_text


#: Selection dicts and the prose the report prints for them (the text is part of the report).
EXPLAINED: dict[str, tuple[dict[str, Any], str]] = {
    "lorp": (
        {"method": "lorp", "num_layers": 12, "removed": [3, 7, 8], "rls": 0.85, "num_clusters": 3},
        (
            "LoRP: the Representation Locality Score RLS = 0.850 marks this model's "
            "representations as intermediate; it was split into K = 3 phases by spectral "
            "clustering of S. Every phase first loses its most redundant block (coverage), "
            "the rest of the budget goes to the phases whose remaining blocks are most "
            "alike, giving 3 of 12 blocks removed. The first and the last block are never "
            "removed."
        ),
    ),
    "shortgpt": (
        {"method": "shortgpt", "num_layers": 12, "removed": [5, 6], "rls": 1.2},
        (
            "ShortGPT: the 2 blocks whose input and output are most alike (highest cosine "
            "S[i, i+1], Block Influence) were removed. RLS = 1.200 (for information)."
        ),
    ),
    "streamline": (
        {"method": "streamline", "num_layers": 12, "removed": [4, 5, 6], "rls": None},
        (
            "LLM-Streamline: one contiguous run of 3 blocks was removed where the input "
            "before the run and the input after it are most alike. RLS = n/a (for "
            "information)."
        ),
    ),
    "sleb": (
        {
            "method": "sleb",
            "num_layers": 12,
            "removed": [2, 9],
            "rls": 0.5,
            "details": {"passes": 19, "scoring": {"windows": 4, "seq_len": 256}},
        },
        (
            "SLEB (iterative, by calibration loss): starting from the full model, 2 times "
            "the block whose removal gave the lowest loss on 4 scoring windows x 256 tokens "
            "of calibration text was removed (19 forward passes). RLS = 0.500 (for "
            "information)."
        ),
    ),
    "lorp-kl": (
        {
            "method": "lorp-kl",
            "num_layers": 12,
            "removed": [3, 8],
            "rls": 0.9,
            "num_clusters": 3,
            "details": {
                "passes": 7,
                "candidates_per_slot": 3,
                "lorp_removed": [3, 7],
                "scoring": {"windows": 4, "seq_len": 256},
            },
        },
        (
            "LoRP-KL: LoRP's phases (K = 3, RLS = 0.900) and its per-phase budget; within "
            "each phase the block to remove was chosen among the 3 most redundant by the "
            "lowest KL divergence from the full model on 4 scoring windows x 256 tokens of "
            "calibration text (7 forward passes; plain LoRP would remove [3, 7])."
        ),
    ),
    "lorp-loss": (
        {
            "method": "lorp-loss",
            "num_layers": 12,
            "removed": [3, 8],
            "rls": 0.9,
            "num_clusters": 2,
            "details": {
                "start": "shortgpt",
                "improved": True,
                "search": {"passes": 11},
                "lorp_removed": [3, 7],
                "scoring": {"windows": 8, "seq_len": 512},
            },
        },
        (
            "LoRP-loss (LoRP phases, greedy by calibration loss): LoRP's phases (K = 2, RLS "
            "= 0.900). The S-based selections were measured by their loss on 8 scoring "
            "windows x 512 tokens of calibration text; the best, shortgpt, was the start, "
            "and a local search of 11 swaps found a better set, confirmed on the scoring "
            "windows (2 of 12 blocks; plain LoRP would remove [3, 7])."
        ),
    ),
    "lorp-loss-kept": (
        {
            "method": "lorp-loss",
            "num_layers": 12,
            "removed": [3, 7],
            "rls": 0.9,
            "num_clusters": 2,
            "details": {
                "start": "lorp (K=2)",
                "improved": False,
                "search": {"passes": 4},
                "lorp_removed": [3, 7],
            },
        },
        (
            "LoRP-loss (LoRP phases, greedy by calibration loss): LoRP's phases (K = 2, RLS "
            "= 0.900). The S-based selections were measured by their loss on ? scoring "
            "windows x ? tokens of calibration text; the best, lorp (K=2), was the start, "
            "and no swap tried by the local search (4 passes) did better, so it was kept (2 "
            "of 12 blocks; plain LoRP would remove [3, 7])."
        ),
    ),
    "auto": (
        {
            "method": "auto",
            "num_layers": 12,
            "removed": [5, 6],
            "rls": 0.7,
            "details": {
                "objective": "nll",
                "chosen": "shortgpt",
                "race": {"first_windows": 2, "margin": 0.25},
                "candidates": [{"eliminated": True}, {"eliminated": False}, {"eliminated": True}],
                "scoring": {"windows": 8, "seq_len": 512},
            },
        },
        (
            "auto: 3 candidate selections were built and each was scored by its next-token "
            "loss on 8 scoring windows x 512 tokens held out from the calibration windows (2 "
            "dropped after the first 2 windows for being more than 0.25 nats behind the best "
            "there); the lowest, shortgpt, was kept (2 of 12 blocks). RLS = 0.700."
        ),
    ),
    "auto-kl": (
        {
            "method": "auto",
            "num_layers": 12,
            "removed": [5, 6],
            "rls": 0.7,
            "details": {
                "objective": "kl",
                "chosen": "lorp (K=3, policy)",
                "candidates": [{"eliminated": False}],
                "scoring": {"windows": 4, "seq_len": 256},
            },
        },
        (
            "auto: 1 candidate selections were built and each was scored by its KL "
            "divergence of its next-token predictions from the full model's on 4 scoring "
            "windows x 256 tokens held out from the calibration windows; the lowest, lorp "
            "(K=3, policy), was kept (2 of 12 blocks). RLS = 0.700."
        ),
    ),
    "unknown": (
        {"method": "magic", "num_layers": 12, "removed": [1], "rls": 0.7},
        ("magic: 1 of 12 blocks removed. RLS = 0.700."),
    ),
}


@pytest.mark.parametrize("case", list(EXPLAINED))
def test_explanation_prose_per_method(case: str) -> None:
    selection, expected = EXPLAINED[case]
    assert explain(selection) == expected
    n = selection["num_layers"]
    doc = build_report(
        model={"source": "x", "num_layers": n},
        budget={"num_remove": len(selection["removed"])},
        selection=selection,
        similarity=_similarity(n),
        timings={},
    )
    assert doc["selection"]["explanation"] == expected


def test_method_labels() -> None:
    assert [method_label(m) for m in ("lorp", "shortgpt", "streamline", "lorp-kl", "magic")] == [
        "LoRP",
        "ShortGPT",
        "LLM-Streamline",
        "LoRP-KL",
        "magic",
    ]
    assert method_label("sleb") == "SLEB (iterative, by calibration loss)"
    assert method_label("lorp-loss") == "LoRP-loss (LoRP phases, greedy by calibration loss)"


# --------------------------------------------------------------------------------------------
# A prune's quality guard, and the job summary


FLAG = {"code": "kl_high", "metric": "kl", "value": 1.5, "threshold": 1.0, "message": "KL high"}
GATE = {
    "passed": False,
    "limits": {"max_kl": 0.5},
    "measured": {"kl": 0.4},
    "violations": ["mean KL 0.4000 nats > max 0.5"],
    "where": "held-out text",
}


def test_status_writes_the_quality_guard_into_summary_and_quality() -> None:
    s = _similarity()
    doc = build_report(
        model={"source": "m", "num_layers": DEPTH},
        budget={"num_remove": 2},
        selection=select_layers(s, 2),
        similarity=s,
        timings={},
        quality=QUALITY,
        status="refused",
        flags=[FLAG],
        gate=GATE,
    )
    _validate(doc)
    summary = doc["summary"]
    assert list(summary)[-5:] == ["status", "kl", "top1_agreement", "flags", "quality_gate"]
    assert summary["status"] == "refused"
    assert summary["kl"] == 0.4 and summary["top1_agreement"] == 0.7
    assert summary["flags"] == ["KL high"] and summary["quality_gate"] == GATE
    assert list(doc["quality"])[-3:] == ["flags", "flag_thresholds", "gate"]
    assert doc["quality"]["flags"] == [FLAG] and doc["quality"]["gate"] == GATE
    assert doc["quality"]["flag_thresholds"] == {"ppl_ratio": 2.0, "kl": 1.0, "top1_agreement": 0.5}
    # without a measurement: no kl, the flags and the gate still in the summary
    bare = build_report(
        model={"source": "m"},
        budget={},
        selection=select_layers(s, 2),
        similarity=s,
        timings={},
        status="pruned",
        flags=[FLAG],
    )
    _validate(bare)
    assert bare["quality"] is None
    assert bare["summary"]["kl"] is None and bare["summary"]["flags"] == ["KL high"]
    assert bare["summary"]["quality_gate"] is None
    # without a status: none of the guard's keys (a document that is no prune's)
    plain = _report(quality=QUALITY)
    assert "status" not in plain["summary"] and "flags" not in plain["quality"]
    with pytest.raises(InvalidInputError, match="status"):
        build_report(
            model={},
            budget={},
            selection=select_layers(s, 2),
            similarity=s,
            timings={},
            status="ok",
        )


def test_job_summary_from_a_hand_built_report() -> None:
    report = {
        "summary": {
            "method": "lorp-loss",
            "num_layers": 30,
            "removed": [4, 9, 21],
            "kept_layers": 27,
            "rls": 0.81,
            "num_clusters": 3,
            "speedups": {"prefill_a": 1.2, "prefill_b": 1.6, "decode_a": 1.1},
            "weights_saved_bytes": 2_000_000,
            "weights_saved_fraction": 0.08,
            "ppl_dense": 10.0,
            "ppl_pruned": 12.5,
            "ppl_ratio": 1.25,
            "status": "pruned",
            "kl": 0.3,
            "top1_agreement": 0.77,
            "flags": ["one", "two"],
            "quality_gate": None,
            "task_accuracy_dense": 0.5,
            "task_accuracy_pruned": 0.45,
            "task_retention": 0.9,
            "task_retention_by_task": {"piqa": 0.95, "boolq": 0.85},
            "quality_target": {"max_ppl_ratio": 1.5},
            "target_depth": 3,
            "target_confirmed": True,
        },
        "speed": [
            {"name": "prefill_a", "kind": "prefill", "speedup": 1.2},
            {"name": "prefill_b", "kind": "prefill", "speedup": 1.6},
            {"name": "prefill_c", "kind": "prefill", "speedup": None},
            {"name": "decode_a", "kind": "decode", "speedup": 1.1},
        ],
        "quality": {"gate": GATE},
        "model": {"offload": {"mode": "sequential", "reason": "offload 'sequential' requested"}},
        "extra": {
            "compensation": {
                "healing": {
                    "steps_run": 20,
                    "early_stop_step": 20,
                    "best_step": 10,
                    "held_out_kl_before": 0.4,
                    "held_out_kl_after": 0.3,
                    "seconds": 12.0,
                    "curve": [],
                }
            }
        },
    }
    assert job_summary(report) == {
        "method": "lorp-loss",
        "num_layers": 30,
        "kept_layers": 27,
        "removed_blocks": [4, 9, 21],
        "rls": 0.81,
        "num_clusters": 3,
        "speedups": {"prefill_a": 1.2, "prefill_b": 1.6, "decode_a": 1.1},
        "prefill_speedup": pytest.approx(1.4),
        "decode_speedup": 1.1,
        "memory_reduction": 0.08,
        "weights_saved_bytes": 2_000_000,
        "perplexity_before": 10.0,
        "perplexity_after": 12.5,
        "perplexity_ratio": 1.25,
        "offload": "sequential",
        "status": "pruned",
        "kl": 0.3,
        "top1_agreement": 0.77,
        "flags": ["one", "two"],
        "quality_gate": GATE,  # summary.quality_gate is None: quality.gate is read instead
        "task_accuracy_before": 0.5,
        "task_accuracy_after": 0.45,
        "task_retention": 0.9,
        "task_retention_by_task": {"piqa": 0.95, "boolq": 0.85},
        "quality_target": {"max_ppl_ratio": 1.5},
        "target_depth": 3,
        "target_confirmed": True,
        "healing": {
            "steps_run": 20,
            "early_stop_step": 20,
            "best_step": 10,
            "held_out_kl_before": 0.4,
            "held_out_kl_after": 0.3,
            "seconds": 12.0,
        },
    }
    assert job_summary({}) == {
        "method": None,
        "num_layers": None,
        "kept_layers": None,
        "removed_blocks": [],
        "rls": None,
        "num_clusters": None,
        "speedups": {},
        "prefill_speedup": None,
        "decode_speedup": None,
        "memory_reduction": None,
        "weights_saved_bytes": None,
        "perplexity_before": None,
        "perplexity_after": None,
        "perplexity_ratio": None,
        "offload": None,
        "status": None,
        "kl": None,
        "top1_agreement": None,
        "flags": [],
        "quality_gate": None,
        "task_accuracy_before": None,
        "task_accuracy_after": None,
        "task_retention": None,
        "task_retention_by_task": {},
        "quality_target": None,
        "target_depth": None,
        "target_confirmed": None,
        "healing": None,
    }


def test_report_package_keeps_its_public_names() -> None:
    import lorp
    import lorp.report as package
    from lorp.report import document, files, html, plots, prose

    assert lorp.build_report is build_report is document.build_report
    assert lorp.write_reports is write_reports is files.write_reports
    assert lorp.REPORT_SCHEMA_VERSION == REPORT_SCHEMA_VERSION
    assert package.explain is explain is prose.explain
    assert package.render_html is html.render_html and package.plot_heatmap is plots.plot_heatmap
    assert package.SCHEMA_PATH.is_file()
    for name in package.__all__:
        assert getattr(package, name) is not None


# ---- schema 2.0: intervals, reliability, engines, serving memory; migrating 1.0 reports

REPORT_1_0 = Path(__file__).with_name("report_1_0.json")  # written by lorp before schema 2.0


def _unreliable(bench: dict[str, Any]) -> dict[str, Any]:
    """``bench`` with its decode row marked unreliable and a compiled row that could not run."""
    bench = copy.deepcopy(bench)
    for w in bench["workloads"]:  # whatever this machine measured: reliable but the decode
        w["reliable"], w["unreliable_reasons"] = True, []
    decode = next(w for w in bench["workloads"] if w["kind"] == "decode")
    decode["reliable"] = False
    decode["unreliable_reasons"] = ["95% interval ±7.3% is wider than ±5%"]
    compiled = {
        **copy.deepcopy(decode),
        "name": decode["name"] + "_compiled",
        "mode": "compiled",
        "engine": "transformers + torch.compile (inductor default), static KV cache",
        "status": "unavailable",
        "unavailable_reason": "compiling failed: RuntimeError: no compiler",
        "original": None,
        "pruned": None,
        "speedup": None,
        "speedup_ci": None,
        "measured_over_ideal": None,
        "measured_over_ideal_ci": None,
        "reliable": None,
        "unreliable_reasons": [],
    }
    bench["workloads"].append(compiled)
    return bench


def test_report_2_0_speed_rows_carry_interval_engine_and_memory(bench_dict: dict[str, Any]) -> None:
    report = _report(bench_dict, QUALITY)
    _validate(report)
    for row in report["speed"]:
        assert row["engine"] == "transformers eager (dynamic KV cache)" and row["mode"] == "eager"
        assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
        assert row["pairs"] == 2 and isinstance(row["reliable"], bool)
        assert row["original_peak_memory_bytes"] is None or row["original_peak_memory_bytes"] > 0
    serving = report["memory"]["serving"]
    assert serving == bench_dict["serving_memory"]
    assert report["summary"]["serving_memory_saved_bytes"] == serving["saved_bytes"]


def test_unreliable_and_unavailable_rows_say_why_in_every_report(
    tmp_path: Path, bench_dict: dict[str, Any]
) -> None:
    from lorp.report.card import render_model_card

    report = _report(_unreliable(bench_dict), QUALITY)
    _validate(report)
    decode = next(w for w in report["speed"] if w["name"] == "decode_b1_p4_n3")
    assert decode["reliable"] is False
    assert report["summary"]["unreliable_speedups"] == ["decode_b1_p4_n3"]
    assert report["summary"]["speedups"]["decode_b1_p4_n3_compiled"] is None
    assert job_summary(report)["decode_speedup"] == decode["speedup"]  # eager rows only
    write_reports(report, _similarity(), tmp_path)
    card = render_model_card(report)
    for text in (
        (tmp_path / "report.html").read_text(),
        (tmp_path / "report.md").read_text(),
        card,
    ):
        assert "wider than ±5%" in text and "nreliable" in text
        assert "compiling failed: RuntimeError: no compiler" in text
        assert "torch.compile" in text and "transformers eager" in text
    html_text = (tmp_path / "report.html").read_text()
    serving = report["memory"]["serving"]
    assert serving["workload"] == "prefill_b1_t8"  # 8 cached tokens; the decode row holds 7
    assert "Serving memory (weights + KV cache at batch 1 × 8 tokens)" in html_text
    assert "95% CI" in html_text


def test_migrate_a_1_0_report_keeps_every_field() -> None:
    from lorp.report import migrate_report, render_html

    old = json.loads(REPORT_1_0.read_text())
    assert old["schema_version"] == "1.0"
    with pytest.raises(jsonschema.ValidationError):
        _validate(old)
    new = migrate_report(old)
    _validate(new)
    assert new["schema_version"] == REPORT_SCHEMA_VERSION and new["migrated_from"] == "1.0"

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict):
            for key, value in a.items():
                if path == "" and key == "schema_version":
                    continue
                assert key in b, f"{path}.{key} lost"
                walk(value, b[key], f"{path}.{key}")
        elif isinstance(a, list):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        else:
            assert a == b, path

    walk(old, new, "")
    for row in new["speed"]:
        assert row["mode"] == "eager" and row["reliable"] is None and row["speedup_low"] is None
    assert job_summary(new) == job_summary(old)
    assert "not assessed" in render_html(new, {})
    assert migrate_report(new) == new  # current: a copy
    with pytest.raises(InvalidInputError):
        migrate_report({**old, "schema_version": "0.3"})
