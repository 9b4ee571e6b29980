"""What a worker tells the API about its pool (``jobcore.routing``): per device class whose
queue it consumes, the memory it can hold, kept in the job store while it runs
(:class:`Advertiser`, started by ``worker.tasks`` when the worker is ready)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from redis.exceptions import RedisError

from jobcore.config import Settings
from jobcore.store import JobStore

log = logging.getLogger(__name__)

#: A worker re-advertises its pool memory this often; an advertisement lives 3 times as long.
ADVERTISE_SECONDS = 30


def device_classes(queues: list[str], settings: Settings) -> list[str]:
    """The device classes (``cpu``, ``gpu``) whose queues a worker consumes."""
    names = {settings.cpu_queue: "cpu", settings.gpu_queue: "gpu"}
    return [names[q] for q in queues if q in names]


def memory_bytes(device_class: str, settings: Settings) -> int | None:
    """What this worker can hold for ``device_class``: ``worker_memory_bytes`` when set, else
    the GPU's memory (``gpu``; None without a GPU) or the machine's RAM (``cpu``, its cgroup
    limit when lower), never above ``max_model_bytes``."""
    size: int | None = settings.worker_memory_bytes
    if size is None and device_class == "gpu":
        import torch

        if not torch.cuda.is_available():
            return None
        size = int(torch.cuda.get_device_properties(0).total_memory)
    if size is None:
        size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        try:
            limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        except OSError:
            limit = "max"
        if limit.isdigit():
            size = min(size, int(limit))
    if settings.max_model_bytes is not None:
        size = min(size, settings.max_model_bytes)
    return size


class Advertiser(threading.Thread):
    """Keeps this worker's pool memory in the job store while it runs (jobcore.routing)."""

    def __init__(self, store: JobStore, hostname: str, offers: dict[str, int]) -> None:
        super().__init__(daemon=True, name="lorp-advertise")
        self.store, self.hostname, self.offers = store, hostname, offers
        self.stopped = threading.Event()

    def advertise(self) -> None:
        for device_class, size in self.offers.items():
            self.store.advertise(device_class, self.hostname, size, 3 * ADVERTISE_SECONDS)

    def run(self) -> None:
        while not self.stopped.wait(ADVERTISE_SECONDS):
            try:
                self.advertise()
            except RedisError as e:
                log.warning("could not advertise this worker's memory: %s", e)

    def stop(self) -> None:
        self.stopped.set()
        for device_class in self.offers:
            with contextlib.suppress(RedisError):  # else it expires on its own
                self.store.withdraw(device_class, self.hostname)
