"""What a prune writes (issue 21 items 1, 2, 4, 5; issue 20 item 1, dtype): dtype "auto", the
input's precision kept, GGUF in -> GGUF out (checked before any compute), the model card, and
reports titled with the model's name."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from gguf import GGUFReader, GGUFWriter
from transformers import AutoModelForCausalLM

import lorp.gguf_surgery
import lorp.loading
from lorp.cli import main
from lorp.errors import InvalidInputError, UnsupportedModelError
from lorp.loading import choose_dtype, estimate_weight_bytes, load_model, model_name
from lorp.outputs import plan_outputs
from lorp.pipeline import PruneConfig, run_pipeline
from tests.tiny_gguf import write_tiny_gguf
from tests.tiny_models import DEPTH, TINY_TEXT, build_tiny, tiny_tokenizer

CONFIG = {"windows": 4, "seq_len": 32, "eval_windows": 2, "eval_seq_len": 32}


def _config(**kw: Any) -> PruneConfig:
    return PruneConfig(**{"num_remove": 2, "holdout_windows": 2, **CONFIG, **kw})


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models") / "tiny-bf16"
    build_tiny("llama", dtype=torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(TINY_TEXT)
    return p


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header bytes incl. the length prefix, header) of a safetensors file, read by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8 : 8 + n])


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    front, _, body = card[4:].partition("\n---\n")
    assert body.strip()
    data = yaml.safe_load(front)
    assert isinstance(data, dict)
    return data


# -- dtype auto ----------------------------------------------------------------------------------


def test_auto_dtype_is_the_config_dtype(bf16_dir: Path, tiny_dir: Path) -> None:
    assert choose_dtype(bf16_dir) == ("bfloat16", "config dtype")
    assert choose_dtype(tiny_dir) == ("float32", "config dtype")
    assert choose_dtype(bf16_dir, dtype="float32") == ("float32", "requested")
    loaded = load_model(bf16_dir, device="cpu")
    assert loaded.model.dtype == torch.bfloat16
    assert (loaded.dtype, loaded.dtype_source, loaded.weights_dtype) == (
        "bfloat16",
        "config dtype",
        "bfloat16",
    )
    # an older config naming it torch_dtype; none at all: the safetensors headers decide
    legacy = json.loads((bf16_dir / "config.json").read_text())
    legacy["torch_dtype"] = legacy.pop("dtype")
    folder = bf16_dir.parent / "legacy"
    folder.mkdir()
    for f in bf16_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "config.json").write_text(json.dumps(legacy))
    assert choose_dtype(folder) == ("bfloat16", "config torch_dtype")
    del legacy["torch_dtype"]
    (folder / "config.json").write_text(json.dumps(legacy))
    assert choose_dtype(folder) == ("bfloat16", "safetensors headers")
    numel = sum(p.numel() for p in build_tiny("llama").parameters())
    assert estimate_weight_bytes(bf16_dir) == numel * 2  # auto: bf16, as loaded
    assert estimate_weight_bytes(bf16_dir, dtype="float32") == numel * 4


def test_auto_dtype_of_a_gguf_on_cpu_is_float32(tiny_gguf: Path) -> None:
    assert choose_dtype(tiny_gguf, device="cpu") == ("float32", "GGUF on cpu")
    assert choose_dtype(tiny_gguf.parent, gguf_file=tiny_gguf.name, device="cpu")[0] == "float32"
    assert estimate_weight_bytes(tiny_gguf, device="cpu") == estimate_weight_bytes(
        tiny_gguf, dtype="float32"
    )
    loaded = load_model(tiny_gguf, device="cpu")
    assert loaded.model.dtype == torch.float32 and loaded.dtype_source == "GGUF on cpu"


def test_the_report_records_the_dtype_and_why(bf16_dir: Path, calib: Path, tmp_path: Path) -> None:
    out = run_pipeline(bf16_dir, calib, tmp_path / "out", _config(), device="cpu")
    model = out.report["model"]
    assert (model["dtype"], model["dtype_source"]) == ("bfloat16", "config dtype")
    assert out.report["environment"]["dtype"] == "bfloat16"


# -- precision preserved -------------------------------------------------------------------------


def test_bf16_input_computed_in_float32_is_saved_in_bf16(
    bf16_dir: Path, calib: Path, tmp_path: Path
) -> None:
    out = run_pipeline(bf16_dir, calib, tmp_path / "out", _config(), dtype="float32", device="cpu")
    assert (out.report["model"]["dtype"], out.report["model"]["dtype_source"]) == (
        "float32",
        "requested",
    )
    removed = out.result.removed
    assert len(removed) == 2
    src = bf16_dir / "model.safetensors"
    dst = out.checkpoint_dir / "model.safetensors"
    src_header_bytes, src_header = _header(src)
    dst_header_bytes, dst_header = _header(dst)
    assert {v["dtype"] for k, v in dst_header.items() if k != "__metadata__"} == {"BF16"}

    # Expected size, from the input's header alone: its data less the removed fraction of the
    # block weights (every block has the same tensors).
    def size(info: dict[str, Any]) -> int:
        return int(info["data_offsets"][1] - info["data_offsets"][0])

    tensors = {k: v for k, v in src_header.items() if k != "__metadata__"}
    data_in = src.stat().st_size - src_header_bytes
    assert data_in == sum(size(v) for v in tensors.values())
    blocks = sum(size(v) for k, v in tensors.items() if k.startswith("model.layers."))
    expected = data_in - blocks * len(removed) / DEPTH
    assert dst.stat().st_size - dst_header_bytes == expected
    assert out.report["artifacts"]["safetensors"]["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out.checkpoint_dir)
    assert reloaded.dtype == torch.bfloat16
    assert json.loads((out.checkpoint_dir / "config.json").read_text())["dtype"] == "bfloat16"


# -- GGUF in, GGUF out ---------------------------------------------------------------------------


def test_lorp_prune_of_a_gguf_writes_a_gguf_that_loads_and_generates(
    tiny_gguf: Path, calib: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "DIR"
    argv = ["prune", "--model", str(tiny_gguf), "--calibration", str(calib), "--remove", "1"]
    argv += ["--out", str(out), "--windows", "4", "--seq-len", "32", "--no-bench", "--quiet"]
    assert main(argv) == 0
    written = sorted((out / "model").glob("*.gguf"))
    assert [p.name for p in written] == [tiny_gguf.name]
    assert not list((out / "model").glob("*.safetensors"))  # default: the input's format
    reader = GGUFReader(written[0])
    assert reader.fields["llama.block_count"].contents() == DEPTH - 1
    src_types = {t.tensor_type for t in GGUFReader(tiny_gguf).tensors}
    assert {t.tensor_type for t in reader.tensors} == src_types  # the input's quantization
    model = AutoModelForCausalLM.from_pretrained(out / "model", gguf_file=tiny_gguf.name)
    assert model.config.num_hidden_layers == DEPTH - 1
    ids = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)

    report = json.loads((out / "report.json").read_text())
    gguf = report["artifacts"]["gguf"]
    assert gguf["bytes_out"] == written[0].stat().st_size
    assert gguf["bytes_in"] == tiny_gguf.stat().st_size
    assert gguf["path"] == f"model/{tiny_gguf.name}" and gguf["requantized"] == []
    assert report["artifacts"]["formats"] == ["gguf"] and report["artifacts"]["requested"] is None
    assert (report["model"]["dtype"], report["model"]["dtype_source"]) == (
        "float32",
        "GGUF on cpu",
    )
    assert str(tmp_path) not in json.dumps(report["artifacts"])
    # the title names the model, not a path
    md = (out / "report.md").read_text()
    assert md.splitlines()[0] == "# LoRP pruning report — tiny-llama.Q8_0"
    assert (
        "<title>LoRP pruning report — tiny-llama.Q8_0</title>" in (out / "report.html").read_text()
    )
    card = (out / "model" / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model"] == str(tiny_gguf)
    assert front["tags"][:3] == ["pruned", "depth-pruning", "lorp"] and "gguf" in front["tags"]
    assert front["library_name"] == "transformers"
    assert "`lorp prune --model" in card
    assert f"gguf: {written[0]}" in capsys.readouterr().out


def test_both_formats_when_asked(tiny_gguf: Path, calib: Path, tmp_path: Path) -> None:
    out = run_pipeline(
        tiny_gguf,
        calib,
        tmp_path / "out",
        _config(num_remove=1),
        device="cpu",
        output_formats=["safetensors", "gguf"],
    )
    names = {p.name for p in out.checkpoint_dir.iterdir()}
    assert {tiny_gguf.name, "model.safetensors", "config.json", "README.md"} <= names
    assert out.report["artifacts"]["formats"] == ["gguf", "safetensors"]
    assert AutoModelForCausalLM.from_pretrained(out.checkpoint_dir).config.num_hidden_layers == 5


def _unknown_arch_gguf(path: Path) -> Path:
    w = GGUFWriter(path, "lorp-unknown")
    w.add_block_count(2)
    w.add_tensor("blk.0.w.weight", torch.zeros(4).numpy())
    w.add_tensor("blk.1.w.weight", torch.zeros(4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_explicit_gguf_output_of_an_unsupported_file_fails_before_compute(
    tiny_dir: Path,
    calib: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    src = _unknown_arch_gguf(tmp_path / "odd.gguf")

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("loaded the model before checking the GGUF output")

    monkeypatch.setattr(lorp.loading, "load_model", no_loading)
    with pytest.raises(UnsupportedModelError, match="lorp-unknown"):
        plan_outputs(src, output_formats=["gguf"])
    argv = ["prune", "--model", str(src), "--calibration", str(calib), "--remove", "1"]
    argv += ["--out", str(tmp_path / "out"), "--output-format", "gguf", "--quiet"]
    assert main(argv) == 1
    assert "lorp-unknown" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # gguf asked for a safetensors input: refused before loading too
    with pytest.raises(InvalidInputError, match="needs a GGUF input"):
        run_pipeline(tiny_dir, calib, tmp_path / "o2", _config(), output_formats=["gguf"])


def test_default_gguf_output_falls_back_to_safetensors_with_the_reason(
    tiny_gguf: Path, calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an architecture the surgery does not know (but transformers loads)
    monkeypatch.setattr(lorp.gguf_surgery, "SUPPORTED_ARCHITECTURES", frozenset({"qwen2"}))
    out = run_pipeline(tiny_gguf, calib, tmp_path / "out", _config(num_remove=1), device="cpu")
    artifacts = out.report["artifacts"]
    assert artifacts["formats"] == ["safetensors"] and artifacts["gguf"] is None
    (note,) = artifacts["notes"]
    assert "GGUF output not possible" in note and "llama" in note
    assert (out.checkpoint_dir / "model.safetensors").is_file()
    assert not list(out.checkpoint_dir.glob("*.gguf"))
    assert "GGUF output not possible" in (out.checkpoint_dir / "README.md").read_text()


# -- model card and names ------------------------------------------------------------------------


def test_model_card_and_titles_name_what_the_user_gave(
    tiny_dir: Path, calib: Path, tmp_path: Path
) -> None:
    names = {"model": "s3://inputs/acme/models/tiny-llama", "calibration": "corpus:wiki"}
    out = run_pipeline(
        tiny_dir,
        calib,
        tmp_path / "out",
        _config(),
        device="cpu",
        source_names=names,
        made_by="LoRP service job j-123",
    )
    card = (out.checkpoint_dir / "README.md").read_text()
    front = _front_matter(card)
    assert front == {
        "base_model": "s3://inputs/acme/models/tiny-llama",
        "tags": ["pruned", "depth-pruning", "lorp"],
        "library_name": "transformers",
    }
    removed = out.result.removed
    for text in (
        "corpus:wiki",
        "LoRP service job j-123",
        f"RLS (representation locality score): {out.result.selection.rls:.3f}",
        "perplexity",
        f"{len(removed)} of its {DEPTH}",
    ):
        assert text in card, text
    assert out.report["model"]["name"] == "tiny-llama"
    md = (out.out_dir / "report.md").read_text()
    assert md.splitlines()[0] == "# LoRP pruning report — tiny-llama"
    for text in (card, md, (out.out_dir / "report.html").read_text()):
        assert str(tmp_path) not in text and str(tiny_dir) not in text


def test_model_name() -> None:
    assert model_name("s3://b/acme/models/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1"
    assert model_name("s3://b/acme/models/dir/", "m.Q8_0.gguf") == "m.Q8_0"
    assert model_name("hf:org/name") == "org/name"
    assert model_name("/data/models/tiny") == "tiny"
