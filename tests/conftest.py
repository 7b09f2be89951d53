"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Small models on a shared 2-core machine: one thread is faster and steadier (thread
    hand-offs cost more than the arithmetic). Modules opt in with ``pytestmark``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device a test runs on: the CPU, and CUDA where available (skipped elsewhere). Select
    one half with ``-k cpu`` or ``-k cuda`` (``python -m experiments.gpu_check`` runs the CUDA
    half on a GPU machine)."""
    return torch.device(request.param)
