"""Linear compensation of removed runs (lorp.compensation): the fit against an independent
least-squares solve, the fold against the pruned model's own hidden states, exact restores,
the pipeline end to end (checkpoint round trip) and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorp import InvalidInputError, PruneConfig, UnsupportedModelError, prune, save_pruned
from lorp.compensation import apply_compensation, compensated_view, fit_compensation
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
    [({"compensate": "yes"}, "compensate"), ({"compensation_windows": 0}, "compensation_windows")],
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
        compensation_windows=6,
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
    from lorp.search import WindowScorer

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
