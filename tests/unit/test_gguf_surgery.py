"""GGUF in, GGUF out (lorp.gguf_surgery): block removal by surgery on the file, checked by
reading the file back with gguf's reader and loading it with transformers' GGUF reader.

The fast tests use a tiny random Llama written as a GGUF here (mixed quantization types,
including Q6_K, which gguf cannot quantize); one slow test prunes the bundled SmolLM2 Q4_1 GGUF.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import (
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFReader,
    GGUFWriter,
    get_tensor_name_map,
    quantize,
)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorp.compensation import Compensation, apply_compensation
from lorp.errors import InvalidInputError, ModelLoadError, UnsupportedModelError
from lorp.gguf_surgery import (
    REMOVED_LAYERS_KEY,
    check_gguf_surgery,
    fold_roles,
    folded_tensors,
    write_pruned_gguf,
)
from lorp.surgery import remove_blocks
from lorp.temperature import Temperature

Q = GGMLQuantizationType
DEPTH = 6
INTERMEDIATE = 256  # a multiple of 256, so ffn_down rows can be Q6_K
# The type each role is stored as (blocks 1, 3, 5 keep ffn_down in Q6_K, as Q4_K_M files do).
ROLE_TYPES: dict[str, GGMLQuantizationType] = {
    "token_embd.weight": Q.Q8_0,
    "output.weight": Q.Q4_0,
    "output_norm.weight": Q.F32,
    "attn_norm.weight": Q.F32,
    "ffn_norm.weight": Q.F32,
    "attn_q.weight": Q.Q4_1,
    "attn_k.weight": Q.Q5_0,
    "attn_v.weight": Q.Q5_1,
    "attn_output.weight": Q.Q8_0,
    "ffn_gate.weight": Q.F16,
    "ffn_up.weight": Q.BF16,
    "ffn_down.weight": Q.Q4_1,
}
Q6K_BLOCKS = (1, 3, 5)
CONFIG: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": INTERMEDIATE,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.2,  # peaked logits, as in tests.tiny_models
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of attn_q/attn_k rows (written independently
    of the module under test)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _q6k_bytes(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid Q6_K data (ql, qh, int8 scales, fp16 d per 256 values) with small weights."""
    blocks = rows * cols // 256
    ql = rng.integers(0, 256, (blocks, 128), dtype=np.uint8)
    qh = rng.integers(0, 256, (blocks, 64), dtype=np.uint8)
    scales = rng.integers(-4, 5, (blocks, 16)).astype(np.int8).view(np.uint8)
    d = np.full((blocks, 1), 0.002, dtype=np.float16).view(np.uint8)
    return np.concatenate([ql, qh, scales, d], axis=1).reshape(rows, cols // 256 * 210)


def _write_tiny_gguf(
    path: Path,
    *,
    depth: int = DEPTH,
    extra: Callable[[GGUFWriter], None] | None = None,
) -> None:
    """A tiny random Llama (seeded) as a GGUF with the types of ROLE_TYPES."""
    config = LlamaConfig(**CONFIG, num_hidden_layers=depth)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    heads, kv_heads = int(CONFIG["num_attention_heads"]), int(CONFIG["num_key_value_heads"])
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, depth)
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    w.add_block_count(depth)
    w.add_context_length(CONFIG["max_position_embeddings"])
    w.add_embedding_length(CONFIG["hidden_size"])
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)  # LlamaConfig's default rope_theta
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(CONFIG["vocab_size"])
    w.add_rope_dimension_count(CONFIG["hidden_size"] // heads)
    w.add_file_type(3)  # MOSTLY_Q4_1
    if extra is not None:
        extra(w)
    for hf_name, param in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = f"{names.get_name(base)}.{suffix}"
        block = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None
        role = gguf_name if block is None else gguf_name.split(".", 2)[2]
        value = param.detach().float().numpy()
        if role == "attn_q.weight":
            value = _permute(value, heads, heads)
        elif role == "attn_k.weight":
            value = _permute(value, heads, kv_heads)
        qtype = ROLE_TYPES[role]
        if role == "ffn_down.weight" and block in Q6K_BLOCKS:
            data, qtype = _q6k_bytes(value.shape[0], value.shape[1], rng), Q.Q6_K
        else:
            data = quantize(value, qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _per_layer_metadata(w: GGUFWriter) -> None:
    w.add_array("llama.lorp_test.per_layer_u32", [10, 11, 12, 13, 14, 15])
    w.add_array("llama.lorp_test.per_layer_str", ["a", "b", "c", "d", "e", "f"])
    w.add_array("llama.lorp_test.not_per_layer", [1, 2, 3])
    w.add_array("general.tags", ["t0", "t1", "t2", "t3", "t4", "t5"])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    _write_tiny_gguf(path, extra=_per_layer_metadata)
    return path


def _load(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)


def _logits(model: Any) -> torch.Tensor:
    ids = torch.arange(3, 3 + 40).reshape(2, 20) % 128
    with torch.no_grad():
        return model(ids).logits.float()


def _raw(reader: GGUFReader, name: str) -> bytes:
    t = next(t for t in reader.tensors if t.name == name)
    return bytes(reader.data[t.data_offset : t.data_offset + t.n_bytes])


def _kv(reader: GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


# --------------------------------------------------------------------------------------------
# the file


def test_removes_renumbers_and_copies_bytes(tiny_gguf: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pruned.gguf"
    result = write_pruned_gguf(tiny_gguf, dst, [1, 3])
    src, out = GGUFReader(tiny_gguf), GGUFReader(dst)

    assert _kv(out, "llama.block_count") == DEPTH - 2
    assert result.block_count_in == DEPTH and result.block_count_out == DEPTH - 2
    assert result.removed == [1, 3] and result.requantized == []
    # Renamed in order: kept blocks 0, 2, 4, 5 become 0, 1, 2, 3; every byte and type kept.
    rename = {0: 0, 2: 1, 4: 2, 5: 3}
    expected = []
    for t in src.tensors:
        if t.name.startswith("blk."):
            _, b, rest = t.name.split(".", 2)
            if int(b) not in rename:
                continue
            expected.append((t.name, f"blk.{rename[int(b)]}.{rest}"))
        else:
            expected.append((t.name, t.name))
    assert [t.name for t in out.tensors] == [new for _, new in expected]
    assert result.tensors_out == result.tensors_copied == len(expected)
    for (old, new), t in zip(expected, out.tensors, strict=True):
        s = next(x for x in src.tensors if x.name == old)
        assert t.tensor_type == s.tensor_type and list(t.shape) == list(s.shape)
        assert _raw(out, new) == _raw(src, old), new
        assert (t.data_offset - out.data_offset) % out.alignment == 0
    assert out.alignment == src.alignment

    # Metadata: all copied, block count and per-layer arrays changed, the removal recorded.
    assert _kv(out, "llama.lorp_test.per_layer_u32") == [10, 12, 14, 15]
    assert _kv(out, "llama.lorp_test.per_layer_str") == ["a", "c", "e", "f"]
    assert _kv(out, "llama.lorp_test.not_per_layer") == [1, 2, 3]
    assert _kv(out, "general.tags") == ["t0", "t1", "t2", "t3", "t4", "t5"]  # not under llama.
    assert _kv(out, REMOVED_LAYERS_KEY) == [1, 3]
    changed = {
        "llama.block_count",
        "llama.lorp_test.per_layer_u32",
        "llama.lorp_test.per_layer_str",
        REMOVED_LAYERS_KEY,
    }
    assert set(result.metadata_changed) == changed
    for key, f in src.fields.items():
        if key.startswith("GGUF.") or key in changed:
            continue
        g = out.fields[key]
        assert g.types == f.types and g.contents() == f.contents(), key
    assert [k for k in out.fields if k != REMOVED_LAYERS_KEY] == list(src.fields)

    # Size: the input less the removed blocks' data (up to alignment and the tensor infos).
    block_bytes = sum(t.n_bytes for t in src.tensors if t.name.startswith(("blk.1.", "blk.3.")))
    assert result.bytes_in == tiny_gguf.stat().st_size
    assert result.bytes_out == dst.stat().st_size
    expected_size = result.bytes_in - block_bytes
    assert abs(result.bytes_out - expected_size) < 64 * len(src.tensors)


def test_removing_again_records_original_numbering(tiny_gguf: Path, tmp_path: Path) -> None:
    first = tmp_path / "a.gguf"
    write_pruned_gguf(tiny_gguf, first, [1, 3])
    second = tmp_path / "b.gguf"
    write_pruned_gguf(first, second, [2])  # block 2 of the pruned file was block 4
    out = GGUFReader(second)
    assert _kv(out, REMOVED_LAYERS_KEY) == [1, 3, 4]
    assert _kv(out, "llama.block_count") == 3
    assert _kv(out, "llama.lorp_test.per_layer_u32") == [10, 12, 15]


def test_pruned_gguf_loads_with_the_in_memory_pruned_logits(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    dst = tmp_path / "pruned.gguf"
    write_pruned_gguf(tiny_gguf, dst, [1, 3])
    model = _load(tiny_gguf)
    remove_blocks(model, [1, 3])
    pruned = _load(dst)
    assert pruned.config.num_hidden_layers == DEPTH - 2
    # Same de-quantized weights, same graph: the logits are bit-equal.
    assert torch.equal(_logits(pruned), _logits(model))
    # A KV-cache generation runs too.
    out = pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


def test_pruned_gguf_runs_in_bfloat16(tiny_gguf: Path, tmp_path: Path) -> None:
    dst = tmp_path / "pruned.gguf"
    write_pruned_gguf(tiny_gguf, dst, [2, 4])
    model = _load(dst, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    logits = _logits(model)
    reference = _logits(_load(dst))
    assert torch.isfinite(logits).all()
    assert (logits - reference).norm() / reference.norm() < 0.05


# --------------------------------------------------------------------------------------------
# replaced (folded) tensors


def _folded_values(model: Any) -> dict[str, torch.Tensor]:
    """New values for three tensors of the pruned model, as a fold would change them."""
    g = torch.Generator().manual_seed(1)
    sd = model.state_dict()
    down = sd["model.layers.0.mlp.down_proj.weight"]  # Q4_1 in the file
    q = sd["model.layers.1.self_attn.q_proj.weight"]  # Q4_1, rows permuted in the file
    t = torch.eye(down.shape[0]) + 0.05 * torch.randn(down.shape[0], down.shape[0], generator=g)
    return {
        "model.layers.0.mlp.down_proj.weight": t.T @ down,
        "model.layers.1.self_attn.q_proj.weight": q + 0.02 * torch.randn(q.shape, generator=g),
        "model.norm.weight": sd["model.norm.weight"] * 1.3,  # F32: a temperature
    }


def test_replaced_tensors_are_requantized_to_their_type(tiny_gguf: Path, tmp_path: Path) -> None:
    model = _load(tiny_gguf)
    remove_blocks(model, [2, 3])
    values = _folded_values(model)
    dst = tmp_path / "folded.gguf"
    result = write_pruned_gguf(tiny_gguf, dst, [2, 3], replaced=values)

    records = {r.name: r for r in result.requantized}
    assert set(records) == {"blk.0.ffn_down.weight", "blk.1.attn_q.weight", "output_norm.weight"}
    assert {n: (r.original_type, r.written_type, r.fallback) for n, r in records.items()} == {
        "blk.0.ffn_down.weight": ("Q4_1", "Q4_1", False),
        "blk.1.attn_q.weight": ("Q4_1", "Q4_1", False),
        "output_norm.weight": ("F32", "F32", False),
    }
    assert {r.given_as for r in records.values()} == set(values)
    assert records["output_norm.weight"].relative_error == 0.0
    assert 0 < records["blk.0.ffn_down.weight"].relative_error < 0.1
    assert result.tensors_copied == result.tensors_out - 3

    src, out = GGUFReader(tiny_gguf), GGUFReader(dst)
    for t in out.tensors:
        old = t.name
        if t.name.startswith("blk."):
            _, b, rest = t.name.split(".", 2)
            old = f"blk.{[0, 1, 4, 5][int(b)]}.{rest}"
        s = next(x for x in src.tensors if x.name == old)
        assert t.tensor_type == s.tensor_type, t.name
        if t.name not in records:
            assert _raw(out, t.name) == _raw(src, old), t.name

    reloaded = _load(dst)
    sd = reloaded.state_dict()
    for name, value in values.items():
        record = next(r for r in result.requantized if r.given_as == name)
        # The reloaded tensor is the given one up to exactly the recorded quantization error
        # (a wrong rotary permutation of q_proj would show as an error near 1.4).
        error = float((sd[name] - value).norm() / value.norm())
        assert error == pytest.approx(record.relative_error, rel=1e-4, abs=1e-7), name

    # Everything else unchanged: the in-memory model holding the reloaded values gives the
    # reloaded model's logits bit for bit; holding the exact values, within the quantization
    # error of the re-quantized tensors.
    with torch.no_grad():
        for name, value in values.items():
            model.state_dict()[name].copy_(value)
    exact = _logits(model)
    with torch.no_grad():
        for name in values:
            model.state_dict()[name].copy_(sd[name])
    assert torch.equal(_logits(reloaded), _logits(model))
    worst = max(r.relative_error for r in result.requantized)
    assert (_logits(reloaded) - exact).norm() / exact.norm() < 2 * worst


def test_gguf_and_hf_names_write_the_same_file(tiny_gguf: Path, tmp_path: Path) -> None:
    model = _load(tiny_gguf)
    remove_blocks(model, [2, 3])
    values = _folded_values(model)
    heads = model.config.num_attention_heads
    by_gguf = {
        "blk.0.ffn_down.weight": values["model.layers.0.mlp.down_proj.weight"].numpy(),
        "blk.1.attn_q.weight": _permute(
            values["model.layers.1.self_attn.q_proj.weight"].numpy(), heads, heads
        ),
        "output_norm.weight": values["model.norm.weight"].numpy(),
    }
    a, b = tmp_path / "hf.gguf", tmp_path / "gguf.gguf"
    write_pruned_gguf(tiny_gguf, a, [2, 3], replaced=values)
    write_pruned_gguf(tiny_gguf, b, [2, 3], replaced=by_gguf)
    assert a.read_bytes() == b.read_bytes()


def test_unquantizable_type_falls_back_to_q8_0(tiny_gguf: Path, tmp_path: Path) -> None:
    # Kept block 1 (input block 1) stores ffn_down as Q6_K, which gguf cannot quantize.
    model = _load(tiny_gguf)
    remove_blocks(model, [4])
    down = model.state_dict()["model.layers.1.mlp.down_proj.weight"]
    values = {"model.layers.1.mlp.down_proj.weight": down * 0.9}

    plan = check_gguf_surgery(tiny_gguf, fold_targets=fold_roles(compensate=True))
    assert plan.fallbacks == {f"blk.{b}.ffn_down.weight": "Q6_K -> Q8_0" for b in Q6K_BLOCKS}
    assert plan.fold_requantize["blk.0.ffn_down.weight"] == "Q4_1"
    with pytest.raises(UnsupportedModelError, match=r"cannot quantize.*Q6_K -> Q8_0"):
        check_gguf_surgery(
            tiny_gguf, fold_targets=fold_roles(compensate=True), allow_fallback=False
        )
    refused = tmp_path / "refused.gguf"
    with pytest.raises(UnsupportedModelError, match="Q6_K"):
        write_pruned_gguf(tiny_gguf, refused, [4], replaced=values, allow_fallback=False)
    assert not refused.exists() and list(tmp_path.iterdir()) == []

    dst = tmp_path / "fallback.gguf"
    result = write_pruned_gguf(tiny_gguf, dst, [4], replaced=values)
    (record,) = result.requantized
    assert (record.name, record.original_type, record.written_type, record.fallback) == (
        "blk.1.ffn_down.weight",
        "Q6_K",
        "Q8_0",
        True,
    )
    assert result.fallbacks == [record]
    assert record.bytes_out > record.bytes_in  # Q8_0 is larger than Q6_K
    out = GGUFReader(dst)
    assert next(t for t in out.tensors if t.name == "blk.1.ffn_down.weight").tensor_type == Q.Q8_0
    reloaded = _load(dst).state_dict()["model.layers.1.mlp.down_proj.weight"]
    error = float((reloaded - values["model.layers.1.mlp.down_proj.weight"]).norm())
    assert error / float(values["model.layers.1.mlp.down_proj.weight"].norm()) < 0.01


def test_folded_tensors_of_a_compensated_pruned_model(tiny_gguf: Path, tmp_path: Path) -> None:
    """The wiring as the pipeline would do it: fold, remove, collect, write, reload."""
    model = _load(tiny_gguf)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(2)
    maps = {  # float64, as lorp.compensation fits them
        b: torch.eye(hidden, dtype=torch.float64)
        + 0.05 * torch.randn(hidden, hidden, generator=g, dtype=torch.float64)
        for b in (0, 3)
    }
    compensation = Compensation(
        removed=[1, 4],
        maps=maps,
        ridge=0.0,
        tokens=0,
        temperature=Temperature(scale=1.25, nll_before=1.0, nll_after=0.9, predictions=10),
    )
    apply_compensation(model, compensation)
    remove_blocks(model, [1, 4])
    replaced = folded_tensors(model, compensation)
    # Block 3 is block 2 once block 1 is gone.
    assert set(replaced) == {
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
        "model.norm.weight",
    }
    dst = tmp_path / "compensated.gguf"
    result = write_pruned_gguf(tiny_gguf, dst, [1, 4], replaced=replaced)
    assert {r.name: r.written_type for r in result.requantized} == {
        "blk.0.ffn_down.weight": "Q4_1",
        "blk.2.ffn_down.weight": "Q8_0",  # input block 3: Q6_K, the fallback
        "output_norm.weight": "F32",
    }
    exact = _logits(model)
    pruned = _load(dst)
    reloaded = _logits(pruned)
    worst = max(r.relative_error for r in result.requantized)
    assert (reloaded - exact).norm() / exact.norm() < 2 * worst
    # Bit-equal once the in-memory model holds the re-quantized values.
    with torch.no_grad():
        for name in replaced:
            model.state_dict()[name].copy_(pruned.state_dict()[name])
    assert torch.equal(_logits(model), reloaded)
    assert folded_tensors(model, None) == {}


def test_bad_replaced_tensors_are_refused_before_writing(tiny_gguf: Path, tmp_path: Path) -> None:
    dst = tmp_path / "x.gguf"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model.layers.9.mlp.down_proj.weight": np.zeros((32, 256))}, "neither"),
        ({"blk.4.ffn_down.weight": np.zeros((32, 256))}, "neither"),  # only 4 blocks remain
        ({"not.a.tensor": np.zeros(3)}, "neither"),
        ({"output_norm.weight": np.zeros(5)}, "shape"),
        ({"output_norm.weight": np.full(32, np.nan)}, "non-finite"),
        (
            {"output_norm.weight": np.ones(32), "model.norm.weight": np.ones(32)},
            "both replace output_norm.weight",
        ),
    ]
    for replaced, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            write_pruned_gguf(tiny_gguf, dst, [1, 2], replaced=replaced)
        assert not dst.exists()


# --------------------------------------------------------------------------------------------
# refusals


def test_bad_removals_and_paths_are_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    dst = tmp_path / "x.gguf"
    cases: list[tuple[list[Any], str]] = [
        ([6], "out of range"),
        ([0, 1, 2, 3, 4, 5], "cannot remove all"),
        ([1, 1], "duplicate"),
        ([], "no blocks"),
        ([1.0], "not an integer"),
    ]
    for removed, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            write_pruned_gguf(tiny_gguf, dst, removed)
        with pytest.raises(InvalidInputError, match=message):
            check_gguf_surgery(tiny_gguf, removed)
    assert not dst.exists()
    with pytest.raises(InvalidInputError, match="overwrite the input"):
        write_pruned_gguf(tiny_gguf, tiny_gguf, [1])
    with pytest.raises(InvalidInputError, match="not a directory"):
        write_pruned_gguf(tiny_gguf, tmp_path / "missing" / "x.gguf", [1])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        check_gguf_surgery(junk)
    with pytest.raises(ModelLoadError, match="no such GGUF"):
        check_gguf_surgery(tmp_path / "absent.gguf")
    assert not dst.exists()


def _fake_gguf(
    path: Path,
    arch: str,
    depth: int,
    blocks: Sequence[int],
    extra: Callable[[GGUFWriter], None] | None = None,
) -> Path:
    """Metadata and one small F32 tensor per listed block (not a loadable model)."""
    w = GGUFWriter(path, arch)
    w.add_block_count(depth)
    if extra is not None:
        extra(w)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    for b in blocks:
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.full(8, b, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_architecture_is_refused_before_writing(tmp_path: Path) -> None:
    src = _fake_gguf(tmp_path / "mamba.gguf", "mamba", 4, range(4))
    dst = tmp_path / "out.gguf"
    with pytest.raises(UnsupportedModelError, match="does not know architecture 'mamba'"):
        check_gguf_surgery(src)
    with pytest.raises(UnsupportedModelError, match=r"supported: .*llama"):
        write_pruned_gguf(src, dst, [1])
    assert not dst.exists()


def test_unidentifiable_blocks_are_refused(tmp_path: Path) -> None:
    missing = _fake_gguf(tmp_path / "missing.gguf", "llama", 4, [0, 1, 3])
    with pytest.raises(UnsupportedModelError, match=r"blocks \[2\] have no blk"):
        check_gguf_surgery(missing)
    beyond = _fake_gguf(tmp_path / "beyond.gguf", "qwen2", 3, [0, 1, 2, 3])
    with pytest.raises(UnsupportedModelError, match=r"belongs to block 3 but qwen2\.block_count"):
        check_gguf_surgery(beyond)
    no_count = tmp_path / "nocount.gguf"
    w = GGUFWriter(no_count, "llama")
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="block_count is missing"):
        check_gguf_surgery(no_count)


def test_gemma3_removal_must_keep_the_sliding_pattern(tmp_path: Path) -> None:
    src = _fake_gguf(tmp_path / "gemma3.gguf", "gemma3", 12, range(12))
    assert check_gguf_surgery(src).swa_period == 6
    dst = tmp_path / "out.gguf"
    # Removing block 5 (global) moves sliding block 6 to global position 5.
    with pytest.raises(UnsupportedModelError, match=r"sliding-window.*6->5"):
        write_pruned_gguf(src, dst, [5])
    with pytest.raises(UnsupportedModelError, match="multiple of 6"):
        check_gguf_surgery(src, [1, 2])
    assert not dst.exists()
    # A run of six blocks keeps every kept block's kind.
    result = write_pruned_gguf(src, dst, [6, 7, 8, 9, 10, 11])
    assert result.block_count_out == 6
    out = GGUFReader(dst)
    assert [t.name for t in out.tensors][2:] == [f"blk.{b}.attn_norm.weight" for b in range(6)]
    # An explicit integer pattern in the metadata sets the period for any architecture.
    pattern = _fake_gguf(
        tmp_path / "pattern.gguf",
        "qwen3",
        8,
        range(8),
        extra=lambda w: w.add_sliding_window_pattern(4),
    )
    assert check_gguf_surgery(pattern).swa_period == 4
    with pytest.raises(UnsupportedModelError, match="multiple of 4"):
        check_gguf_surgery(pattern, [0])
    assert check_gguf_surgery(pattern, [4, 5, 6, 7]).keep == (0, 1, 2, 3)


def test_llama_permutation_matches_transformers_reader() -> None:
    """The HF -> GGUF layout of attn_q/attn_k is the inverse of transformers' GGUF reader."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from lorp.gguf_surgery import _llama_permute

    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((32, 32)), rng.standard_normal((16, 32))
    back_q = processor.process(_llama_permute(q, 4, 4), "blk.0.attn_q.weight").weights
    back_k = processor.process(_llama_permute(k, 4, 2), "blk.0.attn_k.weight").weights
    assert np.array_equal(back_q, q) and np.array_equal(back_k, k)


def test_gemma_norms_are_stored_plus_one(tmp_path: Path) -> None:
    """Gemma's GGUF norms hold 1 + w; transformers' reader subtracts the 1 again."""
    from transformers.modeling_gguf_pytorch_utils import Gemma2TensorProcessor

    src = _fake_gguf(tmp_path / "gemma2.gguf", "gemma2", 4, range(4))
    norm = np.linspace(-0.5, 0.5, 8, dtype=np.float32)
    dst = tmp_path / "out.gguf"
    replaced = {"model.norm.weight": norm, "model.layers.1.input_layernorm.weight": norm * 2}
    write_pruned_gguf(src, dst, [2, 3], replaced=replaced)
    out = GGUFReader(dst)
    processor = Gemma2TensorProcessor()
    for name, value in [("output_norm.weight", norm), ("blk.1.attn_norm.weight", norm * 2)]:
        stored = next(t for t in out.tensors if t.name == name).data
        assert np.array_equal(stored, value + 1)
        assert np.allclose(processor.process(stored, name).weights, value, atol=1e-7)


def test_check_reads_metadata_only(tiny_gguf: Path) -> None:
    plan = check_gguf_surgery(tiny_gguf, [0, 5])
    assert plan.architecture == "llama" and plan.block_count == DEPTH
    assert plan.keep == (1, 2, 3, 4) and plan.removed == (0, 5)
    assert plan.file_type == "MOSTLY_Q4_1"
    assert plan.per_layer_keys == (
        "llama.lorp_test.per_layer_u32",
        "llama.lorp_test.per_layer_str",
    )
    assert plan.tensor_types["Q6_K"] == len(Q6K_BLOCKS)
    assert plan.to_dict()["keep"] == [1, 2, 3, 4]


def test_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lorp.gguf_surgery; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# the bundled model


@pytest.mark.slow
def test_bundled_smollm2_q4_1(tmp_path: Path) -> None:
    from lorp.loading import bundled_model_path

    src = bundled_model_path()
    removed = [20, 21, 22, 23, 24, 25]
    dst = tmp_path / "pruned.gguf"
    result = write_pruned_gguf(src, dst, removed)
    a, b = GGUFReader(src), GGUFReader(dst)
    assert _kv(b, "llama.block_count") == 24 and result.file_type == "MOSTLY_Q4_1"
    assert result.tensors_in == 272 and result.tensors_out == 272 - 6 * 9
    removed_bytes = sum(
        t.n_bytes for t in a.tensors if t.name.startswith(tuple(f"blk.{i}." for i in removed))
    )
    assert abs(result.bytes_out - (result.bytes_in - removed_bytes)) < 64 * 272
    for t in b.tensors:
        old = t.name
        if old.startswith("blk."):
            _, i, rest = old.split(".", 2)
            old = f"blk.{int(i) + (6 if int(i) >= 20 else 0)}.{rest}"
        assert _raw(b, t.name) == _raw(a, old)
    model = _load(src)
    remove_blocks(model, removed)
    assert torch.equal(_logits(_load(dst)), _logits(model))
