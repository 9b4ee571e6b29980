"""Linear compensation of removed runs (lorp.compensation): the fit against an independent
least-squares solve, the fold against the pruned model's own hidden states, exact restores,
the pipeline end to end (checkpoint round trip) and the refusals."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorp import InvalidInputError, PruneConfig, UnsupportedModelError, prune, save_pruned
from lorp.compensation import (
    DEFAULT_STRENGTHS,
    TUNE_STRIDE,
    _vertex,
    apply_compensation,
    compensated_view,
    fit_compensation,
    tune_strength,
)
from lorp.errors import QualityGateError
from lorp.gate import QualityGate
from lorp.quality import perplexity
from lorp.surgery import remove_blocks
from tests.tiny_models import DEPTH, FAMILIES, VOCAB, build_tiny, snapshot, tiny_tokenizer

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")
REFUSED = tuple(f for f in FAMILIES if f not in SUPPORTED)


def _windows(n: int = 6, t: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


@torch.no_grad()
def _dense_terms(model: Any, windows: torch.Tensor, run: list[int]) -> tuple[torch.Tensor, ...]:
    """Independently of the module: m (block i-1's down projection output), y (the residual it
    is added to) and the target (block j's output), from output_hidden_states + one hook."""
    before = run[0] - 1
    seen: list[torch.Tensor] = []
    handle = model.model.layers[before].mlp.down_proj.register_forward_hook(
        lambda _m, _a, out: seen.append(out)
    )
    try:
        hidden = model(windows, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    m = seen[0]
    y = hidden[before + 1] - m  # hidden[k] is the input of block k
    return m, y, hidden[run[-1] + 1]


@pytest.mark.parametrize("family", SUPPORTED)
def test_fit_equals_an_independent_ridge_least_squares(family: str) -> None:
    model = build_tiny(family)
    windows = _windows()
    ridge = 0.05
    comp = fit_compensation(model, [2, 3], windows, ridge=ridge, batch_size=4)
    m, y, target = _dense_terms(model, windows, [2, 3])
    x = m.reshape(-1, m.shape[-1]).double()
    r = (target - y).reshape(-1, m.shape[-1]).double()
    w = 1.0 / target.reshape(-1, m.shape[-1]).double().norm(dim=1, keepdim=True) ** 2
    d = x.shape[1]
    lam = ridge * float((w * x * x).sum(0).mean())
    eye = torch.eye(d, dtype=torch.float64)
    # weighted ridge towards I as one stacked least-squares problem:
    # [sqrt(w) x; sqrt(lam) I] T = [sqrt(w) r; sqrt(lam) I]
    expected = torch.linalg.lstsq(
        torch.cat([w.sqrt() * x, lam**0.5 * eye]), torch.cat([w.sqrt() * r, lam**0.5 * eye])
    ).solution
    assert sorted(comp.maps) == [1]
    torch.testing.assert_close(comp.maps[1], expected, rtol=1e-5, atol=1e-6)
    run = comp.runs[0]
    plain = float((w * (r - x) ** 2).sum())
    fitted = float((w * (r - x @ expected) ** 2).sum())
    assert run["run"] == [2, 3] and run["block"] == 1
    assert run["relative_residual"] == pytest.approx(fitted / plain, rel=1e-5)
    assert run["relative_residual"] < 1.0  # the ridge optimum beats T = I (plain removal)
    assert comp.tokens == x.shape[0]


@pytest.mark.parametrize("family", SUPPORTED)
def test_folded_block_writes_y_plus_m_times_t(family: str) -> None:
    """After fold + removal, what enters the block after the run is exactly y + m T."""
    model = build_tiny(family)
    windows = _windows(seed=2)
    comp = fit_compensation(model, [2, 3], windows)
    m, y, _ = _dense_terms(model, windows, [2, 3])
    expected = y + (m.double() @ comp.maps[1]).float()
    apply_compensation(model, comp)
    remove_blocks(model, [2, 3])
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[2], expected, rtol=1e-4, atol=1e-4)


def test_two_runs_fitted_from_one_dense_pass_and_views_restore_exactly() -> None:
    model = build_tiny("llama")
    before = snapshot(model)
    windows = _windows(seed=3)
    comp = fit_compensation(model, [1, 4], windows)
    assert sorted(comp.maps) == [0, 3]
    assert [r["run"] for r in comp.runs] == [[1], [4]]
    assert all(a.equal(before[k]) for k, a in snapshot(model).items())  # fitting changes nothing
    with compensated_view(model, comp):
        changed = snapshot(model)
    assert not changed["model.layers.0.mlp.down_proj.weight"].equal(
        before["model.layers.0.mlp.down_proj.weight"]
    )
    assert all(a.equal(before[k]) for k, a in snapshot(model).items())
    restore = apply_compensation(model, comp)
    restore()
    assert all(a.equal(before[k]) for k, a in snapshot(model).items())


def test_run_at_block_zero_is_recorded_and_left_alone() -> None:
    model = build_tiny("llama")
    comp = fit_compensation(model, [0, 1, 3], _windows())
    assert sorted(comp.maps) == [2]
    assert {"run": [0, 1], "block": None, "skipped": "no block before block 0"} in comp.runs


@pytest.mark.parametrize("family", REFUSED)
def test_blocks_without_a_foldable_down_projection_are_refused(family: str) -> None:
    model = build_tiny(family)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match=r"down projection|down_proj"):
        fit_compensation(model, [2, 3], _windows())
    config = PruneConfig(method="lorp", num_remove=2, compensate=True, windows=2, seq_len=16)
    stages: list[str] = []
    with pytest.raises(UnsupportedModelError):
        prune(model, tiny_tokenizer(), _windows(), config, progress=lambda s, *_: stages.append(s))
    assert stages == []  # refused before the calibration started
    assert all(a.equal(before[k]) for k, a in snapshot(model).items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ridge": 0.0}, "ridge"),
        ({"ridge": float("inf")}, "ridge"),
        ({"ridge": True}, "ridge"),
    ],
)
def test_bad_ridge_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        fit_compensation(build_tiny("llama"), [2], _windows(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compensate": "yes"}, "compensate"),
        ({"compensation_windows": 0}, "compensation_windows"),
        ({"compensation_tune_windows": -1}, "compensation_tune_windows"),
        ({"compensation_tune_windows": True}, "compensation_tune_windows"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        PruneConfig(num_remove=1, **kwargs)


def test_prune_compensated_checkpoint_round_trip(tmp_path: Path) -> None:
    """The quality prune() reports is the saved checkpoint's: reload it and measure again."""
    model = build_tiny("qwen2")
    tok = tiny_tokenizer()
    calib, evaluation = _windows(8, 32, seed=4), _windows(4, 32, seed=5)
    config = PruneConfig(
        method="streamline", num_remove=2, windows=8, seq_len=32, compensate=True,
        compensation_windows=6, compensation_tune_windows=0,  # the maps as fitted
    )  # fmt: skip
    seen: list[str] = []
    result = prune(
        model, tok, calib, config, evaluation=evaluation, progress=lambda s, *_: seen.append(s)
    )
    assert "compensation" in seen and result.compensation is not None
    assert result.compensation.tokens == 6 * 32
    assert result.quality is not None
    save_pruned(model, tok, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == DEPTH - 2
    again = perplexity(reloaded, evaluation)
    assert again.ppl == pytest.approx(result.quality.pruned.ppl, rel=1e-5)
    # and it differs from the uncompensated pruned model's
    plain_config = PruneConfig(method="streamline", num_remove=2, windows=8, seq_len=32)
    plain = prune(build_tiny("qwen2"), tok, calib, plain_config, evaluation=evaluation)
    assert plain.removed == result.removed
    assert plain.quality is not None and plain.quality.pruned.ppl != pytest.approx(again.ppl)


def test_quality_gate_refusal_leaves_the_weights_untouched() -> None:
    model = build_tiny("llama")
    before = snapshot(model)
    config = PruneConfig(
        method="lorp", num_remove=2, windows=4, seq_len=32, compensate=True,
        quality_gate=QualityGate(min_top1_agreement=1.0),
    )  # fmt: skip
    with pytest.raises(QualityGateError):
        prune(model, tiny_tokenizer(), _windows(4, 32), config, evaluation=_windows(2, 32, seed=9))
    assert all(a.equal(before[k]) for k, a in snapshot(model).items())


def test_window_scorer_measures_a_compensated_set_from_a_valid_prefix() -> None:
    """With the dense prefix stored at the compensated block and after it, ``changed`` makes the
    pass start at the compensated block: the same NLL as the pruned, folded model run whole."""
    from lorp.scoring import WindowScorer

    model = build_tiny("llama")
    windows, calib = _windows(4, 24, seed=6), _windows(6, 24, seed=7)
    comp = fit_compensation(model, [3, 4], calib)
    scorer = WindowScorer(model, windows, reference=True, keep_distribution=False)
    scorer.prefetch([[2], [3]])  # dense inputs of block 2 (compensated) and 3 (first removed)
    with compensated_view(model, comp):
        right = scorer.score([3, 4], changed=2)
    assert right.start_block == 2
    wrong = WindowScorer(model, windows, reference=True, keep_distribution=False)
    wrong.prefetch([[3]])
    with compensated_view(model, comp):
        stale = wrong.score([3, 4])  # resumes from block 3's *dense* input: the fold is lost
    folded = build_tiny("llama")
    apply_compensation(folded, comp)
    remove_blocks(folded, [3, 4])
    whole = perplexity(folded, windows)
    assert right.nll == pytest.approx(whole.nll, rel=1e-6)
    assert stale.start_block == 3 and stale.nll != pytest.approx(whole.nll, rel=1e-4)


def test_strength_folds_that_share_of_the_correction() -> None:
    """Strength s folds I + s (T - I): what enters the block after the run is y + m + s m (T - I);
    strength 0 leaves the weights as they are."""
    model = build_tiny("llama")
    before = snapshot(model)
    windows = _windows(seed=2)
    comp = fit_compensation(model, [2, 3], windows)
    m, y, _ = _dense_terms(model, windows, [2, 3])
    eye = torch.eye(comp.maps[1].shape[0], dtype=torch.float64)
    with compensated_view(model, replace(comp, strength=0.0)):
        assert all(a.equal(before[k]) for k, a in snapshot(model).items())
    half = replace(comp, strength=0.5)
    assert half.to_dict()["strength"] == 0.5
    apply_compensation(model, half)
    remove_blocks(model, [2, 3])
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
    expected = y + (m.double() @ (eye + 0.5 * (comp.maps[1] - eye))).float()
    torch.testing.assert_close(hidden[2], expected, rtol=1e-4, atol=1e-4)


def test_vertex_is_the_parabola_minimum_between_the_best_neighbours() -> None:
    def f(x: float) -> float:
        return (x - 0.3) ** 2 + 1.0

    assert _vertex([(0.0, f(0.0)), (0.5, f(0.5)), (1.0, f(1.0))]) == pytest.approx(0.3)
    assert _vertex([(0.0, 1.0), (0.5, 2.0), (1.0, 3.0)]) is None  # best at an end
    assert _vertex([(0.0, 2.0), (0.5, 1.0), (1.0, 2.0)]) is None  # vertex already measured


def test_tune_strength_measures_every_strength_and_applies_its_rule() -> None:
    """Every measured strength's NLL is the pruned model's with that share of the maps folded
    (an independent fold + removal + per-prediction NLL); "min" keeps the lowest, "one-se"
    the smallest strength within one paired standard error of the lowest (computed here from
    the independent per-prediction NLLs); the model is left as it was."""
    model = build_tiny("llama")
    before = snapshot(model)
    tune = _windows(3, 24, seed=8)
    comp = fit_compensation(model, [2, 3, 5], _windows(seed=4))
    tuned = tune_strength(model, comp, tune)
    lowest = tune_strength(model, comp, tune, rule="min")
    assert all(a.equal(before[k]) for k, a in snapshot(model).items())
    assert tuned.maps is comp.maps and tuned.tuning is not None and lowest.tuning is not None
    assert tuned.tuning["rule"] == "one-se" and lowest.tuning["rule"] == "min"
    measured = {row["strength"]: row["nll"] for row in tuned.tuning["measured"]}
    assert measured == {row["strength"]: row["nll"] for row in lowest.tuning["measured"]}
    assert {0.0, 0.5, 1.0} <= set(measured) and len(measured) <= 4
    assert tuned.tuning["windows"] == 3 and tuned.tuning["seq_len"] == 24
    positions = torch.arange(0, 23, TUNE_STRIDE)  # every 4th of the 23 predictions per window
    assert tuned.tuning["predictions"] == 3 * positions.numel()
    per: dict[float, torch.Tensor] = {}
    for strength, nll in measured.items():
        folded = build_tiny("llama")
        apply_compensation(folded, replace(comp, strength=strength))
        remove_blocks(folded, [2, 3, 5])
        with torch.no_grad():
            logp = torch.log_softmax(folded(tune).logits[:, positions].float(), dim=-1)
        per[strength] = -logp.gather(-1, tune[:, positions + 1].unsqueeze(-1)).reshape(-1)
        assert float(per[strength].mean()) == pytest.approx(nll, rel=1e-6), strength
    best = min(measured, key=lambda s: measured[s])
    assert lowest.strength == best == tuned.tuning["lowest"]
    for row in tuned.tuning["measured"]:
        d = (per[row["strength"]] - per[best]).double()
        se = float(d.std()) / d.numel() ** 0.5
        assert row["se_vs_lowest"] == pytest.approx(se, rel=1e-4, abs=1e-9)
    within = [s for s in measured if measured[s] <= measured[best] + per_se(per, s, best)]
    assert tuned.strength == min(within) <= best
    alone = tune_strength(model, comp, tune, strengths=[1.0], refine=False)
    assert alone.strength == 1.0 and alone.tuning is not None
    assert [(r["strength"], r["nll"]) for r in alone.tuning["measured"]] == [(1.0, measured[1.0])]
    with pytest.raises(InvalidInputError, match="rule"):
        tune_strength(model, comp, tune, rule="median")


def per_se(per: dict[float, torch.Tensor], s: float, best: float) -> float:
    d = (per[s] - per[best]).double()
    return float(d.std()) / d.numel() ** 0.5


def test_one_se_rule_prefers_the_smaller_strength_within_the_noise() -> None:
    """1.0 lower than 0.5 by less than one paired standard error: "one-se" keeps 0.5, "min"
    1.0; by many standard errors: both keep 1.0; 0 (plain removal) far behind either way."""
    from lorp.compensation import choose_strength

    g = torch.Generator().manual_seed(0)
    plain = 3.5 + torch.randn(400, generator=g)
    half = plain - 0.3 + 0.05 * torch.randn(400, generator=g)
    wide, narrow = 0.5 * torch.randn(400, generator=g), 0.05 * torch.randn(400, generator=g)
    close = half - 0.002 + (wide - wide.mean())  # 0.002 lower, SE of the difference ~0.025
    far = half - 0.2 + (narrow - narrow.mean())  # 0.2 lower, SE ~0.0025
    assert float(close.mean()) < float(half.mean())
    chosen, best, se = choose_strength({0.0: plain, 0.5: half, 1.0: close}, "one-se")
    assert (chosen, best) == (0.5, 1.0) and se[1.0] == 0.0 and 0.01 < se[0.5] < 0.05
    assert choose_strength({0.0: plain, 0.5: half, 1.0: close}, "min")[0] == 1.0
    assert choose_strength({0.0: plain, 0.5: half, 1.0: far}, "one-se")[:2] == (1.0, 1.0)
    assert choose_strength({0.0: plain, 0.5: half}, "one-se")[0] == 0.5


@pytest.mark.parametrize("strengths", [[], [-0.1], [float("nan")], [True], [3.0], ["0.5"]])
def test_bad_strengths_are_refused(strengths: list[Any]) -> None:
    model = build_tiny("llama")
    comp = fit_compensation(model, [2], _windows())
    with pytest.raises(InvalidInputError, match="strengths"):
        tune_strength(model, comp, _windows(2, 16), strengths=strengths)


def test_prune_tunes_the_strength_on_the_windows_after_the_fit_windows() -> None:
    """compensate=True: the strength is chosen on calibration windows 6..7 (after the 6 fit
    windows) and the reported quality is the model at that strength; 0 tune windows: the maps
    as fitted."""
    tok = tiny_tokenizer()
    calib, evaluation = _windows(8, 32, seed=4), _windows(4, 32, seed=5)

    def run(tune_windows: int) -> Any:
        config = PruneConfig(
            method="streamline", num_remove=2, windows=8, seq_len=32, compensate=True,
            compensation_windows=6, compensation_tune_windows=tune_windows,
        )  # fmt: skip
        return prune(build_tiny("qwen2"), tok, calib, config, evaluation=evaluation)

    tuned, fixed = run(4), run(0)
    assert tuned.compensation is not None and fixed.compensation is not None
    assert tuned.compensation.tuning is not None and tuned.compensation.tuning["windows"] == 2
    assert fixed.compensation.tuning is None and fixed.compensation.strength == 1.0
    again = tune_strength(
        build_tiny("qwen2"), fixed.compensation, calib[6:], strengths=DEFAULT_STRENGTHS
    )
    assert again.strength == tuned.compensation.strength
    assert tuned.compensation.to_dict()["tuning"] == tuned.compensation.tuning
    model = build_tiny("qwen2")
    apply_compensation(model, tuned.compensation)
    remove_blocks(model, tuned.removed)
    assert tuned.quality is not None
    assert perplexity(model, evaluation).ppl == pytest.approx(tuned.quality.pruned.ppl, rel=1e-5)


def test_window_scorer_forget_measures_a_set_again() -> None:
    from lorp.scoring import WindowScorer

    model = build_tiny("llama")
    windows = _windows(2, 16, seed=3)
    scorer = WindowScorer(model, windows, reference=False)
    first = scorer.score([2, 3])
    comp = fit_compensation(model, [2, 3], _windows(seed=4))
    with compensated_view(model, comp):
        assert scorer.score([2, 3], changed=1).nll == first.nll  # cached: the fold is not seen
        scorer.forget([2, 3])
        assert not scorer.cached([2, 3])
        refolded = scorer.score([2, 3], changed=1)
    assert refolded.nll != pytest.approx(first.nll, rel=1e-6)


def test_lorp_fold_is_lorp_loss_with_the_tuned_fold_and_the_temperature() -> None:
    """method="lorp-fold" turns on both corrections and chooses with lorp-loss: the same blocks,
    strength, logit scale and quality as lorp-loss + compensate + temperature; a model whose
    blocks cannot take the fold is refused before the calibration, naming lorp-loss."""
    tok = tiny_tokenizer()
    calib, evaluation = _windows(10, 32, seed=4), _windows(3, 32, seed=5)
    shared = dict(
        num_remove=2, windows=10, seq_len=32, score_windows=2, score_seq_len=32,
        compensation_windows=5, compensation_tune_windows=2, temperature_windows=3,
    )  # fmt: skip
    config = PruneConfig(method="lorp-fold", **shared)
    assert config.compensate and config.temperature and config.selection_method == "lorp-loss"
    scoring = _windows(2, 32, seed=6)
    fold = prune(build_tiny("qwen2"), tok, calib, config, evaluation=evaluation, scoring=scoring)
    explicit = prune(
        build_tiny("qwen2"),
        tok,
        calib,
        PruneConfig(method="lorp-loss", compensate=True, temperature=True, **shared),
        evaluation=evaluation,
        scoring=scoring,
    )
    assert fold.selection.method == "lorp-loss" and fold.removed == explicit.removed
    a, b = fold.compensation, explicit.compensation
    assert a is not None and b is not None and a.temperature and b.temperature
    assert a.strength == b.strength and a.temperature.scale == b.temperature.scale
    assert fold.quality is not None and explicit.quality is not None
    assert fold.quality.pruned.ppl == explicit.quality.pruned.ppl
    model = build_tiny("gemma3")
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="use 'lorp-loss'"):
        prune(model, tok, calib, config, evaluation=evaluation, scoring=scoring)
    assert all(a.equal(before[k]) for k, a in snapshot(model).items())
