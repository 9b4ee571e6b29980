"""Everything that can refuse a job is refused before the first calibration window runs
(:func:`lorp.pipeline.preflight`), in float32 and bfloat16; running out of memory inside a stage
ends as :class:`~lorp.errors.ModelTooLargeError` naming the stage and the option that would
have fitted, in the library, the CLI and the worker alike."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedModel

from jobcore.config import Settings
from jobcore.spec import JobState
from jobcore.store import JobRecord
from lorp._blocks import get_blocks
from lorp.bench import BenchmarkConfig
from lorp.cli import main
from lorp.errors import (
    OFFLOAD_HINT,
    BudgetError,
    InvalidInputError,
    LorpError,
    ModelTooLargeError,
    UnsupportedModelError,
    out_of_memory,
)
from lorp.gate import QualityGate
from lorp.pipeline import (
    PruneConfig,
    StageTimer,
    preflight,
    prune,
    run_pipeline,
)
from tests.tiny_models import DEPTH, TINY_TEXT, VOCAB, build_tiny, snapshot, tiny_tokenizer
from tests.unit.test_input_hardening import _Storage, _Store
from worker.runner import JobRunner

DTYPES = (torch.float32, torch.bfloat16)
SMALL: dict[str, Any] = {"windows": 4, "seq_len": 32, "holdout_windows": 2}


@contextmanager
def counting(model: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the forward passes of ``model``'s blocks while the body runs."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    handles = [b.register_forward_pre_hook(hook) for b in get_blocks(model)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@dataclass
class Case:
    """One refusal: the model family, what ``prune`` gets, and the error it must raise."""

    family: str
    config: dict[str, Any]
    error: type[LorpError]
    match: str
    calibration: str = "text"  # "text", "short", "no holdout", "windows", "bad ids"
    evaluation: str | None = None  # None, "short"
    config_changes: dict[str, Any] = field(default_factory=dict)


GATE = QualityGate(max_ppl_ratio=2.0)

CASES: dict[str, Case] = {
    "budget over depth": Case("llama", {"num_remove": DEPTH}, BudgetError, "budget must be"),
    "num_clusters over depth": Case(
        "llama", {"num_remove": 2, "num_clusters": DEPTH + 1}, InvalidInputError, "num_clusters"
    ),
    "num_clusters lorp-loss": Case(
        "qwen3",
        {"num_remove": 2, "method": "lorp-loss", "num_clusters": DEPTH + 3},
        InvalidInputError,
        "num_clusters",
    ),
    "compensation post-MLP norm": Case(
        "gemma2", {"num_remove": 2, "compensate": True}, UnsupportedModelError, "MLP output"
    ),
    "compensation no down_proj": Case(
        "gpt2", {"num_remove": 2, "compensate": True}, UnsupportedModelError, "down_proj"
    ),
    "lorp-fold on Gemma": Case(
        "gemma3", {"num_remove": 2, "method": "lorp-fold"}, UnsupportedModelError, "'lorp-loss'"
    ),
    "temperature soft-capped logits": Case(
        "gemma2", {"num_remove": 2, "temperature": True}, UnsupportedModelError, "soft-caps"
    ),
    "tasks without data dir": Case(
        "llama", {"num_remove": 2, "tasks": ("piqa",)}, InvalidInputError, "task_data_dir"
    ),
    "tasks data missing": Case(
        "llama",
        {"num_remove": 2, "tasks": ("piqa",), "task_data_dir": "/nonexistent/tasks"},
        InvalidInputError,
        "task data not found",
    ),
    "gate, calibration windows, no evaluation": Case(
        "llama",
        {"num_remove": 2, "quality_gate": GATE},
        InvalidInputError,
        "could not be measured",
        calibration="windows",
    ),
    "gate, holdout_windows 0": Case(
        "llama",
        {"num_remove": 2, "quality_gate": GATE, "holdout_windows": 0},
        InvalidInputError,
        "could not be measured",
    ),
    "gate, no text left after scoring": Case(
        "llama",
        {
            "num_remove": 2,
            "method": "sleb",
            "quality_gate": GATE,
            "score_windows": 2,
            "score_seq_len": 24,
        },
        InvalidInputError,
        "could not be measured",
        calibration="no holdout",
    ),
    "calibration text too short": Case(
        "llama", {"num_remove": 2}, InvalidInputError, "not enough", calibration="short"
    ),
    "evaluation text too short": Case(
        "llama", {"num_remove": 2}, InvalidInputError, "not enough", evaluation="short"
    ),
    "token ids outside the vocabulary": Case(
        "llama", {"num_remove": 2}, InvalidInputError, "token ids", calibration="bad ids"
    ),
    "windows past learned positions": Case(
        "gpt2", {"num_remove": 2, "seq_len": 300}, InvalidInputError, "learned position"
    ),
    "benchmark past learned positions": Case(
        "gpt2",
        {
            "num_remove": 2,
            "benchmark": BenchmarkConfig(
                prefill=((1, 64),),
                decode=((1, 200, 100),),
                repetitions=1,
                warmup=0,
                allow_few_repetitions=True,
            ),
        },
        InvalidInputError,
        "benchmark decode",
    ),
    "surgery: per-index attention scale": Case(
        "gpt2",
        {"num_remove": 2},
        UnsupportedModelError,
        "scale_attn_by_inverse_layer_idx",
        config_changes={"scale_attn_by_inverse_layer_idx": True},
    ),
    "surgery: config depth disagrees": Case(
        "llama", {"num_remove": 2}, UnsupportedModelError, "config declares"
    ),
}


def _model(case: Case, dtype: torch.dtype) -> PreTrainedModel:
    model = build_tiny(case.family, dtype=dtype)
    if case.config_changes:
        config = GPT2Config(**{**model.config.to_dict(), **case.config_changes})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if case.match == "config declares":
        model.config.num_hidden_layers = DEPTH + 1
    return model


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_refused_before_any_forward_pass(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    case = CASES[name]
    model = _model(case, dtype)
    before = snapshot(model)
    calibration: Path | torch.Tensor = {
        "text": lambda: _text(tmp_path / "calib.txt", TINY_TEXT),
        "short": lambda: _text(tmp_path / "calib.txt", TINY_TEXT[:20]),
        # 4 x 32 calibration and 2 x 24 scoring tokens, then less than a 32-token window
        "no holdout": lambda: _text(tmp_path / "calib.txt", TINY_TEXT[:186]),
        "windows": lambda: torch.randint(3, VOCAB, (4, 32)),
        "bad ids": lambda: torch.full((4, 32), VOCAB + 5),
    }[case.calibration]()
    evaluation = None if case.evaluation is None else _text(tmp_path / "eval.txt", "too short")
    config = PruneConfig(**{**SMALL, **case.config})
    stages: list[str] = []
    with counting(model) as calls, pytest.raises(case.error, match=case.match):
        prune(
            model,
            tiny_tokenizer(),
            calibration,
            config,
            evaluation=evaluation,
            progress=lambda stage, *_: stages.append(stage),
        )
    assert calls[0] == 0, f"{name}: {calls[0]} block forward passes before the refusal"
    assert stages == []  # no stage started
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is left as it was


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_folds_in_bf16_pass_the_preflight(family: str, dtype: torch.dtype) -> None:
    """The H200 finding: lorp-fold (compensation + temperature) on a bf16 Qwen3 was refused
    after all the compute; the preflight's fold checks accept it in the model's dtype."""
    model = build_tiny(family, dtype=dtype)
    tok = tiny_tokenizer()
    windows = torch.randint(3, VOCAB, (6, 32))
    config = PruneConfig(method="lorp-fold", num_remove=2, windows=6, seq_len=32)
    with counting(model) as calls:
        assert preflight(model, config, tokenizer=tok, calibration=windows) == 2
    assert calls[0] == 0


def test_preflight_without_texts_checks_the_configured_lengths() -> None:
    model = build_tiny("gpt2")
    assert preflight(model, PruneConfig(num_remove=2, seq_len=256)) == 2
    with pytest.raises(InvalidInputError, match=r"seq_len is 257 tokens.*256 positions"):
        preflight(model, PruneConfig(num_remove=2, seq_len=257))
    with pytest.raises(InvalidInputError, match="score_seq_len"):
        preflight(model, PruneConfig(num_remove=2, method="sleb", seq_len=64, score_seq_len=300))
    # rotary positions: longer windows run, nothing to refuse
    assert preflight(build_tiny("llama"), PruneConfig(num_remove=2, seq_len=4096)) == 2


def _write_tiny(folder: Path, dtype: torch.dtype) -> Path:
    build_tiny("llama", dtype=dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_run_pipeline_refuses_before_loading(dtype: torch.dtype, tmp_path: Path) -> None:
    """What run_pipeline itself adds: a checkpoint folder that is not empty, a GGUF output for
    a safetensors input: refused before the loading stage starts."""
    model_dir = _write_tiny(tmp_path / "m", dtype)
    calib = _text(tmp_path / "calib.txt", TINY_TEXT)
    config = PruneConfig(num_remove=2, **SMALL)
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "keep.txt").write_text("not ours")
    stages: list[str] = []

    def record(stage: str, *_: Any) -> None:
        stages.append(stage)

    with pytest.raises(InvalidInputError, match="exists and is not empty"):
        run_pipeline(model_dir, calib, out, config, progress=record)
    with pytest.raises(InvalidInputError, match="needs a GGUF input"):
        run_pipeline(model_dir, calib, tmp_path / "o2", config, output_formats=["gguf"])
    with pytest.raises(InvalidInputError, match=r"calib\.txt is not a writable directory"):
        run_pipeline(model_dir, calib, calib / "out", config, progress=record)
    assert stages == []
    assert (out / "model" / "keep.txt").read_text() == "not ours"
    # after loading, prune's preflight refuses before the calibration stage
    with pytest.raises(InvalidInputError, match="could not be measured"):
        run_pipeline(
            model_dir,
            calib,
            tmp_path / "o3",
            PruneConfig(num_remove=2, **{**SMALL, "holdout_windows": 0}, quality_gate=GATE),
            progress=record,
        )
    assert set(stages) == {"loading"}


# --------------------------------------------------------------------------------------------
# Out of memory


def _oom_device() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _oom_cpu_allocator() -> BaseException:
    return RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 8589934592 bytes. Error code 12"
    )


OOMS: dict[str, Callable[[], BaseException]] = {
    "device": _oom_device,
    "MemoryError": lambda: MemoryError(),
    "CPU allocator": _oom_cpu_allocator,
}


def _raise_in(stage: str, make: Callable[[], BaseException]) -> Callable[..., None]:
    """A progress callback that raises ``make()`` from inside ``stage``'s work: at its first
    report after the stage's start message."""
    seen = [0]

    def progress(name: str, fraction: float, message: str) -> None:
        if name == stage:
            seen[0] += 1
            if seen[0] == 2:
                raise make()

    return progress


@pytest.mark.parametrize("kind", list(OOMS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_out_of_memory_in_a_forward_pass_is_model_too_large(kind: str, dtype: torch.dtype) -> None:
    model = build_tiny("llama", dtype=dtype)
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1
        if calls[0] == 2:  # the second calibration window, in block 3
            raise OOMS[kind]()

    handle = get_blocks(model)[3].register_forward_pre_hook(hook)
    try:
        with pytest.raises(ModelTooLargeError) as caught:
            prune(
                model,
                tiny_tokenizer(),
                torch.randint(3, VOCAB, (4, 16)),
                PruneConfig(num_remove=2, windows=4, seq_len=16),
            )
    finally:
        handle.remove()
    message = str(caught.value)
    assert caught.value.code == "model_too_large"
    assert "during the calibration stage" in message
    assert 'offload: "sequential"' in message and "--offload sequential" in message
    assert ("device memory" if kind == "device" else "CPU memory") in message
    assert len(model.model.layers) == DEPTH  # nothing was removed


@pytest.mark.parametrize(
    "stage", ["calibration", "selection", "compensation", "temperature", "evaluation"]
)
def test_out_of_memory_names_the_stage(stage: str, tmp_path: Path) -> None:
    model = build_tiny("llama", dtype=torch.bfloat16)
    config = PruneConfig(method="lorp-fold", num_remove=2, **SMALL, score_windows=2)
    with pytest.raises(ModelTooLargeError, match=f"during the {stage} stage"):
        prune(
            model,
            tiny_tokenizer(),
            _text(tmp_path / "calib.txt", TINY_TEXT),
            config,
            progress=_raise_in(stage, _oom_device),
        )


def test_other_errors_are_not_memory_errors() -> None:
    assert out_of_memory(RuntimeError("shape mismatch"), "calibration") is None
    assert out_of_memory(ValueError("can't allocate memory"), "calibration") is None
    mapped = out_of_memory(MemoryError(), "saving")
    assert mapped is not None and "saving stage" in str(mapped) and OFFLOAD_HINT in str(mapped)
    timer = StageTimer()
    with pytest.raises(RuntimeError, match="shape"), timer.stage("selection", "x"):
        raise RuntimeError("shape mismatch")


def test_cli_out_of_memory_exits_non_zero_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = _write_tiny(tmp_path / "m", torch.bfloat16)
    calib = _text(tmp_path / "calib.txt", TINY_TEXT)
    import lorp.pipeline

    real = lorp.pipeline.prune

    def prune_oom(*args: Any, timer: StageTimer, **kw: Any) -> Any:
        inner, oom = timer.callback, _raise_in("calibration", _oom_device)

        def callback(stage: str, fraction: float, message: str) -> None:
            oom(stage, fraction, message)
            if inner is not None:
                inner(stage, fraction, message)

        timer.callback = callback
        return real(*args, timer=timer, **kw)

    monkeypatch.setattr(lorp.pipeline, "prune", prune_oom)
    argv = [
        "prune", "--model", str(model_dir), "--calibration", str(calib), "--remove", "2",
        "--windows", "4", "--seq-len", "32", "--no-bench", "--dtype", "bfloat16",
        "--out", str(tmp_path / "out"), "--quiet",
    ]  # fmt: skip
    capsys.readouterr()  # what saving the test model printed
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorp: error: out of device memory during the calibration stage")
    assert "--offload sequential" in err and "Traceback" not in err


def test_worker_ends_an_out_of_memory_job_failed_model_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's mapping: the pipeline's ModelTooLargeError ends the job ``failed`` with
    code ``model_too_large`` and the message naming the job option (no retry loop: the run
    returns, the worker takes the next message)."""
    for name in list(os.environ):
        if name.startswith("LORP_"):
            monkeypatch.delenv(name)
    root = tmp_path / "root"
    model_dir = _write_tiny(root / "m", torch.bfloat16)
    _text(root / "calib.txt", TINY_TEXT)
    settings = Settings(
        s3_access_key_id="test-access",  # type: ignore[arg-type]
        s3_secret_access_key="test-secret",  # type: ignore[arg-type]
        s3_bucket="lorp-test",
        api_keys={"acme-key-0123456789": "acme"},
        local_roots=[root],
        work_dir=tmp_path / "work",
    )

    def pipeline(*args: Any, progress: Any, **kw: Any) -> Any:
        oom = _raise_in("calibration", _oom_device)

        def callback(stage: str, fraction: float, message: str) -> None:
            oom(stage, fraction, message)
            progress(stage, fraction, message)

        return run_pipeline(*args, progress=callback, **kw)

    rec = JobRecord(
        id="c" * 32,
        tenant="acme",
        seq=1,
        state=JobState.queued,
        created_at="2025-01-01T00:00:00Z",
        spec={
            "budget": {"blocks": 2},
            "model": str(model_dir),
            "calibration": str(root / "calib.txt"),
            "windows": 4,
            "seq_len": 32,
            "holdout_windows": 1,
            "dtype": "bfloat16",
        },
        fingerprint="",
    )
    store = _Store(rec)
    runner = JobRunner(
        settings, cast(Any, store), cast(Any, _Storage()), pipeline=pipeline, lock_ttl_ms=60_000
    )
    assert runner.run(rec.id) == "failed"
    assert store.finished is not None
    state, kw = store.finished
    assert state == JobState.failed
    assert kw["error"].code == "model_too_large"
    assert "during the calibration stage" in kw["error"].message
    assert 'offload: "sequential"' in kw["error"].message
    assert str(tmp_path) not in kw["error"].message


def test_out_of_memory_while_loading_is_model_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's CPU allocator refusing inside ``from_pretrained`` is ``model_too_large`` (it
    was ``model_load_failed``), with the option named."""
    import transformers

    from lorp.loading import load_model

    model_dir = _write_tiny(tmp_path / "m", torch.bfloat16)

    def refuse(*_: Any, **__: Any) -> Any:
        raise _oom_cpu_allocator()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelTooLargeError, match="out of CPU memory during the loading") as caught:
        load_model(model_dir, device="cpu")
    assert OFFLOAD_HINT in str(caught.value)


# --------------------------------------------------------------------------------------------
# GGUF output: what the budget alone decides is refused (or falls back) before loading


def test_gguf_output_of_gemma_needs_a_budget_in_whole_sliding_periods(tmp_path: Path) -> None:
    from lorp.outputs import plan_outputs
    from tests.unit.test_gguf_surgery import _fake_gguf

    src = _fake_gguf(tmp_path / "gemma3.gguf", "gemma3", 12, range(12))
    with pytest.raises(UnsupportedModelError, match="multiple of 6 blocks, not 2"):
        plan_outputs(src, output_formats=["gguf"], budget=2)
    default = plan_outputs(src, budget=2)  # only the default chose GGUF: safetensors instead
    assert default.formats == ["safetensors"]
    assert "multiple of 6 blocks, not 2" in default.notes[0]
    assert plan_outputs(src, output_formats=["gguf"], budget=6).formats == ["gguf"]
    assert plan_outputs(src, budget=0.5).formats == ["gguf"]  # 6 of 12
    llama = _fake_gguf(tmp_path / "llama.gguf", "llama", 12, range(12))
    assert plan_outputs(llama, output_formats=["gguf"], budget=2).formats == ["gguf"]


def test_default_gguf_output_refused_by_the_chosen_blocks_falls_back_when_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which runs are removed is known only after the selection: when the GGUF surgery refuses
    them and GGUF was only the default, the checkpoint is written as safetensors with the
    reason, instead of failing the job after all its compute; asked for explicitly, it fails."""
    import lorp.gguf_surgery
    from lorp.outputs import OutputPlan, write_outputs
    from tests.tiny_gguf import write_tiny_gguf

    src = write_tiny_gguf(tmp_path / "tiny.gguf")

    def refuse(*_: Any, **__: Any) -> Any:
        raise UnsupportedModelError("removing [1] would change the attention of kept blocks")

    monkeypatch.setattr(lorp.gguf_surgery, "write_pruned_gguf", refuse)
    model, tok = build_tiny("llama"), tiny_tokenizer()
    plan = OutputPlan(formats=["gguf"], requested=None, gguf_source=src)
    artifacts = write_outputs(plan, model, tok, [1], None, tmp_path / "a" / "model")
    assert artifacts["formats"] == ["safetensors"] and artifacts["gguf"] is None
    assert "would change the attention" in artifacts["notes"][0]
    assert (tmp_path / "a" / "model" / "model.safetensors").is_file()
    explicit = OutputPlan(formats=["gguf"], requested=["gguf"], gguf_source=src)
    with pytest.raises(UnsupportedModelError, match="would change the attention"):
        write_outputs(explicit, model, tok, [1], None, tmp_path / "b" / "model")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_task_items_the_tokenizer_cannot_encode_are_refused_first(
    dtype: torch.dtype, tmp_path: Path
) -> None:
    """An item with an empty context is scored conditioned on BOS (or EOS): a tokenizer with
    neither failed in the evaluation stage, after the whole prune."""
    import json

    from tests.tiny_tasks import write_tiny_tasks

    data = write_tiny_tasks(tmp_path / "tasks", items=4)
    record = {"id": "piqa/empty", "task": "piqa", "context": "", "choices": ["a.", "b."]}
    with (data / "piqa.jsonl").open("a") as f:
        f.write(json.dumps({**record, "label": 0, "scoring": "acc, acc_norm"}) + "\n")
    tok = tiny_tokenizer()
    model = build_tiny("llama", dtype=dtype)
    config = PruneConfig(num_remove=2, **SMALL, tasks=("piqa",), task_data_dir=data)
    windows = torch.randint(3, VOCAB, (4, 32))
    assert preflight(model, config, tokenizer=tok, calibration=windows) == 2  # it has a BOS
    tok.bos_token, tok.eos_token = None, None
    with counting(model) as calls, pytest.raises(InvalidInputError, match="BOS or EOS"):
        prune(model, tok, windows, config)
    assert calls[0] == 0
