"""Logit temperature (lorp.temperature): the fitted scale against an independent NLL on the
model's own logits, the fold against the model's own logits on every family, exact restores, the
pipeline end to end (checkpoint round trip) and the refusals."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorp import InvalidInputError, PruneConfig, UnsupportedModelError, prune, save_pruned
from lorp.compensation import compensated_view
from lorp.quality import perplexity
from lorp.surgery import pruned_view
from lorp.temperature import apply_temperature, fit_temperature, temperature_view
from tests.tiny_models import (
    DEPTH,
    FAMILIES,
    VOCAB,
    build_tiny,
    snapshot,
    tiny_input_ids,
    tiny_tokenizer,
)

REFUSED = ("gemma2",)  # soft-caps its logits
FOLDABLE = tuple(f for f in FAMILIES if f not in REFUSED)


def _windows(n: int = 6, t: int = 24, seed: int = 1) -> torch.Tensor:
    return tiny_input_ids(n, t, seed)


@torch.no_grad()
def _nll(model: Any, windows: torch.Tensor, stride: int, scale: float) -> float:
    """Mean NLL of softmax(scale * logits) at every ``stride``-th prediction, from the model's
    own full logits."""
    logits = model(windows).logits.double()[:, :-1][:, ::stride]
    targets = windows[:, 1:][:, ::stride]
    logp = torch.log_softmax(scale * logits, dim=-1)
    return float(-logp.gather(2, targets[..., None]).mean())


@torch.no_grad()
def _sampled(model: Any, n: int = 6, t: int = 24) -> torch.Tensor:
    """Text the dense model wrote itself (sampled at temperature 1): the pruned model's best scale
    on it is finite and inside the search range (on uniform random tokens a random model's best
    scale is ~0)."""
    torch.manual_seed(0)
    start = torch.randint(3, VOCAB, (n, 1))
    ids = start
    for _ in range(t - 1):
        probs = torch.softmax(model(ids).logits[:, -1].double(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_fitted_scale_minimises_the_models_own_nll(family: str) -> None:
    model = build_tiny(family)
    windows = _sampled(model)
    with pruned_view(model, [2, 3]):
        fitted = fit_temperature(model, windows, stride=3, batch_size=4)
        assert fitted.predictions == 6 * len(range(0, 23, 3))
        assert fitted.nll_before == pytest.approx(_nll(model, windows, 3, 1.0), rel=1e-5)
        at = _nll(model, windows, 3, fitted.scale)
        assert fitted.nll_after == pytest.approx(at, rel=1e-5)
        assert fitted.scale != pytest.approx(1.0, abs=1e-3)  # a random model is mis-calibrated
        assert fitted.nll_after < fitted.nll_before
        # a minimum: both neighbours are worse
        for other in (fitted.scale * 0.99, fitted.scale * 1.01):
            assert _nll(model, windows, 3, other) > at


@pytest.mark.parametrize("family", FOLDABLE)
def test_fold_scales_the_logits_and_restores_exactly(family: str) -> None:
    model = build_tiny(family)
    ids = _windows(2, 16)
    before = snapshot(model)
    with torch.no_grad():
        plain = model(ids).logits
        with temperature_view(model, 0.7):
            folded = model(ids).logits
    torch.testing.assert_close(folded, 0.7 * plain, rtol=1e-4, atol=1e-5)
    assert all(v.equal(before[k]) for k, v in snapshot(model).items())


@pytest.mark.parametrize("family", REFUSED)
def test_soft_capped_logits_are_refused_before_calibration(family: str) -> None:
    model = build_tiny(family)
    before = snapshot(model)
    seen: list[str] = []
    config = PruneConfig(method="lorp", num_remove=1, windows=4, seq_len=16, temperature=True)
    with pytest.raises(UnsupportedModelError, match="soft-caps"):
        prune(
            model, tiny_tokenizer(), _windows(4, 16), config, progress=lambda s, *_: seen.append(s)
        )
    assert seen == []
    assert all(v.equal(before[k]) for k, v in snapshot(model).items())
    with pytest.raises(UnsupportedModelError):
        apply_temperature(model, 0.9)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_is_refused(scale: float) -> None:
    with pytest.raises(InvalidInputError, match="scale"):
        apply_temperature(build_tiny("llama"), scale)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": "yes"}, "temperature"), ({"temperature_windows": 0}, "temperature_windows")],
)
def test_bad_config_is_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        PruneConfig(num_remove=1, **kwargs)


@pytest.mark.parametrize(("family", "compensate"), [("gpt2", False), ("qwen2", True)])
def test_prune_with_temperature_checkpoint_round_trip(
    tmp_path: Path, family: str, compensate: bool
) -> None:
    """The scale is fitted on the pruned (and compensated) model, the quality prune() reports
    includes it, and the saved checkpoint reproduces that quality."""
    tok = tiny_tokenizer()
    calib, evaluation = _windows(8, 32, seed=4), _windows(4, 32, seed=5)
    config = PruneConfig(
        method="streamline", num_remove=2, windows=8, seq_len=32, compensate=compensate,
        compensation_windows=4, temperature=True, temperature_windows=3,
    )  # fmt: skip
    seen: list[str] = []
    model = build_tiny(family)
    result = prune(
        model, tok, calib, config, evaluation=evaluation, progress=lambda s, *_: seen.append(s)
    )
    assert "temperature" in seen
    comp = result.compensation
    assert comp is not None and comp.temperature is not None
    assert bool(comp.maps) == compensate
    assert comp.temperature.predictions == 3 * len(range(0, 31, 4))
    # fitted on the last 3 calibration windows of the pruned (compensated) model
    reference = build_tiny(family)
    maps_only = replace(comp, temperature=None) if compensate else None
    with compensated_view(reference, maps_only), pruned_view(reference, result.removed):
        again = fit_temperature(reference, calib[-3:])
    assert again.scale == pytest.approx(comp.temperature.scale, rel=1e-4)
    assert result.quality is not None
    save_pruned(model, tok, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == DEPTH - 2
    assert perplexity(reloaded, evaluation).ppl == pytest.approx(
        result.quality.pruned.ppl, rel=1e-5
    )
    # and the scale changed the result
    plain_config = PruneConfig(
        method="streamline", num_remove=2, windows=8, seq_len=32, compensate=compensate,
        compensation_windows=4,
    )  # fmt: skip
    plain = prune(build_tiny(family), tok, calib, plain_config, evaluation=evaluation)
    assert plain.removed == result.removed
    assert plain.quality is not None
    assert plain.quality.pruned.ppl != pytest.approx(result.quality.pruned.ppl, rel=1e-4)


def test_logits_kept_stay_under_the_memory_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """With more windows than the logit budget holds, fewer predictions per window are used."""
    import lorp.temperature as temperature

    model = build_tiny("llama")
    windows = _windows(4, 33)
    assert fit_temperature(model, windows, stride=1).predictions == 4 * 32
    monkeypatch.setattr(temperature, "LOGIT_BYTES", 4 * VOCAB * 4 * 8)  # 8 predictions a window
    assert fit_temperature(model, windows, stride=1).predictions == 4 * 8
    state = torch.get_rng_state()
    with temperature_view(model, 0.8):
        pass
    assert torch.equal(torch.get_rng_state(), state)  # the fold's probe left the RNG alone
