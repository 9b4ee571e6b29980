"""Test-wide settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread_seeded() -> Iterator[None]:
    """Tiny models run many times faster on one thread than on two contended ones, and the
    integration tests run worker processes beside the test process. Seeded for determinism."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
