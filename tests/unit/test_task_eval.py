"""Downstream task accuracy wired through lorp (issue 23 item 1): ``lorp eval tasks``,
``PruneConfig(tasks=...)`` in the evaluation stage, the report (report.json against its schema,
the HTML/Markdown table, the job summary) and the quality gate's ``min_task_retention``. Task
data: tiny JSONL files in the shared data's schema (:mod:`tests.tiny_tasks`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from lorp.cli import main
from lorp.errors import InvalidInputError, QualityGateError
from lorp.gate import QualityGate
from lorp.pipeline import PruneConfig, prune, run_pipeline
from lorp.report import job_summary, load_schema
from lorp.tasks import HEADLINE, TaskScores, compare_scores, score_tasks
from tests.tiny_models import build_tiny, snapshot, tiny_input_ids, tiny_tokenizer
from tests.tiny_tasks import TASK_NAMES, write_tiny_tasks

SMALL: dict[str, Any] = {"windows": 4, "seq_len": 32, "holdout_windows": 2}
#: A task set covering every kind: acc_norm tasks, WinoGrande's partial scoring, BoolQ.
SOME = ("piqa", "winogrande", "boolq")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tasks(tmp_path_factory.mktemp("tasks"), items=12)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _validate(report: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(
        load_schema(), format_checker=jsonschema.FormatChecker()
    ).validate(report)


# -- lorp eval tasks ----------------------------------------------------------------------------


def test_eval_tasks_json(
    tiny_dir: Path, task_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys,
        "eval",
        "tasks",
        "--model",
        str(tiny_dir),
        "--tasks",
        "piqa,boolq",
        "--limit",
        "5",
        "--data-dir",
        str(task_dir),
        "--json",
        "--quiet",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["limit"] == 5 and data["data_dir"] == str(task_dir)
    assert list(data["tasks"]) == ["piqa", "boolq"]
    piqa = data["tasks"]["piqa"]
    assert piqa["n"] == 5 and piqa["metric"] == "acc_norm" and piqa["score"] == piqa["acc_norm"]
    assert 0 <= piqa["acc"] <= 1 and piqa["acc_stderr"] is not None
    assert "acc_norm" not in data["tasks"]["boolq"]  # lm-eval reports acc only for BoolQ
    assert data["average"] == pytest.approx((piqa["score"] + data["tasks"]["boolq"]["score"]) / 2)


def test_eval_tasks_retention_with_removed_layers(
    tiny_dir: Path, task_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "tasks", "--model", str(tiny_dir), "--data-dir", str(task_dir)]
    argv += ["--limit", "6", "--remove-layers", "2,3", "--quiet"]
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["removed"] == [2, 3] and list(data["tasks"]) == list(TASK_NAMES)
    for name, t in data["tasks"].items():
        assert t["n"] == 6 and t["metric"] == HEADLINE[name]
        d, p = t["dense"]["score"], t["pruned"]["score"]
        assert t["retention"] == (pytest.approx(p / d) if d > 0 else None)
        assert t["drop"] == pytest.approx(d - p)
    assert set(data["average"]) == {"dense", "pruned", "retention"}
    # the human form: one line per task and the average
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "retention" in out and "average" in out
    assert all(name in out for name in TASK_NAMES)


def test_eval_tasks_errors_are_one_line(
    tiny_dir: Path, task_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", "tasks", "--model", str(tiny_dir), "--quiet"]
    code, _, err = run(capsys, *base, "--tasks", "piqa,mmlu", "--data-dir", str(task_dir))
    assert code == 2 and "unknown task 'mmlu'" in err and "hellaswag" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, *base, "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "task data directory not found" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, *base, "--tasks", "piqa", "--data-dir", str(empty))
    assert code == 2 and "task data for piqa not found" in err
    code, _, err = run(capsys, *base, "--limit", "0", "--data-dir", str(task_dir))
    assert code == 2 and "--limit" in err


# -- the pipeline and the report ----------------------------------------------------------------


def test_prune_with_tasks_reports_them(
    tiny_dir: Path, text_file: Path, task_dir: Path, tmp_path: Path
) -> None:
    config = PruneConfig(num_remove=2, tasks=SOME, task_limit=8, task_data_dir=task_dir, **SMALL)
    out = tmp_path / "out"
    res = run_pipeline(tiny_dir, text_file, out, config, source_names={"tasks": "tiny tasks"})
    report = json.loads((out / "report.json").read_text())
    _validate(report)
    tasks = report["tasks"]
    assert tasks["data"] == "tiny tasks" and tasks["limit"] == 8
    assert tasks["removed"] == res.result.removed
    assert list(tasks["tasks"]) == list(SOME)
    for name in SOME:
        t = tasks["tasks"][name]
        assert t["n"] == 8 and t["dense"]["stderr"] is not None
    # the same numbers as scoring the dense model and the pruned checkpoint on their own
    assert res.result.tasks is not None
    assert tasks["average"]["dense"] == pytest.approx(res.result.tasks.dense.average)
    # the caller's name for the task data, not the local folder, in the config too
    assert report["extra"]["config"]["task_data_dir"] == "tiny tasks"
    assert report["extra"]["config"]["tasks"] == list(SOME)
    summary = report["summary"]
    assert summary["task_accuracy_dense"] == tasks["average"]["dense"]
    assert summary["task_retention"] == tasks["average"]["retention"]
    assert summary["task_retention_by_task"] == {n: tasks["tasks"][n]["retention"] for n in SOME}
    job = job_summary(report)
    assert job["task_accuracy_before"] == tasks["average"]["dense"]
    assert job["task_accuracy_after"] == tasks["average"]["pruned"]
    assert job["task_retention"] == tasks["average"]["retention"]
    assert job["task_retention_by_task"] == summary["task_retention_by_task"]
    for name in ("report.html", "report.md"):
        text = (out / name).read_text()
        assert "Downstream tasks" in text and "retention" in text
        assert all(n in text for n in SOME)
    assert "± " in (out / "report.md").read_text()


def test_pruned_scores_equal_the_pruned_checkpoints(
    tiny_dir: Path, text_file: Path, task_dir: Path, tmp_path: Path
) -> None:
    """The evaluation stage's pruned side (pruned_view) is the saved checkpoint's accuracy."""
    from lorp.loading import load_model

    config = PruneConfig(
        num_remove=2, tasks=("piqa",), task_limit=6, task_data_dir=task_dir, **SMALL
    )
    res = run_pipeline(tiny_dir, text_file, tmp_path / "o", config)
    loaded = load_model(str(tmp_path / "o" / "model"))
    alone = score_tasks(loaded.model, loaded.tokenizer, ["piqa"], data_dir=task_dir, limit=6)
    assert res.result.tasks is not None
    pruned = res.result.tasks.pruned.tasks["piqa"]
    assert pruned.correct == alone.tasks["piqa"].correct
    for a, b in zip(pruned.loglikelihoods, alone.tasks["piqa"].loglikelihoods, strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_no_tasks_no_task_section(tiny_dir: Path, text_file: Path, tmp_path: Path) -> None:
    res = run_pipeline(tiny_dir, text_file, tmp_path / "o", PruneConfig(num_remove=1, **SMALL))
    assert res.report["tasks"] is None
    assert res.report["summary"]["task_retention"] is None
    assert job_summary(res.report)["task_retention_by_task"] == {}
    _validate(res.report)


def test_config_validation(task_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="unknown task 'mmlu'"):
        PruneConfig(num_remove=1, tasks=("mmlu",))
    with pytest.raises(InvalidInputError, match="list of task names"):
        PruneConfig(num_remove=1, tasks="piqa")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="task_limit"):
        PruneConfig(num_remove=1, tasks=("piqa",), task_limit=0)
    with pytest.raises(InvalidInputError, match="min_task_retention needs tasks"):
        PruneConfig(num_remove=1, quality_gate={"min_task_retention": 0.9})
    config = PruneConfig(num_remove=1, tasks=["piqa", "all"])  # type: ignore[arg-type]
    # 'all' expands in the given order, without duplicates; a tuple
    assert config.tasks == ("piqa", *(t for t in TASK_NAMES if t != "piqa"))
    assert PruneConfig.from_dict(config.to_dict()) == config
    # tasks without a data directory, or a missing file, fail before any forward pass
    model = build_tiny("llama")
    calib = tiny_input_ids(4, 16)
    with pytest.raises(InvalidInputError, match="need task_data_dir"):
        prune(model, tiny_tokenizer(), calib, config)
    missing = PruneConfig(num_remove=1, tasks=("piqa",), task_data_dir=task_dir / "nope")
    with pytest.raises(InvalidInputError, match="task data not found"):
        prune(model, tiny_tokenizer(), calib, missing)


# -- the gate -----------------------------------------------------------------------------------


def _scores(values: dict[str, list[int]]) -> TaskScores:
    from lorp.tasks import TaskScore

    out = {}
    for name, correct in values.items():
        n = len(correct)
        p = sum(correct) / n
        se = math.sqrt(p * (1 - p) / (n - 1))
        out[name] = TaskScore(
            task=name,
            n=n,
            acc=p,
            acc_stderr=se,
            acc_norm=None,
            acc_norm_stderr=None,
            metric="acc",
            correct=tuple(correct),
            correct_norm=None,
            loglikelihoods=tuple((0.0, 0.0) for _ in correct),
        )
    return TaskScores(out, limit=None, seconds=0.0)


def test_gate_on_task_retention() -> None:
    dense = _scores({"boolq": [1, 1, 1, 1, 0], "winogrande": [1, 1, 0, 0, 0]})
    pruned = _scores({"boolq": [1, 1, 0, 0, 0], "winogrande": [1, 1, 0, 0, 0]})
    tasks = compare_scores(dense, pruned, [2])
    assert tasks.average_retention == pytest.approx((0.5 + 1.0) / 2)
    gate = QualityGate(min_task_retention=0.8)
    assert gate.active and not gate.needs_perplexity
    result = gate.check(None, tasks=tasks)  # no perplexity limit: no perplexity needed
    assert not result.passed
    (violation,) = result.violations
    assert "average task retention 0.750 < min 0.8" in violation
    assert "boolq, winogrande" in violation
    assert result.measured["task_retention"] == pytest.approx(0.75)
    assert QualityGate(min_task_retention=0.7).check(None, tasks=tasks).passed
    missing = gate.check(None)
    assert not missing.passed and "task accuracy was not measured" in missing.violations[0]
    zero = compare_scores(_scores({"boolq": [0, 0, 0]}), _scores({"boolq": [1, 0, 0]}))
    undefined = gate.check(None, tasks=zero)
    assert not undefined.passed and "undefined" in undefined.violations[0]
    with pytest.raises(InvalidInputError):
        QualityGate(min_task_retention=1.5)
    assert QualityGate.from_dict(gate.to_dict()) == gate


def test_gate_refuses_a_run_on_task_retention(
    tiny_dir: Path, text_file: Path, task_dir: Path, tmp_path: Path
) -> None:
    common: dict[str, Any] = {"num_remove": 2, "tasks": SOME, "task_data_dir": task_dir, **SMALL}
    measured = run_pipeline(tiny_dir, text_file, tmp_path / "a", PruneConfig(**common))
    assert measured.result.tasks is not None
    retention = measured.result.tasks.average_retention
    assert retention is not None
    # this (deterministic) prune of the random model loses WinoGrande items (0.8 retained);
    # a limit just above what it retains
    assert retention < 0.99
    limit = retention + 0.01
    config = PruneConfig(**common, quality_gate={"min_task_retention": limit})
    out = tmp_path / "b"
    with pytest.raises(QualityGateError, match="average task retention") as info:
        run_pipeline(tiny_dir, text_file, out, config)
    assert not (out / "model").exists()
    report = json.loads((out / "report.json").read_text())
    _validate(report)
    assert report["summary"]["status"] == "refused"
    assert report["tasks"]["average"]["retention"] == pytest.approx(retention)
    summary = info.value.summary
    assert summary is not None and summary["task_retention"] == pytest.approx(retention)
    assert summary["quality_gate"]["measured"]["task_retention"] == pytest.approx(retention)


def test_cli_prune_with_tasks_and_gate(
    tiny_dir: Path,
    text_file: Path,
    task_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["prune", "--model", str(tiny_dir), "--calibration", str(text_file), "--remove", "2"]
    base += ["--windows", "4", "--seq-len", "32", "--holdout-windows", "2", "--no-bench"]
    base += ["--quiet", "--task-data-dir", str(task_dir)]
    argv = [*base, "--tasks", "piqa,boolq", "--task-limit", "5"]
    code, out, err = run(capsys, *argv, "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "tasks: average accuracy" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert list(report["tasks"]["tasks"]) == ["piqa", "boolq"]
    assert report["tasks"]["limit"] == 5
    code, _, err = run(capsys, *base, "--min-task-retention", "0.9", "--out", str(tmp_path))
    assert code == 2 and "min_task_retention needs tasks" in err
    code, _, err = run(capsys, *base, "--tasks", "nope", "--out", str(tmp_path / "x"))
    assert code == 2 and "unknown task 'nope'" in err


# -- dtype ----------------------------------------------------------------------------------------


def test_bfloat16_tasks_path(task_dir: Path) -> None:
    """The evaluation stage's task path in bfloat16: finite log-likelihoods (log-softmax in
    float32), the model left as it was, scores close to the float32 model's."""
    model = build_tiny("llama", dtype=torch.bfloat16)
    before = snapshot(model)
    tok = tiny_tokenizer()
    config = PruneConfig(num_remove=2, tasks=SOME, task_limit=6, task_data_dir=task_dir, **SMALL)
    from lorp.pipeline import evaluate

    measured = evaluate(model, tok, [2, 3], config)
    assert measured.tasks is not None
    for side in (measured.tasks.dense, measured.tasks.pruned):
        for score in side.tasks.values():
            assert all(math.isfinite(v) for ll in score.loglikelihoods for v in ll)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    reference = build_tiny("llama")
    dense32 = score_tasks(reference, tok, SOME, data_dir=task_dir, limit=6)
    for name in SOME:
        lls16 = measured.tasks.dense.tasks[name].loglikelihoods
        lls32 = dense32.tasks[name].loglikelihoods
        for a, b in zip(lls16, lls32, strict=True):
            assert a == pytest.approx(b, rel=0.05, abs=0.5)
