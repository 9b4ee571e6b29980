"""Similarity capture against a keep-everything reference, on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lorp.errors import InvalidInputError, UnsupportedModelError
from lorp.similarity import capture_similarity
from tests.tiny_models import build_tiny, tiny_input_ids


def reference_similarity(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor
) -> np.ndarray:
    """Keep every block input of a window alive (what the reference does) and average."""
    inputs: dict[int, torch.Tensor] = {}

    def grab(i: int):
        def hook(_m, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)]
    total = np.zeros((len(blocks), len(blocks)))
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
            x = torch.stack([inputs[i][0] for i in range(len(blocks))]).float()
            x = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
            total += torch.einsum("itd,jtd->ijt", x, x).mean(-1).double().numpy()
    for h in handles:
        h.remove()
    s = total / len(windows)
    np.fill_diagonal(s, 1.0)
    return s


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma3"])
def test_matches_reference_and_is_well_formed(family: str) -> None:
    model = build_tiny(family)
    windows = tiny_input_ids(batch=5, length=16)
    s = capture_similarity(model, windows, batch_size=2)
    from lorp._blocks import get_blocks

    ref = reference_similarity(model, get_blocks(model), windows)
    assert s.dtype == np.float64
    assert s.shape == ref.shape == (len(get_blocks(model)),) * 2
    np.testing.assert_allclose(s, ref, atol=1e-6)
    np.testing.assert_array_equal(s, s.T)
    np.testing.assert_array_equal(np.diag(s), 1.0)
    assert np.all(np.abs(s) <= 1.0 + 1e-6)


def test_batch_size_does_not_change_result() -> None:
    model = build_tiny("llama")
    windows = tiny_input_ids(batch=4, length=10)
    one = capture_similarity(model, windows, batch_size=1)
    four = capture_similarity(model, windows, batch_size=4)
    np.testing.assert_allclose(one, four, atol=1e-6)


def test_progress_hooks_removed_and_head_skipped() -> None:
    model = build_tiny("llama")
    calls: list[tuple[str, float, str]] = []
    head_calls = []
    model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    capture_similarity(
        model, tiny_input_ids(batch=3, length=8), progress=lambda *a: calls.append(a)
    )
    assert [c[1] for c in calls] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(c[0] == "calibration" for c in calls)
    assert head_calls == []  # the forward stops at the last block's input
    assert all(not b._forward_pre_hooks for b in model.model.layers)


def test_cancellation_from_callback_propagates_and_cleans_up() -> None:
    from lorp.errors import CancelledError

    model = build_tiny("llama")

    def cancel(*_: object) -> None:
        raise CancelledError("stop")

    with pytest.raises(CancelledError):
        capture_similarity(model, tiny_input_ids(batch=2, length=8), progress=cancel)
    assert all(not b._forward_pre_hooks for b in model.model.layers)


def test_errors() -> None:
    model = build_tiny("llama")
    with pytest.raises(InvalidInputError):
        capture_similarity(model, torch.zeros(8, dtype=torch.long))
    with pytest.raises(InvalidInputError):
        capture_similarity(model, torch.zeros(2, 8))
    with pytest.raises(UnsupportedModelError, match="Linear"):
        capture_similarity(nn.Linear(2, 2), tiny_input_ids())


def test_disk_offloaded_model_gives_the_same_matrix(tmp_path: Path) -> None:
    """Blocks offloaded to disk with a device_map (weights on meta, loaded per forward)."""
    from transformers import AutoModelForCausalLM

    windows = tiny_input_ids(batch=2, length=12)
    model = build_tiny("llama")
    plain = capture_similarity(model, windows)
    model.save_pretrained(tmp_path / "m")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map.update({f"model.layers.{i}": ("disk" if i in (2, 3) else "cpu") for i in range(6)})
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "m",
        device_map=device_map,
        offload_folder=tmp_path / "offload",
        dtype=torch.float32,
    )
    assert offloaded.model.layers[2].self_attn.q_proj.weight.device.type == "meta"
    np.testing.assert_allclose(capture_similarity(offloaded, windows), plain, atol=1e-6)


def test_model_split_over_a_device_map() -> None:
    """A model dispatched with an accelerate device map (here all 'cpu', the only device in CI)."""
    from accelerate import dispatch_model

    windows = tiny_input_ids(batch=2, length=12)
    plain = capture_similarity(build_tiny("llama"), windows)
    model = build_tiny("llama")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map.update({f"model.layers.{i}": "cpu" for i in range(6)})
    model = dispatch_model(model, device_map=device_map)
    model.hf_device_map = device_map
    np.testing.assert_allclose(capture_similarity(model, windows), plain, atol=1e-6)
