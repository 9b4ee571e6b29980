"""Which worker pool runs a job: its ``device`` and its model's size choose a queue.

Workers advertise, per device class (``cpu``, ``gpu``), the memory they can hold
(:meth:`jobcore.store.JobStore.advertise`, refreshed while they run); the API reads the largest
advertised per class (:meth:`jobcore.store.JobStore.pool_memory`) and, at submission, the model's
weight bytes without downloading them (:func:`model_weight_bytes`: the sizes of the
``.safetensors`` / ``.gguf`` objects under an ``s3://`` prefix, or of the files under a local
path). :func:`choose_queue` then picks:

- ``device: cpu`` -> ``Settings.cpu_queue``; ``cuda`` -> ``Settings.gpu_queue``;
- ``auto`` -> the GPU pool when it advertised enough memory, else the CPU pool when it did;
- a model bigger than every live pool its device allows is refused at submission
  (:class:`lorp.errors.ModelTooLargeError`, HTTP 422 with code ``model_too_large`` and the
  sizes); only when none of them advertised anything (no live worker) does the job wait in the
  queue (``auto``: the CPU queue) for a worker to come.

The weight bytes are the files' size, a lower bound of the memory a job needs (a quantized GGUF
dequantizes, ``dtype: float32`` doubles a 16-bit checkpoint); the worker checks the exact figure
before loading (``max_model_bytes``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from jobcore.config import Settings
from jobcore.errors import StorageError
from jobcore.spec import Device, JobCreate
from jobcore.storage import Storage, split_s3_uri
from lorp.errors import ModelTooLargeError

__all__ = [
    "DEVICE_CLASSES",
    "WEIGHT_SUFFIXES",
    "choose_queue",
    "job_weight_bytes",
    "local_sizes",
    "model_weight_bytes",
    "queue_of",
]

#: The worker pools, and the ``device`` values each serves.
DEVICE_CLASSES: dict[str, Device] = {"gpu": Device.cuda, "cpu": Device.cpu}
#: The files counted as a model's weights.
WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def queue_of(device_class: str, settings: Settings) -> str:
    """The queue of a device class (``cpu`` or ``gpu``)."""
    return settings.gpu_queue if device_class == "gpu" else settings.cpu_queue


def _fmt(size: int) -> str:
    return f"{size:,} bytes ({size / 2**30:.2f} GiB)"


def choose_queue(
    device: Device, weight_bytes: int | None, pools: Mapping[str, int], settings: Settings
) -> str:
    """The queue of a job for ``device`` whose weights take ``weight_bytes`` (None: unknown),
    given the largest memory each pool advertised (``pools``: class -> bytes); raises
    :class:`ModelTooLargeError` naming the sizes when no pool the device allows can hold it."""
    allowed = [c for c, d in DEVICE_CLASSES.items() if device in (Device.auto, d)]
    advertised = [c for c in allowed if c in pools]
    fits = [c for c in advertised if weight_bytes is None or weight_bytes <= pools[c]]
    if fits:
        return queue_of(fits[0], settings)
    if not advertised:  # nobody to compare with: the job waits in the queue for a worker
        return queue_of(allowed[-1], settings)
    offers = ", ".join(f"{c} workers hold at most {_fmt(pools[c])}" for c in advertised)
    assert weight_bytes is not None
    raise ModelTooLargeError(
        f"the model's weights are {_fmt(weight_bytes)}; no worker pool for device "
        f"{device.value!r} can hold them ({offers})"
    )


def model_weight_bytes(sizes: Mapping[str, int], gguf_file: str | None = None) -> int | None:
    """The weight bytes among ``sizes`` (file or object name -> bytes): ``gguf_file`` alone
    when given, else every ``.safetensors`` (or, without any, the one ``.gguf``); None when no
    weight file is listed."""
    names = {Path(k).name: v for k, v in sizes.items()}
    if gguf_file is not None:
        return names.get(gguf_file)
    tensors = [v for k, v in names.items() if k.endswith(".safetensors")]
    if tensors:
        return sum(tensors)
    ggufs = [v for k, v in names.items() if k.endswith(".gguf")]
    return ggufs[0] if len(ggufs) == 1 else None


def local_sizes(path: Path) -> dict[str, int]:
    """Name -> bytes of a local weight file, or of the weight files directly in a folder."""
    if path.is_file():
        return {path.name: path.stat().st_size}
    if not path.is_dir():
        return {}
    return {
        p.name: p.stat().st_size
        for p in path.iterdir()
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    }


def job_weight_bytes(spec: JobCreate, storage: Storage | None) -> int | None:
    """The weight bytes of ``spec.model`` without downloading it: the objects listed under an
    ``s3://`` prefix (None when the store cannot list it: the worker will say why), the files
    of a local path; None for a hub model."""
    if spec.model.startswith("s3://"):
        if storage is None:
            return None
        bucket, key = split_s3_uri(spec.model)
        prefix = key if key.endswith(".gguf") else key.rstrip("/") + "/"
        try:
            objects = storage.list_prefix(prefix, bucket=bucket)
        except StorageError:
            return None
        return model_weight_bytes({o.key: o.size for o in objects}, spec.gguf_file)
    if spec.model.startswith("/"):
        return model_weight_bytes(local_sizes(Path(spec.model)), spec.gguf_file)
    return None
