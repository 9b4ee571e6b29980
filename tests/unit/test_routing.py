"""Routing by device class (jobcore.routing, issue 24 item 1): a job's device and its model's
weight bytes choose the CPU or GPU pool's queue; a model no pool can hold is refused; what a
worker advertises (worker.tasks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from jobcore.config import Settings
from jobcore.routing import choose_queue, job_weight_bytes, local_sizes, model_weight_bytes
from jobcore.spec import Device, JobCreate
from lorp.errors import ModelTooLargeError
from worker.pool import device_classes, memory_bytes

GiB = 2**30


def _settings(**kw: Any) -> Settings:
    for name in list(os.environ):
        if name.startswith("LORP_"):
            os.environ.pop(name)
    return Settings(  # type: ignore[call-arg]
        s3_access_key_id="ak",
        s3_secret_access_key="sk",
        s3_bucket="lorp-artifacts",
        api_keys={"k" * 16: "acme"},
        **kw,
    )


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("LORP_"):
            monkeypatch.delenv(name)
    return _settings()


def test_nobody_advertised_the_device_chooses(settings: Settings) -> None:
    assert choose_queue(Device.cpu, 10 * GiB, {}, settings) == "cpu"
    assert choose_queue(Device.cuda, 10 * GiB, {}, settings) == "gpu"
    assert choose_queue(Device.auto, 10 * GiB, {}, settings) == "cpu"
    assert choose_queue(Device.auto, None, {}, settings) == "cpu"


def test_auto_prefers_the_gpu_pool_when_it_holds_the_model(settings: Settings) -> None:
    pools = {"gpu": 80 * GiB, "cpu": 120 * GiB}
    assert choose_queue(Device.auto, 16 * GiB, pools, settings) == "gpu"
    assert choose_queue(Device.auto, 100 * GiB, pools, settings) == "cpu"  # too big for the GPU
    assert choose_queue(Device.auto, None, pools, settings) == "gpu"  # size unknown
    assert choose_queue(Device.cpu, 16 * GiB, pools, settings) == "cpu"
    assert choose_queue(Device.auto, 16 * GiB, {"cpu": 64 * GiB}, settings) == "cpu"


def test_a_model_no_pool_can_hold_is_refused_with_the_sizes(settings: Settings) -> None:
    pools = {"gpu": 80 * GiB, "cpu": 64 * GiB}
    with pytest.raises(ModelTooLargeError) as refused:
        choose_queue(Device.auto, 140 * GiB, pools, settings)
    message = str(refused.value)
    assert refused.value.code == "model_too_large"
    assert "150,323,855,360 bytes (140.00 GiB)" in message
    assert "gpu workers hold at most 85,899,345,920 bytes" in message and "cpu workers" in message
    with pytest.raises(ModelTooLargeError, match="device 'cuda'"):
        choose_queue(Device.cuda, 90 * GiB, pools, settings)
    # only live pools count: no GPU worker and a CPU pool too small is a refusal for auto
    with pytest.raises(ModelTooLargeError, match="cpu workers hold at most"):
        choose_queue(Device.auto, 140 * GiB, {"cpu": 64 * GiB}, settings)
    # ... but a device whose pool has no live worker at all waits there for one
    assert choose_queue(Device.cuda, 140 * GiB, {"cpu": 200 * GiB}, settings) == "gpu"
    assert choose_queue(Device.cpu, 140 * GiB, {"gpu": 200 * GiB}, settings) == "cpu"


def test_queue_names_are_the_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LORP_"):
            monkeypatch.delenv(name)
    custom = _settings(cpu_queue="lorp-cpu", gpu_queue="lorp-a100")
    assert choose_queue(Device.cuda, 1, {"gpu": 2}, custom) == "lorp-a100"
    assert choose_queue(Device.auto, 3, {"gpu": 2, "cpu": 4}, custom) == "lorp-cpu"
    with pytest.raises(ValueError, match="must differ"):
        _settings(cpu_queue="q", gpu_queue="q")
    with pytest.raises(ValueError, match="gpu_queue"):
        _settings(gpu_queue="bad queue")


def test_weight_bytes_without_downloading(tmp_path: Path) -> None:
    sizes = {"m/model-00001.safetensors": 7, "m/model-00002.safetensors": 5, "m/config.json": 99}
    assert model_weight_bytes(sizes) == 12
    assert model_weight_bytes({"a.Q4.gguf": 3, "b.Q8.gguf": 6}) is None  # which one?
    assert model_weight_bytes({"a.Q4.gguf": 3, "b.Q8.gguf": 6}, "b.Q8.gguf") == 6
    assert model_weight_bytes({"x.gguf": 4}) == 4 and model_weight_bytes({"c.json": 1}) is None
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "config.json").write_text("{}")
    assert local_sizes(folder) == {"model.safetensors": 100}
    spec = JobCreate.model_validate(
        {"model": str(folder), "calibration": "corpus:c", "budget": {"blocks": 1}}
    )
    assert job_weight_bytes(spec, None) == 100
    assert spec.device is Device.auto
    hub = spec.model_copy(update={"model": "hf:org/name"})
    assert job_weight_bytes(hub, None) is None


def test_what_a_worker_advertises(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LORP_"):
            monkeypatch.delenv(name)
    settings = _settings()
    assert device_classes(["cpu"], settings) == ["cpu"]
    assert device_classes(["gpu", "other", "cpu"], settings) == ["gpu", "cpu"]
    ram = memory_bytes("cpu", settings)
    assert ram is not None and ram > 0
    assert memory_bytes("cpu", _settings(max_model_bytes=1000)) == 1000
    assert memory_bytes("gpu", _settings(worker_memory_bytes=5 * GiB)) == 5 * GiB
    import torch

    if not torch.cuda.is_available():
        assert memory_bytes("gpu", settings) is None  # no GPU: nothing to advertise
