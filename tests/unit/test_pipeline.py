"""lorp.pipeline's public stages: composed by hand they are ``prune``; the stage timer; a refusal
carries its report and job summary (built in memory, never read back from disk)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

import lorp.pipeline
from lorp.data import prepends_bos, text_windows
from lorp.errors import InvalidInputError, QualityGateError, UnsupportedModelError
from lorp.gate import QualityGate
from lorp.pipeline import (
    Calibration,
    PruneConfig,
    PruneResult,
    StageTimer,
    calibrate,
    compensate,
    evaluate,
    fit_logit_scale,
    measure_speed,
    preflight,
    prune,
    remove,
    run_pipeline,
    select_blocks,
)
from lorp.report import job_summary, load_schema, make_report
from lorp.similarity import capture_similarity
from tests.tiny_models import DEPTH, build_tiny, snapshot, tiny_input_ids, tiny_tokenizer

DTYPES = ("float32", "bfloat16")
SMALL: dict[str, Any] = {
    "windows": 6,
    "seq_len": 32,
    "holdout_windows": 2,
    "score_windows": 2,
    "score_seq_len": 24,
    "compensation_windows": 3,
    "temperature_windows": 2,
}


def _model(dtype: str) -> torch.nn.Module:
    return build_tiny("llama").to(getattr(torch, dtype))


def _untimed(value: Any) -> Any:
    """``value`` without the wall-clock seconds in it (they differ between two runs)."""
    if isinstance(value, dict):
        return {
            k: _untimed(v)
            for k, v in value.items()
            if not (k == "seconds" or k.endswith("_s") or k == "elapsed")
        }
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _by_hand(
    model: torch.nn.Module,
    calibration: Path | torch.Tensor,
    config: PruneConfig,
    evaluation: Path | torch.Tensor | None,
    timer: StageTimer,
) -> dict[str, Any]:
    """:func:`prune`'s stages, called one by one as a benchmark would."""
    tok = tiny_tokenizer()
    preflight(model, config)
    calib = calibrate(model, tok, calibration, config, timer=timer)
    choice = select_blocks(model, tok, calib, config, timer=timer)
    windows, kept = calib.windows, calib.inputs
    comp = compensate(model, choice.removed, windows, config, inputs=kept, timer=timer)
    comp = fit_logit_scale(model, choice.removed, windows, config, comp, inputs=kept, timer=timer)
    measured = evaluate(
        model,
        tok,
        choice.removed,
        config,
        evaluation=evaluation,
        calibration=calib,
        scoring=choice.scoring,
        compensation=comp,
        timer=timer,
    )
    assert not measured.refused
    bench = measure_speed(model, choice.removed, config, timer=timer)
    remove(model, choice.removed, comp, timer=timer)
    return {
        "selection": choice.selection,
        "similarity": calib.similarity,
        "quality": measured.quality,
        "evaluation": measured.info,
        "flags": measured.flags,
        "gate": measured.gate,
        "scoring": None if choice.scoring is None else choice.scoring.info,
        "calibration": calib.info,
        "compensation": comp,
        "benchmark": bench,
    }


CASES = {
    "lorp": {"method": "lorp"},
    "lorp-loss+compensate": {"method": "lorp-loss", "compensate": True},
    "sleb+temperature+gate": {
        "method": "sleb",
        "temperature": True,
        "quality_gate": QualityGate(max_ppl_ratio=1e6),
    },
    "lorp-kl windows": {"method": "lorp-kl", "windows_given": True},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_stages_composed_by_hand_are_prune(case: str, dtype: str, tmp_path: Path) -> None:
    options = dict(CASES[case])
    windows_given = options.pop("windows_given", False)
    config = PruneConfig(num_remove=2, **SMALL, **options)
    text = tmp_path / "calib.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps.\n" for i in range(300)))
    calibration: Path | torch.Tensor = text
    evaluation: torch.Tensor | None = None
    if windows_given:
        calibration = tiny_input_ids(batch=6, length=32, seed=2)
        evaluation = tiny_input_ids(batch=2, length=32, seed=4)

    torch.manual_seed(0)
    model_a = _model(dtype)
    events_a: list[tuple[str, float, str]] = []
    torch.manual_seed(0)
    model_b = _model(dtype)
    events_b: list[tuple[str, float, str]] = []
    timer = StageTimer(lambda *e: events_b.append(e))
    try:
        result = prune(
            model_a,
            tiny_tokenizer(),
            calibration,
            config,
            evaluation=evaluation,
            progress=lambda *e: events_a.append(e),
        )
    except UnsupportedModelError as exc:  # then the stages refuse it the same way
        with pytest.raises(UnsupportedModelError, match=re.escape(str(exc))):
            _by_hand(model_b, calibration, config, evaluation, timer)
        assert events_a == events_b
        return
    staged = _by_hand(model_b, calibration, config, evaluation, timer)

    assert result.pruned and result.removed == staged["selection"].removed
    assert _untimed(result.selection.to_dict()) == _untimed(staged["selection"].to_dict())
    np.testing.assert_array_equal(result.similarity, staged["similarity"])
    assert result.quality == staged["quality"] and result.quality is not None
    assert result.evaluation == staged["evaluation"]
    assert result.flags == staged["flags"] and result.gate == staged["gate"]
    assert result.scoring == staged["scoring"]
    assert result.calibration == staged["calibration"]
    assert result.benchmark is None and staged["benchmark"] is None
    if result.compensation is None:
        assert staged["compensation"] is None
    else:
        assert _untimed(result.compensation.to_dict()) == _untimed(staged["compensation"].to_dict())
    assert sorted(result.timings) == sorted(timer.timings)
    assert [(s, f, m) for s, f, m in events_a if f in (0.0, 1.0)] == [
        (s, f, m) for s, f, m in events_b if f in (0.0, 1.0)
    ]
    state_a, state_b = snapshot(model_a), snapshot(model_b)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert len(model_a.model.layers) == DEPTH - 2
    assert all(p.dtype == getattr(torch, dtype) for p in model_a.parameters())


def test_stage_timer_times_and_forwards_progress() -> None:
    events: list[tuple[str, float, str]] = []
    timer = StageTimer(lambda *e: events.append(e))
    with timer.stage("selection", "choosing"):
        timer.progress("selection", 0.5, "half way")
    with timer.stage("selection", "again"):
        pass
    assert events == [
        ("selection", 0.0, "choosing"),
        ("selection", 0.5, "half way"),
        ("selection", 1.0, "selection done"),
        ("selection", 0.0, "again"),
        ("selection", 1.0, "selection done"),
    ]
    assert list(timer.timings) == ["selection"] and timer.timings["selection"] >= 0.0
    StageTimer().progress("x", 0.0, "no callback: nothing happens")
    with pytest.raises(InvalidInputError, match="not both"):
        prune(
            build_tiny("llama"),
            tiny_tokenizer(),
            tiny_input_ids(batch=3, length=16),
            PruneConfig(num_remove=1),
            progress=lambda *e: None,
            timer=timer,
        )


def test_preflight_fails_before_any_forward_pass() -> None:
    model = build_tiny("llama")
    assert preflight(model, PruneConfig(fraction=0.5)) == 3
    with pytest.raises(InvalidInputError):
        preflight(model, PruneConfig(num_remove=DEPTH))


def test_calibrate_is_the_capture_on_the_text_windows(text_file: Path) -> None:
    model = build_tiny("llama")
    tok = tiny_tokenizer()
    config = PruneConfig(num_remove=2, windows=3, seq_len=16)
    calib = calibrate(model, tok, text_file, config, source_name="s3://b/calib.txt")
    windows = text_windows(tok, text_file, 16, 3)
    assert torch.equal(calib.windows, windows)
    np.testing.assert_array_equal(calib.similarity, capture_similarity(model, windows))
    assert calib.info == {"windows": 3, "seq_len": 16, "tokens": 48, "source": "s3://b/calib.txt"}
    assert calib.text_tokens == 3 * (16 - prepends_bos(tok))
    assert Calibration(windows, calib.similarity, text=text_file).source == str(text_file)


def test_stages_that_are_off_do_nothing() -> None:
    model = build_tiny("llama")
    before = snapshot(model)
    config = PruneConfig(num_remove=2)
    calib = calibrate(model, tiny_tokenizer(), tiny_input_ids(batch=3, length=16), config)
    assert calib.text is None and calib.text_tokens == 0 and calib.inputs is None
    assert calib.info == {"windows": 3, "seq_len": 16, "tokens": 48}
    assert compensate(model, [2, 3], calib.windows, config) is None
    assert fit_logit_scale(model, [2, 3], calib.windows, config) is None
    assert measure_speed(model, [2, 3], config) is None
    measured = evaluate(model, tiny_tokenizer(), [2, 3], config, calibration=calib)
    assert measured.quality is None and measured.info is None and not measured.refused
    assert [f["code"] for f in measured.flags] == ["quality_not_measured"]
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_refusal_carries_the_refused_result(dtype: str) -> None:
    model = _model(dtype)
    before = snapshot(model)
    calib = tiny_input_ids(batch=3, length=16, seed=2)
    evalw = tiny_input_ids(batch=2, length=16, seed=4)
    config = PruneConfig(num_remove=2, quality_gate=QualityGate(min_top1_agreement=1.0))
    with pytest.raises(QualityGateError) as info:
        prune(model, tiny_tokenizer(), calib, config, evaluation=evalw)
    refused = info.value.result
    assert isinstance(refused, PruneResult) and not refused.pruned
    assert refused.gate is not None and not refused.gate.passed and refused.benchmark is None
    assert f"blocks {refused.removed} were not removed" in str(info.value)
    assert info.value.report is None and info.value.summary is None  # prune writes no report
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    report = make_report(refused, config, model_source="tiny", dtype=dtype)
    jsonschema.validate(report, load_schema())
    assert report["summary"]["status"] == "refused"
    assert report["model"]["num_layers_after"] == DEPTH - 2
    summary = job_summary(report)
    assert summary["status"] == "refused" and summary["removed_blocks"] == refused.removed
    assert summary["top1_agreement"] == pytest.approx(refused.quality.top1_agreement)


@pytest.mark.parametrize("dtype", DTYPES)
def test_run_pipeline_refusal_carries_the_summary(
    dtype: str, tiny_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    """The error carries the refusal report and its job summary; they are what report.json
    holds, so the worker need not read the file back."""
    out = tmp_path / "refused"
    config = PruneConfig(num_remove=3, quality_gate=QualityGate(max_kl=0.0), **SMALL)
    with pytest.raises(QualityGateError) as info:
        run_pipeline(tiny_dir, text_file, out, config, dtype=dtype, device="cpu")
    exc = info.value
    assert exc.report is not None and exc.summary is not None
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == exc.report
    assert job_summary(on_disk) == exc.summary
    refused = exc.result
    assert isinstance(refused, PruneResult) and refused.quality is not None
    assert exc.summary["status"] == "refused"
    assert exc.summary["removed_blocks"] == refused.removed and len(refused.removed) == 3
    assert exc.summary["kl"] == pytest.approx(refused.quality.kl)
    assert exc.summary["perplexity_before"] == pytest.approx(refused.quality.dense.ppl)
    assert exc.summary["quality_gate"]["passed"] is False
    assert exc.summary["quality_gate"]["limits"] == {"max_kl": 0.0}
    assert exc.report["model"]["dtype"] == dtype
    assert not (out / "model").exists()


def test_refusal_summary_does_not_need_the_disk(
    tiny_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing the reports fails (a full disk): nothing is on disk, the summary is still there."""

    def disk_full(*args: Any, **kwargs: Any) -> list[Path]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lorp.pipeline, "write_reports", disk_full)
    out = tmp_path / "full"
    config = PruneConfig(num_remove=3, quality_gate=QualityGate(max_kl=0.0), **SMALL)
    with pytest.raises(QualityGateError, match="mean KL") as info:
        run_pipeline(tiny_dir, text_file, out, config, device="cpu")
    assert not out.exists()
    summary = info.value.summary
    assert summary is not None and summary["status"] == "refused"
    assert summary["quality_gate"]["limits"] == {"max_kl": 0.0}
    assert summary["kl"] > 0.0 and summary["perplexity_before"] is not None
