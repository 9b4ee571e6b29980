"""Sequential onloading (issue 20 item 4, lorp.offload): the layer-wise passes give the in-memory
results (S, selections, perplexity, KL, top-1) on tiny models of several families in float32 and
bfloat16; a safetensors checkpoint loaded for sequential mode keeps its blocks on disk and never
has more than one block's weights materialised; "auto" picks the mode from the device's memory;
bad values and stages that cannot run layer-wise are refused before any window runs; the report
records the mode."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lorp import BenchmarkConfig, PruneConfig, prune
from lorp._blocks import get_blocks
from lorp.errors import InvalidInputError, UnsupportedModelError
from lorp.loading import load_model
from lorp.offload import (
    choose_offload,
    load_skeleton,
    onloader_of,
    parameter_bytes,
    prepare,
)
from lorp.pipeline import plan_offload, run_pipeline
from lorp.quality import compare_pruned
from lorp.report import job_summary, make_report
from lorp.selection import select_layers
from lorp.similarity import capture_similarity
from tests.tiny_models import DEPTH, FAMILIES, VOCAB, build_tiny, tiny_tokenizer

FAMILIES_TESTED = ("llama", "qwen2", "gemma3", "gpt2", "gpt_neox")
DTYPES = (torch.float32, torch.bfloat16)
BUDGETS = (1, 2, 3)
PPL_REL = 1e-4
S_ABS = 1e-5


def _windows(n: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _block_bytes(block: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in block.parameters())


def _materialised_block_bytes(model: nn.Module) -> int:
    return sum(
        p.numel() * p.element_size()
        for b in get_blocks(model)
        for p in b.parameters()
        if not p.is_meta
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES_TESTED)
def test_sequential_equals_in_memory(family: str, dtype: torch.dtype) -> None:
    """S, the selections at three budgets, and dense vs pruned quality (a block removed at the
    start, in the middle and the last) are the in-memory path's."""
    dense = build_tiny(family, dtype=dtype)
    layered = copy.deepcopy(dense)
    prepare(layered)
    calib, heldout = _windows(6, 16, 0), _windows(4, 16, 1)
    s_mem = capture_similarity(dense, calib, batch_size=2)
    s_seq = capture_similarity(layered, calib, batch_size=2)
    assert np.abs(s_mem - s_seq).max() <= S_ABS
    for k in BUDGETS:
        assert (
            select_layers(s_mem, k, method="lorp").removed
            == select_layers(s_seq, k, method="lorp").removed
        )
    removed = [0, 2, DEPTH - 1]
    mem = compare_pruned(dense, removed, heldout, batch_size=3)
    seq = compare_pruned(layered, removed, heldout, batch_size=3)
    for a, b in ((mem.dense, seq.dense), (mem.pruned, seq.pruned)):
        assert abs(a.ppl - b.ppl) <= PPL_REL * a.ppl
        assert a.tokens == b.tokens
    assert seq.kl == pytest.approx(mem.kl, rel=1e-6, abs=1e-9)
    assert seq.top1_agreement == mem.top1_agreement


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(FAMILIES_TESTED)))
def test_every_other_family_captures_the_same_s(family: str) -> None:
    dense = build_tiny(family, dtype=torch.bfloat16)
    layered = copy.deepcopy(dense)
    prepare(layered)
    calib = _windows(3, 12)
    assert np.abs(capture_similarity(dense, calib) - capture_similarity(layered, calib)).max() <= (
        S_ABS
    )
    mem, seq = compare_pruned(dense, [1, 4], calib), compare_pruned(layered, [1, 4], calib)
    assert seq.pruned.ppl == pytest.approx(mem.pruned.ppl, rel=PPL_REL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prune_sequential_matches_prune_in_memory(dtype: torch.dtype) -> None:
    """The whole prune (lorp, budget 2): same removed blocks, S, quality; the result says which
    mode ran."""
    results = {}
    for mode in ("none", "sequential"):
        model = build_tiny("qwen2", dtype=dtype)
        config = PruneConfig(num_remove=2, offload=mode, windows=4, seq_len=16)
        results[mode] = prune(
            model, tiny_tokenizer(), _windows(4, 16), config, evaluation=_windows(3, 16, 2)
        )
    mem, seq = results["none"], results["sequential"]
    assert seq.removed == mem.removed
    assert np.abs(seq.similarity - mem.similarity).max() <= S_ABS
    assert mem.quality is not None and seq.quality is not None
    assert seq.quality.pruned.ppl == pytest.approx(mem.quality.pruned.ppl, rel=PPL_REL)
    assert mem.offload is not None and seq.offload is not None
    assert (mem.offload["mode"], seq.offload["mode"]) == ("none", "sequential")
    assert seq.offload["weights"] == "host"
    assert num_blocks_of(seq.model) == DEPTH - 2


def num_blocks_of(model: nn.Module) -> int:
    return len(get_blocks(model))


# --- weights on disk --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GenerationConfig

    d = tmp_path_factory.mktemp("tiny-gemma3-bf16")
    build_tiny("gemma3", dtype=torch.bfloat16).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(d)
    return d


def test_skeleton_keeps_blocks_on_disk_and_one_block_materialised(bf16_dir: Path) -> None:
    """Loaded for sequential mode, every block parameter is a meta tensor; while the capture and
    the evaluation run, the materialised block weights (counted in every block's forward) never
    exceed one block; the results equal the model loaded whole."""
    loaded = load_model(bf16_dir, device="cpu", sequential=True)
    model = loaded.model
    assert all(p.is_meta for b in get_blocks(model) for p in b.parameters())
    whole = load_model(bf16_dir, device="cpu").model
    one_block = _block_bytes(get_blocks(whole)[0])
    seen: list[int] = []
    hooks = [
        b.register_forward_pre_hook(lambda *_: seen.append(_materialised_block_bytes(model)))
        for b in get_blocks(model)
    ]
    calib = _windows(5, 16)
    s_seq = capture_similarity(model, calib, batch_size=2)
    q_seq = compare_pruned(model, [1, 3], calib, batch_size=2)
    for h in hooks:
        h.remove()
    assert seen and max(seen) == one_block
    onloader = onloader_of(model)
    assert onloader is not None and onloader.weights == "disk"
    assert onloader.peak_bytes == one_block < parameter_bytes(whole)
    assert _materialised_block_bytes(model) == 0  # released again
    assert np.abs(s_seq - capture_similarity(whole, calib, batch_size=2)).max() <= S_ABS
    q_mem = compare_pruned(whole, [1, 3], calib, batch_size=2)
    assert q_seq.to_dict() == q_mem.to_dict()  # the same operations on the same values


def test_skeleton_refuses_foreign_tensor_names(tmp_path: Path) -> None:
    """A checkpoint whose tensor names are not the model's is not loaded as a skeleton (the
    loader then reads it into host memory)."""
    from safetensors.torch import load_file, save_file

    build_tiny("llama").save_pretrained(tmp_path)
    (f,) = tmp_path.glob("*.safetensors")
    save_file({f"x.{k}": v for k, v in load_file(f).items()}, f)
    assert load_skeleton(tmp_path, torch.float32, torch.device("cpu")) is None


def test_run_pipeline_sequential_from_disk(bf16_dir: Path, tmp_path: Path, text_file: Path) -> None:
    """`run_pipeline` with offload sequential: the same blocks, S and perplexity as offload none;
    the checkpoint (blocks read from disk to be saved) reloads with the logits of the in-memory
    pruned model; report.json, the human report and the job summary record the mode."""
    outs = {}
    for mode in ("none", "sequential"):
        config = PruneConfig(num_remove=2, offload=mode, windows=4, seq_len=16, holdout_windows=2)
        outs[mode] = run_pipeline(bf16_dir, text_file, tmp_path / mode, config, device="cpu")
    mem, seq = outs["none"], outs["sequential"]
    assert seq.result.removed == mem.result.removed
    assert np.abs(seq.result.similarity - mem.result.similarity).max() <= S_ABS
    assert seq.report["summary"]["ppl_pruned"] == pytest.approx(
        mem.report["summary"]["ppl_pruned"], rel=PPL_REL
    )
    offload = json.loads((seq.out_dir / "report.json").read_text())["model"]["offload"]
    assert offload["mode"] == "sequential" and offload["weights"] == "disk"
    assert offload["reason"] == "offload 'sequential' requested"
    assert "sequential onloading" in (seq.out_dir / "report.md").read_text()
    assert job_summary(seq.report)["offload"] == "sequential"
    assert job_summary(mem.report)["offload"] == "none"
    for name in ("config.json", "generation_config.json"):  # the checkpoint's own, both ways
        assert json.loads((seq.checkpoint_dir / name).read_text()) == json.loads(
            (mem.checkpoint_dir / name).read_text()
        )
    ids = _windows(2, 12, 5)
    a = load_model(seq.checkpoint_dir, device="cpu").model(ids).logits
    b = load_model(mem.checkpoint_dir, device="cpu").model(ids).logits
    assert torch.equal(a, b)


# --- choosing the mode -------------------------------------------------------------------------


def test_auto_picks_sequential_when_max_device_memory_is_below_the_weights() -> None:
    model = build_tiny("llama")
    weights = parameter_bytes(model)
    small = PruneConfig(num_remove=1, max_device_memory=weights // 2)
    decision = plan_offload(model, small)
    assert decision.mode == "sequential" and decision.requested == "auto"
    assert "exceed the max_device_memory" in decision.reason
    assert plan_offload(model, PruneConfig(num_remove=1, max_device_memory=100 * weights)).mode == (
        "none"
    )
    free = plan_offload(model, PruneConfig(num_remove=1))  # CPU without a limit: never
    assert free.mode == "none" and "no memory limit" in free.reason
    assert plan_offload(
        model, PruneConfig(num_remove=1, offload="none", max_device_memory=1)
    ).mode == ("none")
    result = prune(model, tiny_tokenizer(), _windows(3, 16), small, evaluation=_windows(2, 16, 1))
    assert result.offload is not None and result.offload["mode"] == "sequential"


def test_choose_offload_counts_the_margin() -> None:
    at = {"device": "cpu", "max_device_memory": 1000}
    assert choose_offload("auto", 900, **at).mode == "none"
    assert choose_offload("auto", 900, margin_bytes=200, **at).mode == "sequential"
    assert choose_offload("sequential", 1, **at).mode == "sequential"
    decision = choose_offload("auto", 900, margin_bytes=200, **at)
    assert (decision.needed_bytes, decision.device_bytes) == (1100, 1000)
    assert set(decision.to_dict()) >= {"mode", "requested", "reason", "weight_bytes"}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"offload": "disk"}, "offload must be one of none, sequential, auto"),
        ({"offload": None}, "offload must be one of"),
        ({"max_device_memory": 0}, "max_device_memory must be a positive number"),
        ({"max_device_memory": -5}, "max_device_memory must be a positive number"),
        ({"max_device_memory": True}, "max_device_memory must be a positive number"),
        ({"max_device_memory": "8GB"}, "max_device_memory must be a positive number"),
    ],
)
def test_bad_values_are_refused(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        PruneConfig(num_remove=1, **kwargs)


def test_cli_refuses_a_bad_offload(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorp.cli",
            "prune",
            "--model",
            "x",
            "--calibration",
            "x",
            "--remove",
            "1",
            "--out",
            str(tmp_path),
            "--offload",
            "disk",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "invalid choice: 'disk'" in proc.stderr


@pytest.mark.parametrize("method", ["sleb", "lorp-kl", "lorp-loss", "auto", "lorp-fold"])
def test_model_in_the_loop_methods_and_folds_match_in_memory(method: str) -> None:
    """The scoring passes, the compensation and temperature fits (lorp-fold) run with one block
    on the device at a time (weights in host memory) and choose and measure what the in-memory
    path does."""
    results = {}
    for mode in ("none", "sequential"):
        model = build_tiny("llama", dtype=torch.bfloat16)
        config = PruneConfig(
            method=method,
            num_remove=2,
            offload=mode,
            windows=6,
            seq_len=16,
            score_windows=2,
            score_seq_len=16,
            compensation_windows=3,
            compensation_tune_windows=1,
            temperature_windows=2,
        )
        results[mode] = prune(
            model, tiny_tokenizer(), _windows(8, 16), config, evaluation=_windows(2, 16, 3)
        )
    mem, seq = results["none"], results["sequential"]
    assert seq.removed == mem.removed
    assert mem.quality is not None and seq.quality is not None
    assert seq.quality.pruned.ppl == pytest.approx(mem.quality.pruned.ppl, rel=PPL_REL)
    assert seq.quality.top1_agreement == mem.quality.top1_agreement
    if mem.compensation is not None:
        assert seq.compensation is not None
        a, b = seq.compensation.to_dict(), mem.compensation.to_dict()
        a["tuning"].pop("seconds", None), b["tuning"].pop("seconds", None)  # wall time
        assert a == b
    assert seq.offload is not None and seq.offload["mode"] == "sequential"


def test_scoring_from_disk_keeps_one_block(bf16_dir: Path) -> None:
    """A model-in-the-loop method on a model whose blocks stay on disk: never more than one
    block materialised, the same choice as the model loaded whole."""
    model = load_model(bf16_dir, device="cpu", sequential=True).model
    whole = load_model(bf16_dir, device="cpu").model
    seen: list[int] = []
    for b in get_blocks(model):
        b.register_forward_pre_hook(lambda *_: seen.append(_materialised_block_bytes(model)))
    config = PruneConfig(method="lorp-loss", num_remove=2, windows=4, seq_len=16)
    config.score_windows, config.score_seq_len = 2, 16
    seq = prune(model, tiny_tokenizer(), _windows(6, 16), config)
    mem = prune(whole, tiny_tokenizer(), _windows(6, 16), config)
    assert seq.removed == mem.removed
    assert seen and max(seen) == _block_bytes(get_blocks(whole)[0])


def test_compensation_with_weights_on_disk_is_refused_before_any_window(bf16_dir: Path) -> None:
    model = load_model(bf16_dir, device="cpu", sequential=True).model
    calls: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))
    config = PruneConfig(num_remove=1, compensate=True)
    with pytest.raises(UnsupportedModelError, match="block weights stay on disk"):
        prune(model, tiny_tokenizer(), _windows(3, 16), config)
    assert not calls  # refused before the first window
    host = load_model(bf16_dir, device="cpu", sequential=True, keep_on_disk=False).model
    onloader = onloader_of(host)
    assert onloader is not None and onloader.weights == "host"


def test_job_spec_offload() -> None:
    from pydantic import ValidationError

    from jobcore.config import Settings
    from jobcore.spec import JobCreate

    body = {"model": "s3://inputs/acme/m", "calibration": "corpus:wiki", "budget": {"blocks": 2}}
    settings = Settings(  # type: ignore[call-arg]
        s3_access_key_id="ak",
        s3_secret_access_key="sk",
        s3_bucket="lorp-artifacts",
        api_keys={"k" * 16: "acme"},
        max_device_memory=123,
    )
    spec = JobCreate.model_validate({**body, "offload": "sequential"})
    config = spec.prune_config(PruneConfig, settings)
    assert (config.offload, config.max_device_memory) == ("sequential", 123)
    assert JobCreate.model_validate(body).prune_config(PruneConfig).offload == "auto"
    with pytest.raises(ValidationError, match="offload"):
        JobCreate.model_validate({**body, "offload": "disk"})


def test_openapi_documents_offload() -> None:
    from service.main import create_app

    schemas = create_app().openapi()["components"]["schemas"]
    field = schemas["JobCreate"]["properties"]["offload"]
    choices = json.dumps(field) + json.dumps(schemas.get("Offload", {}))
    assert all(f'"{mode}"' in choices for mode in ("none", "sequential", "auto"))
    assert "one block at a time" in json.dumps(field)
    assert "sequential" in json.dumps(schemas["JobSummary"]["properties"]["offload"])


def test_report_records_the_mode() -> None:
    """report.json's model.offload, the job summary; the benchmark (it needs the whole model on
    the device) is skipped and said so."""
    model = build_tiny("llama")
    bench = BenchmarkConfig(
        prefill=((1, 8),), decode=(), warmup=0, repetitions=1, allow_few_repetitions=True
    )
    config = PruneConfig(num_remove=1, offload="sequential", benchmark=bench)
    result = prune(model, tiny_tokenizer(), _windows(3, 16), config, evaluation=_windows(2, 16, 1))
    report = make_report(result, config, model_source="tiny")
    offload = report["model"]["offload"]
    assert (offload["mode"], offload["requested"], offload["weights"]) == (
        "sequential",
        "sequential",
        "host",
    )
    assert offload["peak_block_bytes"] == _block_bytes(get_blocks(model)[0])
    assert offload["skipped"] == ["benchmark"] and result.benchmark is None
    assert job_summary(report)["offload"] == "sequential"


@pytest.mark.slow
def test_bundled_smollm2_bf16_sequential_equals_in_memory(tmp_path: Path) -> None:
    """Issue 20's done-means on the real model: a bf16 safetensors copy of SmolLM2-135M, its
    blocks read from disk one at a time: S within 1e-5 of the in-memory S, the same selections
    at 3, 6 and 9 blocks."""
    from lorp.loading import bundled_model_path, save_pruned

    gguf = load_model(bundled_model_path(), dtype="bfloat16", device="cpu")
    save_pruned(gguf.model, gguf.tokenizer, tmp_path / "bf16", dtype="bfloat16")
    del gguf
    whole = load_model(tmp_path / "bf16", device="cpu").model
    seq = load_model(tmp_path / "bf16", device="cpu", sequential=True).model
    assert onloader_of(seq) is not None and all(p.is_meta for p in get_blocks(seq)[0].parameters())
    windows = torch.randint(100, 40000, (2, 128), generator=torch.Generator().manual_seed(0))
    s_mem = capture_similarity(whole, windows)
    s_seq = capture_similarity(seq, windows)
    assert np.abs(s_mem - s_seq).max() <= S_ABS
    for k in (3, 6, 9):
        assert (
            select_layers(s_seq, k, method="lorp").removed
            == select_layers(s_mem, k, method="lorp").removed
        )


def test_capture_in_groups_of_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the normalised block inputs of all windows exceed CAPTURE_GROUP_BYTES the capture
    runs the windows in groups (every block onloaded once per group): the same S and the same
    stored block inputs."""
    from lorp import offload
    from lorp.inputs import BlockInputs

    monkeypatch.setattr(offload, "CAPTURE_GROUP_BYTES", 1)  # one batch per group
    dense = build_tiny("gemma3", dtype=torch.bfloat16)
    layered = copy.deepcopy(dense)
    prepare(layered)
    calib = _windows(5, 12)
    keep_mem, keep_seq = BlockInputs([0, 3, 4]), BlockInputs([0, 3, 4])
    s_mem = capture_similarity(dense, calib, batch_size=2, keep=keep_mem)
    s_seq = capture_similarity(layered, calib, batch_size=2, keep=keep_seq)
    assert np.abs(s_mem - s_seq).max() <= S_ABS
    assert all(torch.equal(a, b) for a, b in zip(keep_mem.states, keep_seq.states, strict=True))


def test_scorer_passes_run_layer_wise_with_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    """WindowScorer on a prepared model: the candidate passes run layer-wise (from the
    embeddings or from a stored dense block input) and score exactly what the in-memory passes
    score."""
    import lorp.scoring as scoring

    calls: list[int] = []
    real = scoring.sequential_log_probs

    def counted(*args: Any, **kwargs: Any) -> list[torch.Tensor]:
        calls.append(kwargs.get("start", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "sequential_log_probs", counted)
    dense = build_tiny("qwen2", dtype=torch.bfloat16)
    layered = copy.deepcopy(dense)
    prepare(layered)
    windows = _windows(4, 16)
    sets = [[0], [2, 3], [4, 5], [1, 4]]
    mem = scoring.WindowScorer(dense, windows, batch_size=2)
    seq = scoring.WindowScorer(layered, windows, batch_size=2)
    for scorer in (mem, seq):
        scorer.prefetch(sets)
    for removed in sets:
        a, b = mem.score(removed), seq.score(removed)
        assert (a.nll, a.kl, a.top1_agreement, a.tokens, a.start_block) == (
            b.nll,
            b.kl,
            b.top1_agreement,
            b.tokens,
            b.start_block,
        )
    assert len(calls) == len(sets) and any(start > 0 for start in calls)
