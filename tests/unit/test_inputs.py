"""Stored dense block inputs (lorp.inputs): kept by the similarity capture, read by the
compensation fit, its strength tuning and the temperature fit, which then start mid-model.
Every result must equal the one computed with whole dense passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

import lorp.pipeline
from lorp import InvalidInputError, PruneConfig, capture_similarity, prune
from lorp.compensation import (
    compensated_view,
    fit_compensation,
    fit_folded_temperature,
    temperature_only,
    tune_strength,
)
from lorp.inputs import BlockInputs, batched_feed, fed, resumed
from lorp.surgery import pruned_view
from lorp.temperature import fit_temperature
from tests.tiny_models import DEPTH, FAMILIES, VOCAB, build_tiny, snapshot, tiny_tokenizer

FOLDABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def _windows(n: int, t: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g)


def _kept(model: Any, windows: torch.Tensor, indices: list[int], batch_size: int = 1) -> Any:
    inputs = BlockInputs(indices)
    capture_similarity(model, windows, keep=inputs, batch_size=batch_size)
    return inputs


@contextmanager
def _counting(model: Any) -> Iterator[list[int]]:
    """Calls per block (original numbering) while the body runs."""
    calls = [0] * len(model.model.layers)
    handles = [
        block.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(model.model.layers)
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_capture_keeps_the_dense_block_inputs_and_s_is_unchanged(
    family: str, batch_size: int
) -> None:
    model = build_tiny(family)
    windows = _windows(5)
    plain = capture_similarity(model, windows, batch_size=batch_size)
    inputs = BlockInputs([4, 1, 2])
    s = capture_similarity(model, windows, keep=inputs, batch_size=batch_size)
    np.testing.assert_array_equal(s, plain)
    assert inputs.ready and inputs.indices == [1, 2, 4] and inputs.seconds >= 0
    assert torch.equal(inputs.tokens, windows[[1, 2, 4]])
    with torch.no_grad():
        hidden = model(windows[[1, 2, 4]], output_hidden_states=True).hidden_states
    assert len(inputs.states) == DEPTH
    for b in range(DEPTH):  # hidden_states[b] is block b's input
        torch.testing.assert_close(inputs.states[b], hidden[b], rtol=1e-5, atol=1e-5)
    # looked up by content, in the asked order; None when one window is not kept
    kept = inputs.of(3, windows[[4, 1]])
    assert kept is not None and torch.equal(kept, inputs.states[3][[2, 0]])
    assert inputs.of(3, windows[[0, 1]]) is None
    assert inputs.of(DEPTH, windows[[1]]) is None


def test_keep_is_refused_for_windows_the_capture_does_not_have() -> None:
    with pytest.raises(InvalidInputError, match="cannot keep windows"):
        capture_similarity(build_tiny("llama"), _windows(3), keep=BlockInputs([1, 3]))
    with pytest.raises(InvalidInputError, match="integers"):
        BlockInputs([-1])
    assert BlockInputs([0]).of(0, _windows(1)) is None  # never filled


@pytest.mark.parametrize("family", FOLDABLE)
def test_fit_from_stored_inputs_equals_the_dense_pass_and_runs_only_the_blocks_before(
    family: str,
) -> None:
    model = build_tiny(family)
    windows = _windows(6)
    removed = [1, 3, 4]  # two runs: before-blocks 0 and 2, targets at 2 and 5
    dense = fit_compensation(model, removed, windows[:4])
    inputs = _kept(model, windows, [0, 1, 2, 3])
    before = snapshot(model)
    with _counting(model) as calls:
        stored = fit_compensation(model, removed, windows[:4], inputs=inputs)
    assert stored.stored_inputs and not dense.stored_inputs
    assert calls == [4, 0, 4, 0, 0, 0]  # blocks 0 and 2 once per window, nothing after
    assert sorted(stored.maps) == sorted(dense.maps) == [0, 2]
    for b in dense.maps:
        torch.testing.assert_close(stored.maps[b], dense.maps[b], rtol=1e-6, atol=1e-8)
    for a, b in zip(stored.runs, dense.runs, strict=True):
        assert a["relative_residual"] == pytest.approx(b["relative_residual"], rel=1e-6)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fit_falls_back_to_the_dense_pass_when_the_inputs_do_not_serve() -> None:
    model = build_tiny("llama")
    windows = _windows(6)
    inputs = _kept(model, windows, [0, 1])
    # windows not kept
    assert not fit_compensation(model, [2], windows[:3], inputs=inputs).stored_inputs
    # a run that ends at the last block: its target (the last block's output) is not stored
    last = fit_compensation(model, [DEPTH - 1], windows[:2], inputs=inputs)
    assert not last.stored_inputs
    dense = fit_compensation(model, [DEPTH - 1], windows[:2])
    torch.testing.assert_close(last.maps[DEPTH - 2], dense.maps[DEPTH - 2])


def test_tuning_from_stored_inputs_measures_the_same_losses_without_the_prefix() -> None:
    model = build_tiny("qwen2")
    windows = _windows(8, 32, seed=4)
    comp = fit_compensation(model, [3, 4], windows[:6])
    inputs = _kept(model, windows, [6, 7])
    dense = tune_strength(model, comp, windows[6:8])
    with _counting(model) as calls:
        stored = tune_strength(model, comp, windows[6:8], inputs=inputs)
    assert stored.strength == dense.strength
    assert stored.tuning is not None and dense.tuning is not None
    for a, b in zip(stored.tuning["measured"], dense.tuning["measured"], strict=True):
        assert a["strength"] == b["strength"]
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    passes = len(stored.tuning["measured"])
    # the first compensated block is 2: nothing before it runs, no prefix pass either
    assert calls == [0, 0, 2 * passes, 0, 0, 2 * passes]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_temperature_from_stored_inputs_equals_the_whole_pass(family: str) -> None:
    model = build_tiny(family)
    windows = _windows(6, 32, seed=2)
    inputs = _kept(model, windows, [4, 5], batch_size=2)
    if family == "gemma3":  # no fold: the temperature of the plain pruned model, from block 2
        base = temperature_only([2, 3])
        expect = [0, 0, 0, 0, 2, 2]
    else:
        base = fit_compensation(model, [2, 3], windows[:4])
        expect = [0, 2, 0, 0, 2, 2]
    with compensated_view(model, base), pruned_view(model, [2, 3]):
        whole = fit_temperature(model, windows[4:], batch_size=2)
    with _counting(model) as calls:
        got = fit_folded_temperature(model, base, windows[4:], batch_size=2, inputs=inputs)
    assert got.temperature is not None
    assert got.temperature.scale == pytest.approx(whole.scale, rel=1e-6)
    assert got.temperature.nll_after == pytest.approx(whole.nll_after, rel=1e-6)
    assert calls == [c // 2 for c in expect]  # one forward per batch of 2 windows
    assert got.maps is base.maps


def test_fed_refuses_mismatched_states_and_skipped_blocks() -> None:
    model = build_tiny("llama")
    windows = _windows(2)

    def feed(shape: tuple[int, ...]) -> Any:
        return batched_feed(torch.zeros(shape), 1)

    with (
        pytest.raises(InvalidInputError, match="skipped or out of range"),
        fed(model, [1], {1: feed((1, 24, 32))}),
    ):
        pass
    with (
        pytest.raises(InvalidInputError, match="do not match"),
        resumed(model, [3], 2, feed((1, 5, 32))),
    ):
        model(windows[:1])
    with (
        pytest.raises(InvalidInputError, match="more forwards"),
        resumed(model, [3], 2, feed((1, 24, 32))),
    ):
        model(windows[:1])
        model(windows[1:])
    with (
        pytest.raises(InvalidInputError, match="no block is kept"),
        resumed(model, [4, 5], 4, feed((1, 24, 32))),
    ):
        pass
    assert len(model.model.layers) == DEPTH  # every view restored


def _prune(calib: torch.Tensor, evaluation: torch.Tensor) -> Any:
    config = PruneConfig(
        method="streamline", num_remove=2, windows=10, seq_len=32, compensate=True,
        compensation_windows=5, compensation_tune_windows=2, temperature=True,
        temperature_windows=3,
    )  # fmt: skip
    return prune(build_tiny("qwen2"), tiny_tokenizer(), calib, config, evaluation=evaluation)


def test_prune_with_stored_inputs_gives_what_whole_passes_give(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calib, evaluation = _windows(10, 32, seed=4), _windows(3, 32, seed=5)
    stored = _prune(calib, evaluation)
    monkeypatch.setattr(lorp.pipeline, "STORED_INPUT_BYTES", 0)
    whole = _prune(calib, evaluation)
    a, b = stored.compensation, whole.compensation
    assert a is not None and b is not None and a.temperature and b.temperature
    assert a.stored_inputs and not b.stored_inputs
    assert stored.removed == whole.removed
    assert a.strength == b.strength
    assert a.temperature.scale == pytest.approx(b.temperature.scale, rel=1e-6)
    assert stored.quality is not None and whole.quality is not None
    assert stored.quality.pruned.ppl == pytest.approx(whole.quality.pruned.ppl, rel=1e-6)


def test_windows_kept_follow_the_groups_and_the_byte_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build_tiny("llama")
    calib = _windows(10, 32)
    config = PruneConfig(
        method="lorp", num_remove=2, windows=10, seq_len=32, compensate=True,
        compensation_windows=5, compensation_tune_windows=2, temperature=True,
        temperature_windows=3,
    )  # fmt: skip
    keep = lorp.pipeline.inputs_to_keep
    per_window = DEPTH * 32 * 32 * 4  # blocks x tokens x hidden x float32
    got = keep(model, calib, config)
    assert got is not None and got.indices == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    monkeypatch.setattr(lorp.pipeline, "STORED_INPUT_BYTES", 7 * per_window)
    got = keep(model, calib, config)  # fit + tune fit, the temperature's 3 would not
    assert got is not None and got.indices == [0, 1, 2, 3, 4, 5, 6]
    monkeypatch.setattr(lorp.pipeline, "STORED_INPUT_BYTES", 4 * per_window)
    got = keep(model, calib, config)  # the fit's 5 do not; tune (2) does, then temperature
    assert got is not None and got.indices == [5, 6]
    plain = PruneConfig(method="lorp", num_remove=2, windows=10, seq_len=32)
    assert keep(model, calib, plain) is None
