"""Block removal on tiny random models of every supported family."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorp._blocks import get_blocks
from lorp.errors import InvalidInputError, UnsupportedModelError
from lorp.loading import save_pruned
from lorp.surgery import REMOVED_LAYERS_ATTR, pruned_view, remove_blocks, validate_removed
from tests.tiny_models import (
    CONFIGS,
    DEPTH,
    FAMILIES,
    build_tiny,
    gemma3_config,
    tiny_input_ids,
    tiny_tokenizer,
)

REMOVED = [1, 3]  # two interior blocks
KEEP = [i for i in range(DEPTH) if i not in REMOVED]
NEW_TOKENS = 8


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _generate(model: Any, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


def _layer_indices(model: Any) -> list[list[int]]:
    """Every ``layer_idx`` found in each block, block by block."""
    out: list[list[int]] = []
    for block in get_blocks(model):
        values = [getattr(m, "layer_idx", None) for m in block.modules()]
        out.append([v for v in values if isinstance(v, int)])
    return out


def _original_layer_types(family: str) -> list[str] | None:
    return getattr(CONFIGS[family](), "layer_types", None)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_generate_save_reload(family: str, tmp_path: Path) -> None:
    model = build_tiny(family)
    ids = tiny_input_ids()
    blocks = list(get_blocks(model))
    layer_types = _original_layer_types(family)

    remove_blocks(model, REMOVED)

    assert list(get_blocks(model)) == [blocks[i] for i in KEEP]  # same modules, in order
    assert model.config.num_hidden_layers == DEPTH - len(REMOVED)
    assert getattr(model.config, REMOVED_LAYERS_ATTR) == REMOVED
    if layer_types is not None:
        assert model.config.layer_types == [layer_types[i] for i in KEEP]
    for new, indices in enumerate(_layer_indices(model)):
        assert indices and all(i == new for i in indices)

    cached = _generate(model, ids, use_cache=True)
    uncached = _generate(model, ids, use_cache=False)
    assert cached.shape == (ids.shape[0], ids.shape[1] + NEW_TOKENS)
    assert torch.equal(cached, uncached)
    logits = _logits(model, ids)

    files = save_pruned(model, tiny_tokenizer(), tmp_path / "out")
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert "tokenizer.json" in names

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reloaded.eval()
    assert type(reloaded) is type(model)
    assert len(get_blocks(reloaded)) == DEPTH - len(REMOVED)
    assert reloaded.config.num_hidden_layers == DEPTH - len(REMOVED)
    assert getattr(reloaded.config, REMOVED_LAYERS_ATTR) == REMOVED
    if layer_types is not None:
        assert reloaded.config.layer_types == [layer_types[i] for i in KEEP]
    assert (_logits(reloaded, ids) - logits).abs().max().item() == 0.0
    assert torch.equal(_generate(reloaded, ids, use_cache=True), cached)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma3", "gpt2"])
def test_pruned_model_equals_model_built_at_reduced_depth(family: str) -> None:
    """Independent reference: a fresh model with a hand-filtered config and the kept weights."""
    model = build_tiny(family)
    ids = tiny_input_ids()
    config = CONFIGS[family]()
    config.num_hidden_layers = len(KEEP)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in KEEP]
    if family == "qwen2":
        config.max_window_layers = sum(1 for i in KEEP if i < config.max_window_layers)
    reference = AutoModelForCausalLM.from_config(config)
    reference.eval()
    prefix = {"gpt2": "transformer.h."}.get(family, "model.layers.")
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) not in KEEP:
                continue
            key = f"{prefix}{KEEP.index(int(index))}.{rest}"
        renamed[key] = value
    reference.load_state_dict(renamed, strict=True)

    remove_blocks(model, REMOVED)
    assert (_logits(model, ids) - _logits(reference, ids)).abs().max().item() == 0.0
    assert torch.equal(_generate(model, ids, True), _generate(reference, ids, True))


def test_gemma3_sliding_window_matters() -> None:
    """The tiny Gemma 3 is a meaningful test: its sliding window changes the output."""
    model = build_tiny("gemma3")
    ids = tiny_input_ids(length=12)
    wide = gemma3_config()
    wide.sliding_window = 64
    wide_model = AutoModelForCausalLM.from_config(wide)
    wide_model.load_state_dict(model.state_dict())
    wide_model.eval()
    assert (_logits(model, ids) - _logits(wide_model, ids)).abs().max().item() > 1e-3


def _snapshot(model: Any) -> dict[str, Any]:
    return {
        "blocks": list(get_blocks(model)),
        "block_list": get_blocks(model),
        "config": model.config.to_dict(),
        "layer_idx": _layer_indices(model),
        "attrs": sorted(vars(model.config)),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2", "gpt_neox"])
def test_pruned_view_matches_remove_blocks_and_restores(family: str) -> None:
    model = build_tiny(family)
    ids = tiny_input_ids()
    before = _snapshot(model)
    dense_logits = _logits(model, ids)
    dense_generated = _generate(model, ids, True)

    pruned = copy.deepcopy(model)
    remove_blocks(pruned, REMOVED)
    with pruned_view(model, REMOVED):
        assert model.config.num_hidden_layers == len(KEEP)
        assert not hasattr(model.config, REMOVED_LAYERS_ATTR)  # the view records nothing
        assert (_logits(model, ids) - _logits(pruned, ids)).abs().max().item() == 0.0
        assert torch.equal(_generate(model, ids, True), _generate(pruned, ids, True))
        assert _layer_indices(model) == _layer_indices(pruned)

    after = _snapshot(model)
    assert after["block_list"] is before["block_list"]
    assert after == before
    assert (_logits(model, ids) - dense_logits).abs().max().item() == 0.0
    assert torch.equal(_generate(model, ids, True), dense_generated)


def test_pruned_view_restores_after_exception() -> None:
    model = build_tiny("gemma3")
    ids = tiny_input_ids()
    before = _snapshot(model)
    dense_logits = _logits(model, ids)
    with pytest.raises(RuntimeError, match="boom"), pruned_view(model, [0, 4]):
        assert len(get_blocks(model)) == DEPTH - 2
        raise RuntimeError("boom")
    assert _snapshot(model) == before
    assert (_logits(model, ids) - dense_logits).abs().max().item() == 0.0


def test_pruned_view_on_already_pruned_model() -> None:
    model = build_tiny("qwen2")
    remove_blocks(model, [0])
    before = _snapshot(model)
    with pruned_view(model, [2]):
        assert model.config.num_hidden_layers == DEPTH - 2
        assert getattr(model.config, REMOVED_LAYERS_ATTR) == [0]
    assert _snapshot(model) == before


def test_repeated_removal_records_original_indices(tmp_path: Path) -> None:
    model = build_tiny("gemma3")
    layer_types = _original_layer_types("gemma3")
    assert layer_types is not None
    remove_blocks(model, [1])  # now 5 blocks: original 0, 2, 3, 4, 5
    remove_blocks(model, [1, 3])  # current 1 and 3 are original 2 and 4
    assert getattr(model.config, REMOVED_LAYERS_ATTR) == [1, 2, 4]
    assert model.config.layer_types == [layer_types[i] for i in (0, 3, 5)]
    for new, indices in enumerate(_layer_indices(model)):
        assert indices and set(indices) == {new}
    ids = tiny_input_ids()
    assert torch.equal(_generate(model, ids, True), _generate(model, ids, False))


def test_qwen2_max_window_layers_is_recounted() -> None:
    model = build_tiny("qwen2")  # max_window_layers=3: blocks 0..2 full, 3..5 sliding
    remove_blocks(model, [0, 4])
    assert model.config.max_window_layers == 2
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert model.model.has_sliding_layers is True
    remove_blocks(model, [2, 3])
    assert model.config.layer_types == ["full_attention"] * 2
    assert model.model.has_sliding_layers is False


@pytest.mark.parametrize(
    ("removed", "message"),
    [
        ([], "no blocks"),
        ([1, 1], "duplicate"),
        ([DEPTH], "out of range"),
        ([-1], "out of range"),
        (list(range(DEPTH)), "all"),
        ([1.0], "not an integer"),
        ([True], "not an integer"),
    ],
)
def test_bad_indices_raise_and_leave_model_untouched(removed: list[Any], message: str) -> None:
    model = build_tiny("llama")
    before = _snapshot(model)
    with pytest.raises(InvalidInputError, match=message):
        remove_blocks(model, removed)
    with pytest.raises(InvalidInputError, match=message), pruned_view(model, removed):
        pass
    assert _snapshot(model) == before


def test_validate_removed_sorts_and_accepts_numpy_ints() -> None:
    np = pytest.importorskip("numpy")
    assert validate_removed(6, [4, np.int64(1)]) == [1, 4]


def test_gpt2_inverse_layer_scaling_is_refused() -> None:
    config = CONFIGS["gpt2"]()
    config.scale_attn_by_inverse_layer_idx = True
    model = AutoModelForCausalLM.from_config(config)
    before = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        remove_blocks(model, [1])
    assert _snapshot(model) == before


def test_inconsistent_config_is_refused() -> None:
    model = build_tiny("llama")
    model.config.num_hidden_layers = DEPTH + 2
    with pytest.raises(UnsupportedModelError, match="declares"):
        remove_blocks(model, [1])
    assert len(get_blocks(model)) == DEPTH
