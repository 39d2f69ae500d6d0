"""Test configuration: every test starts from the same seed; `cuda` tests skip without a GPU."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from spam_lowmem import _backend

    if torch.cuda.is_available() and _backend.has_cuda_kernels():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and spam_lowmem's CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
