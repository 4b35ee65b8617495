"""Run the demo tests on one torch thread: on a shared 2-core machine two OpenMP threads were
several times slower per step than one (they spin waiting for a busy core); restored after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
