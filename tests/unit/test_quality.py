"""Perplexity and dense-vs-pruned comparison."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorp.quality import compare_pruned, perplexity
from tests.tiny_models import build_tiny, tiny_input_ids


def test_perplexity_matches_manual_cross_entropy() -> None:
    model = build_tiny("llama")
    windows = tiny_input_ids(batch=3, length=12)
    res = perplexity(model, windows, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert res.tokens == 3 * 11
    assert res.nll == pytest.approx(float(ce), rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_compare_matches_manual_kl_and_agreement() -> None:
    from lorp.surgery import pruned_view

    model = build_tiny("llama")
    windows = tiny_input_ids(batch=2, length=10)
    cut = compare_pruned(model, [1, 3], windows, batch_size=1)
    with torch.no_grad():
        dense = F.log_softmax(model(input_ids=windows).logits[:, :-1], -1)
        with pruned_view(model, [1, 3]):
            pruned = F.log_softmax(model(input_ids=windows).logits[:, :-1], -1)
    kl = float((dense.exp() * (dense - pruned)).sum(-1).mean())
    agree = float((dense.argmax(-1) == pruned.argmax(-1)).float().mean())
    assert cut.kl == pytest.approx(kl, rel=1e-4)
    assert cut.kl > 0
    assert cut.top1_agreement == pytest.approx(agree)
    assert cut.tokens == 2 * 9
    assert cut.dense.ppl == pytest.approx(perplexity(model, windows).ppl)
    assert len(model.model.layers) == 6  # whole again afterwards
    assert cut.to_dict()["ppl_ratio"] == pytest.approx(cut.pruned.ppl / cut.dense.ppl)
