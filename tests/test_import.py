"""The package imports its compiled cores; a build with nvcc present has the CUDA module."""

from __future__ import annotations

import inspect
import os
import shutil

import torch

import spam_lowmem as sl
from spam_lowmem import _backend
from spam_lowmem.optim.base import SpikeAwareOptimizer


def test_public_api() -> None:
    for cls in (sl.SPAM, sl.StableSPAM, sl.AdamW):
        # each kind derives directly from the shared base, which is a torch optimizer
        assert cls.__mro__ == (cls, SpikeAwareOptimizer, torch.optim.Optimizer, object), cls.__mro__
        # its constructor shows its real arguments (those of its settings), not *args/**kwargs
        signature = inspect.signature(cls)
        assert next(iter(signature.parameters)) == "params"
        assert cls.HYPERPARAMETERS and set(signature.parameters) >= cls.HYPERPARAMETERS, cls
    assert callable(sl.functional.spam_step) and callable(sl.functional.stable_spam_step)
    assert inspect.isfunction(sl.plan) and inspect.ismodule(sl.planner)  # one name, one thing
    assert sl.__version__


def test_cuda_module_built_when_nvcc_is_present() -> None:
    """CI has nvcc but no GPU: the CUDA module must still build and import (cudart static)."""
    wanted = os.environ.get("SPAM_LOWMEM_CUDA", "AUTO").upper() != "OFF"
    if shutil.which("nvcc") and wanted and os.environ.get("CI"):
        assert _backend.has_cuda_kernels(), _backend._cuda_import_error
    else:
        # Outside CI the package may be built without CUDA; then the error must be clear.
        if not _backend.has_cuda_kernels():
            try:
                _backend.cuda_module()
            except RuntimeError as exc:
                assert "without its CUDA kernels" in str(exc)
            else:  # pragma: no cover
                raise AssertionError("cuda_module() should raise")
