"""bfloat16 end to end on CPU (issue 20): every fold (compensation maps, temperature) is computed
in float32 or wider and written once in the weights' dtype, every self-check's tolerance fits
the dtype, and the whole pipeline (lorp, auto, lorp-loss, lorp-fold, compensation, temperature,
evaluation, benchmark, save -> reload) runs in bf16 for the ten tiny families.

Tolerances against float32: the float32 references run the *same* bf16-rounded weights in
float32, so they differ from the bf16 runs only by activation rounding (8 significant bits,
2^-9 = 0.2% relative per rounding). Measured here (all ten families, these windows): the
perplexities differ by at most 0.51% (qwen2, pruned), the similarity matrices by at most
7e-4; the tests allow :data:`PPL_REL` = 2% and :data:`S_ABS` = 5e-3 (about one bf16 rounding
unit, 2^-8), four and seven times what was measured."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lorp import BenchmarkConfig, PruneConfig, UnsupportedModelError, prune, save_pruned
from lorp.compensation import (
    apply_compensation,
    check_compensable,
    compensated_view,
    fit_compensation,
)
from lorp.quality import compare_pruned
from lorp.similarity import capture_similarity
from lorp.surgery import pruned_view
from lorp.temperature import (
    FOLD_ULPS,
    apply_temperature,
    check_temperature,
    final_norm,
    fold_error_ok,
    rounding_eps,
)
from tests.tiny_models import FAMILIES, VOCAB, build_tiny, snapshot, tiny_tokenizer

BF16 = torch.bfloat16
EPS = torch.finfo(BF16).eps  # 2^-7
PPL_REL = 0.02
S_ABS = 0.005
COMPENSABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3")
TEMPERATURE = tuple(f for f in FAMILIES if f != "gemma2")  # gemma2 soft-caps its logits
OFFSET_NORM = ("gemma3",)  # final norm y = (1 + w) * n(x)


def _windows(n: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


def _bf16(family: str) -> Any:
    return build_tiny(family, dtype=BF16)


@torch.no_grad()
def _sampled(model: Any, n: int, t: int) -> torch.Tensor:
    """Text the dense model wrote itself: a fitted temperature lies inside its search range
    (on uniform random tokens a random model's best scale is ~0)."""
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, 1))
    for _ in range(t - 1):
        probs = torch.softmax(model(ids).logits[:, -1].double(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
    return ids


def _all_bf16(model: nn.Module) -> bool:
    return all(p.dtype == BF16 for p in model.parameters())


# --- the H200 failure ---------------------------------------------------------------------


def test_lorp_fold_runs_in_bfloat16_qwen3() -> None:
    """The H200 failure: lorp-fold on a bf16 Qwen3 was refused after all the work with
    "Qwen3RMSNorm: scaling its parameters does not scale its output" (the temperature fold was
    checked with a relative tolerance of 1e-4, below bf16 rounding)."""
    model = _bf16("qwen3")
    config = PruneConfig(
        method="lorp-fold",
        num_remove=2,
        windows=8,
        seq_len=32,
        score_windows=2,
        score_seq_len=16,
        compensation_windows=4,
    )
    result = prune(
        model, tiny_tokenizer(), _windows(8, 32, 1), config, evaluation=_windows(2, 32, 2)
    )
    assert result.compensation is not None and result.compensation.temperature is not None
    assert _all_bf16(model)


# --- the temperature fold -----------------------------------------------------------------


def _randomise_final_norm(model: nn.Module, family: str) -> None:
    """Final-norm parameters away from their init (ones / zeros) so that the two
    parametrisations and the roundings of the fold are visible."""
    norm = final_norm(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in norm.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=g)
            if name == "weight":
                value = 2.0 * noise if family in OFFSET_NORM else 1.0 + 0.5 * noise
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))


@pytest.mark.parametrize("family", TEMPERATURE)
@pytest.mark.parametrize("scale", [0.8, 1.003, 1.25])
def test_temperature_fold_in_bf16(family: str, scale: float) -> None:
    """The fold is computed in float32 and cast once (bit-equal), scales the final norm's output
    and the logits within bf16 rounding, finds Gemma's ``1 + w`` form even at a scale closer to
    1 than bf16's eps (where the folded outputs of the two forms round alike), and restores
    the weights exactly."""
    model = _bf16(family)
    _randomise_final_norm(model, family)
    norm = final_norm(model)
    saved = {n: p.detach().clone() for n, p in norm.named_parameters(recurse=False)}
    before = snapshot(model)
    ids = _windows(2, 16, 5)
    seen: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda _m, _a, out: seen.append(out.float()))
    try:
        with torch.no_grad():
            plain = model(ids).logits.float()
            restore = apply_temperature(model, scale)
            folded = model(ids).logits.float()
            for name, p in norm.named_parameters(recurse=False):
                w = saved[name].float()
                offset = name == "weight" and family in OFFSET_NORM
                want = (scale * (1 + w) - 1) if offset else scale * w
                assert torch.equal(p, want.to(BF16)), name  # float32, cast once
            restore()
    finally:
        handle.remove()
    assert all(v.equal(before[k]) for k, v in snapshot(model).items())
    # the norm's output: each of the original output, the folded weight and the folded output
    # is rounded once (2^-8 relative each): within 2 eps of the largest element
    n_plain, n_folded = (n for n in seen if n.shape[:2] == ids.shape)  # not the fold's probes
    assert float((n_folded - scale * n_plain).abs().max()) <= 2 * EPS * float(n_plain.abs().max())
    # the logits (one more bf16 rounding in the head)
    err = float((folded - scale * plain).abs().max())
    assert err <= 4 * EPS * float((scale * plain).abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_temperature_fold_in_other_dtypes(family: str, dtype: torch.dtype) -> None:
    """float16 (eps 9.8e-4) and float64 (the fold computed in float64, not narrowed to
    float32): the folded parameters are computed in the wider of float32 and the dtype and
    cast once; the logits scale within the dtype's rounding (float64: float32's, as Gemma's
    norm multiplies by its weight in float32)."""
    model = build_tiny(family, dtype=dtype)
    _randomise_final_norm(model, family)
    norm = final_norm(model)
    saved = {n: p.detach().clone() for n, p in norm.named_parameters(recurse=False)}
    work = torch.promote_types(dtype, torch.float32)
    ids = _windows(2, 16, 5)
    with torch.no_grad():
        plain = model(ids).logits.double()
        restore = apply_temperature(model, 1.003)
        folded = model(ids).logits.double()
        for name, p in norm.named_parameters(recurse=False):
            w = saved[name].to(work)
            offset = name == "weight" and family in OFFSET_NORM
            assert torch.equal(p, ((1.003 * (1 + w) - 1) if offset else 1.003 * w).to(dtype))
        restore()
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    assert float((folded - 1.003 * plain).abs().max()) <= 4 * eps * float(plain.abs().max())


def test_gemma_form_is_told_apart_in_bf16() -> None:
    """Gemma's ``(1 + w) n(x)`` norm with small weights: folding ``s w`` instead of
    ``s (1 + w) - 1`` would change the output by ``(s - 1) n(x)``, below bf16's tolerance for
    s near 1; the probe that doubles the output still picks the offset form."""
    model = _bf16("gemma3")
    norm: Any = final_norm(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        norm.weight.copy_(0.01 * torch.randn(norm.weight.shape, generator=g))
    saved = norm.weight.detach().float().clone()
    for scale in (0.99, 1.01):
        restore = apply_temperature(model, scale)
        assert torch.equal(norm.weight, (scale * (1 + saved) - 1).to(BF16))
        restore()


def test_norm_that_ignores_its_weight_is_refused_in_bf16() -> None:
    """A looser tolerance does not let a fold through that does not scale the output; the
    pipeline refuses such a model before its calibration."""
    model = _bf16("llama")
    norm: Any = final_norm(model)
    weight = norm.weight.detach().clone()
    base = type(norm).forward

    def ignoring(self: Any, hidden: torch.Tensor) -> torch.Tensor:
        return base(self, hidden) / self.weight * weight

    norm.forward = ignoring.__get__(norm)
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError, match="does not scale its output"):
        apply_temperature(model, 0.9)
    assert all(v.equal(before[k]) for k, v in snapshot(model).items())
    # and before the calibration: prune() checks the fold first
    seen: list[str] = []
    config = PruneConfig(method="lorp", num_remove=1, windows=4, seq_len=16, temperature=True)
    with pytest.raises(UnsupportedModelError, match="does not scale its output"):
        prune(
            model,
            tiny_tokenizer(),
            _windows(4, 16, 1),
            config,
            progress=lambda s, *_: seen.append(s),
        )
    assert seen == []
    assert all(v.equal(before[k]) for k, v in snapshot(model).items())


def test_fold_tolerance_fits_the_dtype() -> None:
    assert rounding_eps(torch.float32) == torch.finfo(torch.float32).eps
    assert rounding_eps(torch.float32, BF16) == EPS
    assert rounding_eps(torch.float16) == torch.finfo(torch.float16).eps
    expected = torch.tensor([1.0, -2.0, 0.0])
    magnitude = expected.abs()
    for dtype in (torch.float32, torch.float16, BF16):
        eps = rounding_eps(dtype)
        ok = expected + 0.9 * FOLD_ULPS * eps * magnitude
        bad = expected + torch.tensor([0.0, 1.1 * FOLD_ULPS * eps * 2.0, 0.0])
        assert fold_error_ok(ok, expected, magnitude, eps)
        assert not fold_error_ok(bad, expected, magnitude, eps)
    assert not fold_error_ok(torch.tensor([float("nan"), 0, 0]), expected, magnitude, EPS)


# --- the compensation fold ----------------------------------------------------------------


@pytest.mark.parametrize("family", COMPENSABLE)
def test_compensation_fold_in_bf16(family: str) -> None:
    """Maps fitted on bf16 activations: the fold is computed in float64 and cast once
    (bit-equal), restores exactly, and the compensated pruned model matches the float32 run
    of the same weights and maps."""
    model = _bf16(family)
    reference = copy.deepcopy(model).float()
    removed = [2, 3]
    calib, evaluation = _windows(6, 24, 1), _windows(2, 24, 2)
    comp = fit_compensation(model, removed, calib)
    assert set(comp.maps) == {1}
    assert comp.maps[1].dtype == torch.float64 and bool(torch.isfinite(comp.maps[1]).all())
    down = model.model.layers[1].mlp.down_proj
    weight = down.weight.detach().clone()
    before = snapshot(model)
    restore = apply_compensation(model, comp)
    assert torch.equal(down.weight, (comp.maps[1].T @ weight.double()).to(BF16))
    restore()
    assert all(v.equal(before[k]) for k, v in snapshot(model).items())
    # the maps fitted in bf16 and in float32 (same weights) agree to bf16 rounding
    ref_comp = fit_compensation(reference, removed, calib)
    diff = float((comp.maps[1] - ref_comp.maps[1]).norm() / ref_comp.maps[1].norm())
    assert diff < 0.05
    low = compare_pruned(model, removed, evaluation, compensation=comp)
    high = compare_pruned(reference, removed, evaluation, compensation=comp)
    assert low.pruned.ppl == pytest.approx(high.pruned.ppl, rel=PPL_REL)
    assert _all_bf16(model)


# --- the pipeline, every family -----------------------------------------------------------

_BENCH = BenchmarkConfig(
    prefill=((1, 8),),
    decode=((1, 4, 3),),
    warmup=0,
    repetitions=1,
    block_repetitions=1,
    allow_few_repetitions=True,
)


def _fold_config(family: str) -> dict[str, Any]:
    """lorp-fold where the model takes both folds; else lorp-loss with the temperature alone;
    gemma2 (soft-capped logits, post-MLP norm) takes neither."""
    if family in COMPENSABLE:
        return {"method": "lorp-fold"}
    if family in TEMPERATURE:
        return {"method": "lorp-loss", "temperature": True}
    return {"method": "lorp-loss"}


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_in_bf16(family: str, tmp_path: Path) -> None:
    """lorp-fold (or lorp-loss with the temperature where compensation is refused) with
    evaluation and the benchmark in bf16; perplexity within :data:`PPL_REL` of the float32 run
    of the same weights, selection and folds; the weights stay bf16; the saved checkpoint
    reloads in bf16 (explicitly and from its own config) with the logits it had in memory."""
    model = _bf16(family)
    reference = copy.deepcopy(model).float()
    tok = tiny_tokenizer()
    calib = _sampled(model, 8, 24)
    evaluation = _windows(3, 24, 2)
    config = PruneConfig(
        num_remove=2,
        windows=8,
        seq_len=24,
        score_windows=2,
        score_seq_len=16,
        compensation_windows=4,
        temperature_windows=3,
        benchmark=_BENCH,
        **_fold_config(family),
    )
    result = prune(model, tok, calib, config, evaluation=evaluation)
    comp = result.compensation
    assert (comp is not None and bool(comp.maps)) == (family in COMPENSABLE)
    assert (comp is not None and comp.temperature is not None) == (family in TEMPERATURE)
    if comp is not None and comp.temperature is not None:
        assert 0.05 < comp.temperature.scale < 20.0  # inside the search range
    assert _all_bf16(model)
    assert result.benchmark is not None and result.benchmark.dtype == "bfloat16"
    assert result.quality is not None
    high = compare_pruned(reference, result.removed, evaluation, compensation=comp)
    assert result.quality.dense.ppl == pytest.approx(high.dense.ppl, rel=PPL_REL)
    assert result.quality.pruned.ppl == pytest.approx(high.pruned.ppl, rel=PPL_REL)

    ids = _windows(2, 16, 7)
    in_memory = _logits(model, ids)
    # the model in memory is the pruned one prune() measured (a sanity check: float32 of the
    # same weights and folds, 10% of the largest logit)
    with compensated_view(reference, comp), pruned_view(reference, result.removed):
        assert torch.allclose(
            in_memory.float(),
            _logits(reference, ids),
            rtol=0,
            atol=0.1 * float(in_memory.abs().max()),
        )
    save_pruned(model, tok, tmp_path / "ckpt")
    for kwargs in ({"dtype": BF16}, {}):
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", **kwargs).eval()
        assert _all_bf16(reloaded), kwargs
        assert torch.equal(_logits(reloaded, ids), in_memory), kwargs


@pytest.mark.parametrize("family", FAMILIES)
def test_similarity_lorp_and_auto_in_bf16(family: str) -> None:
    """S from bf16 activations is within :data:`S_ABS` of float32's (same weights); lorp and
    auto select and evaluate in bf16 (perplexity within :data:`PPL_REL` of float32's)."""
    model = _bf16(family)
    reference = copy.deepcopy(model).float()
    calib, evaluation = _windows(6, 24, 1), _windows(2, 24, 2)
    s_low = capture_similarity(model, calib)
    s_high = capture_similarity(reference, calib)
    assert abs(s_low - s_high).max() < S_ABS
    for method in ("lorp", "auto"):
        pruned = _bf16(family)
        config = PruneConfig(
            method=method, num_remove=2, windows=6, seq_len=24, score_windows=2, score_seq_len=16
        )
        result = prune(pruned, tiny_tokenizer(), calib, config, evaluation=evaluation)
        assert _all_bf16(pruned)
        assert result.quality is not None
        high = compare_pruned(reference, result.removed, evaluation)
        assert result.quality.pruned.ppl == pytest.approx(high.pruned.ppl, rel=PPL_REL), method


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(COMPENSABLE)))
def test_folds_refused_in_bf16_as_in_float32(family: str) -> None:
    """Families that cannot take a fold are refused before the calibration, in bf16 too."""
    model = _bf16(family)
    with pytest.raises(UnsupportedModelError):
        check_compensable(model)
    if family not in TEMPERATURE:
        with pytest.raises(UnsupportedModelError, match="soft-caps"):
            check_temperature(model)
    seen: list[str] = []
    config = PruneConfig(method="lorp-fold", num_remove=1, windows=4, seq_len=16)
    with pytest.raises(UnsupportedModelError):
        prune(
            model,
            tiny_tokenizer(),
            _windows(4, 16, 1),
            config,
            progress=lambda s, *_: seen.append(s),
        )
    assert seen == []
