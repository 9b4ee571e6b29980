"""Quality guard: always-on flags, the quality gate, and a refused run leaving no checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from lorp.cli import main
from lorp.errors import InvalidInputError, QualityGateError
from lorp.gate import FLAG_THRESHOLDS, QualityGate, quality_flags
from lorp.pipeline import PruneConfig, prune, run_pipeline
from lorp.quality import PerplexityResult, QualityComparison
from lorp.report import load_schema
from tests.tiny_models import TINY_TEXT, build_tiny, tiny_input_ids, tiny_tokenizer

TEXT = TINY_TEXT
SMALL = {"windows": 4, "seq_len": 32, "holdout_windows": 2}


def comparison(dense: float, pruned: float, kl: float, top1: float) -> QualityComparison:
    import math

    return QualityComparison(
        dense=PerplexityResult(ppl=dense, nll=math.log(dense), tokens=100),
        pruned=PerplexityResult(ppl=pruned, nll=math.log(pruned), tokens=100),
        kl=kl,
        top1_agreement=top1,
        tokens=100,
    )


def test_gate_validation_and_round_trip() -> None:
    gate = QualityGate(max_ppl_ratio=1.5, min_top1_agreement=0.8)
    assert gate.active and gate.limits() == {"max_ppl_ratio": 1.5, "min_top1_agreement": 0.8}
    assert QualityGate.from_dict(gate.to_dict()) == gate
    assert not QualityGate().active
    for bad in (
        {"max_ppl_ratio": 0.5},
        {"max_ppl_ratio": float("nan")},
        {"max_kl": -0.1},
        {"min_top1_agreement": 1.5},
        {"min_top1_agreement": True},
        {"max_kl": "1"},
    ):
        with pytest.raises(InvalidInputError):
            QualityGate(**bad)
    with pytest.raises(InvalidInputError, match="unknown"):
        QualityGate.from_dict({"max_ppl": 2})
    config = PruneConfig(num_remove=2, quality_gate={"max_kl": 0.5})
    assert config.quality_gate == QualityGate(max_kl=0.5)
    again = PruneConfig.from_dict(config.to_dict())
    assert again == config
    assert json.loads(json.dumps(config.to_dict()))["quality_gate"]["max_kl"] == 0.5


def test_gate_check_reports_numbers() -> None:
    q = comparison(20.0, 50.0, 0.9, 0.55)
    result = QualityGate(max_ppl_ratio=2.0, max_kl=1.0, min_top1_agreement=0.6).check(q, "x")
    assert not result.passed and len(result.violations) == 2
    assert "perplexity ratio 2.500 > max 2" in result.message
    assert "dense 20.000, pruned 50.000" in result.message
    assert "top-1 agreement 0.5500 < min 0.6" in result.message
    assert result.measured["kl"] == 0.9
    assert QualityGate(max_ppl_ratio=3.0).check(q).passed
    assert not QualityGate(max_kl=1.0).check(None).passed


def test_flags_thresholds() -> None:
    assert FLAG_THRESHOLDS == {"ppl_ratio": 2.0, "kl": 1.0, "top1_agreement": 0.5}
    assert quality_flags(comparison(20.0, 30.0, 0.5, 0.7)) == []
    codes = [f["code"] for f in quality_flags(comparison(20.0, 41.0, 1.2, 0.4))]
    assert codes == ["perplexity_ratio_high", "kl_high", "top1_agreement_low"]
    flag = quality_flags(comparison(20.0, 41.0, 0.2, 0.9))[0]
    assert flag["value"] == pytest.approx(2.05) and flag["threshold"] == 2.0
    assert [f["code"] for f in quality_flags(None)] == ["quality_not_measured"]


def test_refused_run_leaves_no_checkpoint_and_explains(tiny_dir: Path, text_file: Path) -> None:
    out = tiny_dir.parent / "refused"
    config = PruneConfig(num_remove=3, quality_gate=QualityGate(max_kl=0.0), **SMALL)
    with pytest.raises(QualityGateError) as info:
        run_pipeline(tiny_dir, text_file, out, config)
    message = str(info.value)
    assert info.value.code == "quality_gate"
    assert re.search(r"mean KL \d+\.\d{4} nats > max 0", message), message
    assert "held-out calibration windows, 2 x 32 tokens" in message
    assert not (out / "model").exists()
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    assert report["summary"]["status"] == "refused"
    gate = report["quality"]["gate"]
    assert gate["passed"] is False and gate["limits"] == {"max_kl": 0.0}
    assert gate["measured"]["kl"] == pytest.approx(report["quality"]["kl"])
    assert report["summary"]["quality_gate"] == gate
    assert report["model"]["num_layers_after"] == 3
    assert "REFUSED" in (out / "report.md").read_text()


def test_passing_gate_and_flags_in_report(tiny_dir: Path, text_file: Path) -> None:
    out = tiny_dir.parent / "passed"
    gate = QualityGate(max_ppl_ratio=1e6, max_kl=100.0, min_top1_agreement=0.0)
    res = run_pipeline(
        tiny_dir, text_file, out, PruneConfig(num_remove=4, quality_gate=gate, **SMALL)
    )
    assert (out / "model" / "config.json").is_file()
    assert res.result.gate is not None and res.result.gate.passed
    report = res.report
    jsonschema.validate(report, load_schema())
    q = res.result.quality
    assert q is not None
    qual = report["quality"]
    assert qual["kind"] == "held-out calibration windows" and qual["windows"] == 2
    assert qual["dense"]["ppl"] == pytest.approx(q.dense.ppl)
    assert qual["kl"] == pytest.approx(q.kl) and qual["top1_agreement"] == q.top1_agreement
    assert report["summary"]["kl"] == pytest.approx(q.kl)
    assert report["summary"]["top1_agreement"] == q.top1_agreement
    assert report["summary"]["quality_gate"]["passed"] is True
    expected = quality_flags(q)
    assert [f["code"] for f in qual["flags"]] == [f["code"] for f in expected]
    assert report["summary"]["flags"] == [f["message"] for f in expected]
    # 4 of 6 blocks of a random model: far worse than the dense one, so it is flagged
    assert expected and res.result.flags == expected
    md = (out / "report.md").read_text()
    assert "Warning:" in md and "top-1" in md


def test_prune_in_memory_refusal_keeps_the_model_whole() -> None:
    model = build_tiny("llama")
    calib = tiny_input_ids(batch=3, length=16, seed=2)
    evalw = tiny_input_ids(batch=2, length=16, seed=4)
    config = PruneConfig(num_remove=2, quality_gate=QualityGate(min_top1_agreement=1.0))
    with pytest.raises(QualityGateError, match=r"top-1 agreement 0\.\d{4} < min 1"):
        prune(model, tiny_tokenizer(), calib, config, evaluation=evalw)
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    # a gate with nothing to measure is refused before any forward pass (the preflight)
    with pytest.raises(InvalidInputError, match="could not be measured"):
        prune(model, tiny_tokenizer(), calib, config)
    assert len(model.model.layers) == 6


def test_cli_gate_flags(
    tiny_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--max-ppl-ratio", "--max-kl", "--min-top1", "--holdout-windows", "auto"):
        assert flag in help_text
    out = tmp_path / "o"
    argv = [
        "prune", "--model", str(tiny_dir), "--calibration", str(text_file), "--remove", "3",
        "--windows", "4", "--seq-len", "32", "--holdout-windows", "2", "--no-bench",
        "--out", str(out), "--quiet", "--max-ppl-ratio", "1.0", "--min-top1", "1",
    ]  # fmt: skip
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "quality gate failed" in lines[0]
    assert re.search(r"top-1 agreement 0\.\d{4} < min 1", lines[0])
    assert "no checkpoint written" in lines[0]
    assert not (out / "model").exists() and (out / "report.json").is_file()
    with pytest.raises(SystemExit) as exc:
        main([*argv[:-4], "--max-kl", "-1"])
    assert exc.value.code == 2 and "max-kl" in capsys.readouterr().err
