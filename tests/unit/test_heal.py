"""Healing the folded maps (lorp.heal): only the folded matrices change, the training KL falls,
early stopping stops, steps 0 is lorp-fold, the refusals, the job spec and the CLI flag."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from jobcore.spec import JobCreate
from lorp import InvalidInputError, PruneConfig, UnsupportedModelError, prune
from lorp.cli import main
from lorp.compensation import Compensation, apply_compensation, fit_tuned_compensation
from lorp.heal import EVAL_EVERY, PATIENCE, heal_maps
from lorp.inputs import BlockInputs
from lorp.report import job_summary, make_report
from tests.tiny_models import DEPTH, VOCAB, build_tiny, snapshot, tiny_tokenizer

DTYPES = (torch.float32, torch.bfloat16)


def _windows(n: int = 10, t: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


def _fitted(dtype: torch.dtype) -> tuple[Any, torch.Tensor, Compensation]:
    model = build_tiny("llama", dtype=dtype)
    windows = _windows()
    comp = fit_tuned_compensation(model, [2, 3], windows, fit_windows=6, tune_windows=2)
    return model, windows, comp


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_only_the_folded_matrices_change(dtype: torch.dtype) -> None:
    """Healing leaves the model as it was (weights bit-identical, requires_grad restored);
    the healed fold changes the folded down projection alone, written in the model's dtype,
    differently from the fold before healing; the training KL falls."""
    model, windows, comp = _fitted(dtype)
    model.lm_head.weight.requires_grad_(True)  # a flag the heal must restore, not keep
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = snapshot(model)
    healed = heal_maps(model, comp, windows[:6], windows[6:8], steps=12, lr=1e-3)
    assert all(a.equal(before[k]) for k, a in snapshot(model).items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    info = healed.healing
    assert info is not None and info["frozen_verified"] and info["blocks"] == [1]
    assert info["train_kl_last"] < info["train_kl_first"]
    assert 1 <= info["steps_run"] <= 12 and info["seconds"] > 0
    assert info["held_out_kl_after"] <= info["held_out_kl_before"]

    def folded(c: Compensation) -> dict[str, torch.Tensor]:
        restore = apply_compensation(model, c)
        try:
            return snapshot(model)
        finally:
            restore()

    plain, trained = folded(comp), folded(replace(healed, strength=1.0))
    changed = {k for k, a in trained.items() if not a.equal(before[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    assert trained["model.layers.1.mlp.down_proj.weight"].dtype == dtype
    if healed.healing is not None and healed.healing["best_step"] > 0:
        assert not trained["model.layers.1.mlp.down_proj.weight"].equal(
            plain["model.layers.1.mlp.down_proj.weight"]
        )
        assert healed.strength == 1.0


def test_the_training_kl_decreases_and_the_held_out_loss_is_what_was_kept() -> None:
    """On training windows that are also the held-out ones (so the held-out loss falls), the
    heal runs every step, keeps the last measurement's maps and the held-out KL it reports is
    the healed compensation's own."""
    model, windows, comp = _fitted(torch.float32)
    steps = 2 * EVAL_EVERY
    healed = heal_maps(model, comp, windows[:4], windows[:4], steps=steps, lr=1e-3)
    info = healed.healing
    assert info is not None and info["steps_run"] == steps and info["early_stop_step"] is None
    assert info["best_step"] == steps
    assert info["held_out_kl_after"] < info["held_out_kl_before"]
    again = heal_maps(model, healed, windows[:4], windows[:4], steps=1, lr=1e-12)
    assert again.healing is not None
    assert again.healing["held_out_kl_before"] == pytest.approx(info["held_out_kl_after"], 1e-4)


def test_stored_block_inputs_give_the_same_heal() -> None:
    """With the dense block inputs kept (as the capture keeps them), every pass starts at the
    block before the run from its stored input: the same losses and maps as whole passes."""
    model, windows, comp = _fitted(torch.float32)
    inputs = BlockInputs(list(range(8)))
    inputs.start(windows, DEPTH)
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
    for block in range(DEPTH):
        inputs.add(block, 0, hidden[block])
    inputs.finish()
    whole = heal_maps(model, comp, windows[:6], windows[6:8], steps=5, lr=1e-3)
    stored = heal_maps(model, comp, windows[:6], windows[6:8], steps=5, lr=1e-3, inputs=inputs)
    a, b = whole.healing, stored.healing
    assert a is not None and b is not None
    assert b["stored_inputs"] is True and a["stored_inputs"] is False
    assert b["held_out_kl_before"] == pytest.approx(a["held_out_kl_before"], rel=1e-4)
    assert b["train_kl_first"] == pytest.approx(a["train_kl_first"], rel=1e-4)
    torch.testing.assert_close(stored.maps[1], whole.maps[1], rtol=1e-3, atol=1e-4)


def test_early_stopping_stops() -> None:
    """A learning rate so large every step makes the held-out loss worse: the heal stops after
    PATIENCE measurements and keeps the maps it started from."""
    model, windows, comp = _fitted(torch.float32)
    healed = heal_maps(model, comp, windows[:6], windows[6:8], steps=100, lr=0.5)
    info = healed.healing
    assert info is not None
    assert info["early_stop_step"] == PATIENCE * EVAL_EVERY == info["steps_run"]
    assert info["best_step"] == 0 and info["held_out_kl_after"] == info["held_out_kl_before"]
    assert healed.maps is comp.maps and healed.strength == comp.strength


def test_zero_steps_and_bad_options() -> None:
    model, windows, comp = _fitted(torch.float32)
    assert heal_maps(model, comp, windows[:6], windows[6:8], steps=0) is comp
    for kwargs, match in [
        ({"steps": -1}, "heal_steps"),
        ({"steps": True}, "heal_steps"),
        ({"steps": 2, "lr": 0.0}, "heal_lr"),
        ({"steps": 2, "lr": float("nan")}, "heal_lr"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            heal_maps(model, comp, windows[:6], windows[6:8], **kwargs)
    with pytest.raises(InvalidInputError, match="nothing to heal"):
        heal_maps(model, replace(comp, maps={}), windows[:6], windows[6:8], steps=2)


SHARED: dict[str, Any] = dict(
    num_remove=2, windows=10, seq_len=32, score_windows=2, score_seq_len=32,
    compensation_windows=5, compensation_tune_windows=2, temperature_windows=3,
)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_prune_heals_and_steps_zero_is_lorp_fold(dtype: torch.dtype) -> None:
    """lorp-fold with heal_steps: a healing stage, recorded in the report and the job summary,
    the checkpoint differs from lorp-fold's in the folded down projections (and the final norm's
    refitted temperature) only; heal_steps 0 is lorp-fold exactly."""
    tok = tiny_tokenizer()
    calib, evaluation, scoring = _windows(10, 32, 4), _windows(3, 32, 5), _windows(2, 32, 6)

    def run(**extra: Any) -> Any:
        config = PruneConfig(method="lorp-fold", **SHARED, **extra)
        model = build_tiny("qwen2", dtype=dtype)
        return config, prune(model, tok, calib, config, evaluation=evaluation, scoring=scoring)

    _, fold = run()
    _, zero = run(heal_steps=0)
    config, healed = run(heal_steps=6, heal_lr=1e-3)
    a, b = snapshot(fold.model), snapshot(zero.model)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert zero.compensation is not None and zero.compensation.healing is None
    assert healed.removed == fold.removed and "healing" in healed.timings
    comp = healed.compensation
    assert comp is not None and comp.healing is not None and comp.temperature is not None
    # every pass started mid-model, from the capture's stored inputs (unless at block 0)
    assert comp.healing["stored_inputs"] is (min(comp.maps) > 0)
    folded = {f"model.layers.{b - sum(r < b for r in fold.removed)}.mlp.down_proj.weight"
              for b in comp.maps}  # fmt: skip
    c = snapshot(healed.model)
    changed = {k for k in a if not a[k].equal(c[k])}
    assert changed <= folded | {"model.norm.weight"} and changed & folded
    assert all(t.dtype == dtype for t in c.values() if t.is_floating_point())
    report = make_report(healed, config, model_source="tiny")
    assert report["extra"]["compensation"]["healing"]["steps_run"] == comp.healing["steps_run"]
    summary = job_summary(report)["healing"]
    assert summary["held_out_kl_before"] == comp.healing["held_out_kl_before"]
    assert set(summary) == {
        "steps_run", "early_stop_step", "best_step", "held_out_kl_before",
        "held_out_kl_after", "seconds",
    }  # fmt: skip


def test_refusals_before_any_window() -> None:
    """Healing without folded maps is refused when the config is made; a model whose blocks
    cannot take the fold (Gemma) at preflight, before any forward pass."""
    with pytest.raises(InvalidInputError, match="folds none"):
        PruneConfig(method="lorp-loss", num_remove=2, heal_steps=5)
    with pytest.raises(InvalidInputError, match="compensation_tune_windows"):
        PruneConfig(method="lorp-fold", num_remove=2, heal_steps=5, compensation_tune_windows=0)
    with pytest.raises(InvalidInputError, match="windows"):
        PruneConfig(method="lorp-fold", num_remove=2, heal_steps=5, windows=12)
    with pytest.raises(InvalidInputError, match="heal_lr"):
        PruneConfig(method="lorp-fold", num_remove=2, heal_steps=5, heal_lr=-1.0)
    assert PruneConfig(method="lorp", compensate=True, num_remove=2, heal_steps=5).heal_steps == 5
    model = build_tiny("gemma3")
    calls: list[str] = []
    config = PruneConfig(method="lorp-fold", heal_steps=5, **SHARED)
    with pytest.raises(UnsupportedModelError):
        prune(model, tiny_tokenizer(), _windows(10, 32, 4), config, progress=calls.append)
    assert calls == []


def test_job_spec_round_trip() -> None:
    base = {"model": "s3://inputs/acme/models/tiny", "calibration": "corpus:wiki"}
    spec = JobCreate.model_validate(
        {**base, "method": "lorp-fold", "budget": {"blocks": 2}, "heal": {"steps": 40}}
    )
    config = spec.prune_config(PruneConfig)
    assert (config.heal_steps, config.heal_lr) == (40, PruneConfig.heal_lr)
    assert JobCreate.model_validate(json.loads(spec.fingerprint())) == spec
    off = JobCreate.model_validate({**base, "method": "lorp-fold", "budget": {"blocks": 2}})
    assert off.prune_config(PruneConfig).heal_steps == 0
    cost, plain = spec.estimated_tokens(), off.estimated_tokens()
    assert plain["healing"] == 0 and cost["healing"] > 3 * 40 * 512
    assert cost["total"] == plain["total"] + cost["healing"]
    for bad, match in [
        ({"method": "lorp"}, "folds none"),
        ({"method": "lorp-fold", "compensation_tune_windows": 0}, "tune windows"),
        ({"method": "lorp-fold", "heal": {"steps": 0}}, "greater than or equal"),
        ({"method": "lorp-fold", "heal": {"steps": 5, "lr": 0.0}}, "greater than"),
        ({"method": "lorp-fold", "heal": {"steps": 5, "rate": 1.0}}, "Extra inputs"),
    ]:
        with pytest.raises(ValueError, match=match):
            JobCreate.model_validate({**base, "budget": {"blocks": 2}, "heal": {"steps": 5}, **bad})


def test_cli_heal_flag(
    capsys: pytest.CaptureFixture[str], tiny_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    args = [
        "prune", "--model", str(tiny_dir), "--calibration", str(text_file), "--remove", "2",
        "--windows", "4", "--seq-len", "32", "--score-windows", "2", "--score-seq-len", "32",
        "--compensation-windows", "3", "--compensation-tune-windows", "1",
        "--temperature-windows", "2", "--no-bench", "--quiet", "--method", "lorp-fold",
    ]  # fmt: skip
    code = main([*args, "--heal-steps", "3", "--heal-lr", "0.001", "--out", str(tmp_path / "h")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "h" / "report.json").read_text())
    assert report["extra"]["config"]["heal_steps"] == 3
    assert report["extra"]["config"]["heal_lr"] == 0.001
    assert report["extra"]["compensation"]["healing"]["steps"] == 3
    assert "Healing the folded maps" in (tmp_path / "h" / "report.md").read_text()
    capsys.readouterr()
    code = main([*args, "--method", "lorp", "--heal-steps", "3", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and "folds none" in err and "Traceback" not in err


def test_healing_is_refused_with_sequential_onloading_before_any_window() -> None:
    from lorp.errors import UnsupportedModelError
    from lorp.offload import prepare
    from lorp.pipeline import PruneConfig, check_sequential
    from tests.tiny_models import build_tiny

    model = build_tiny("llama")
    prepare(model)
    config = PruneConfig(method="lorp-fold", num_remove=1, heal_steps=5)
    with pytest.raises(UnsupportedModelError, match="sequential onloading"):
        check_sequential(model, config)
