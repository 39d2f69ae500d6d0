"""Loads the compiled cores once and routes a device to the module that serves it.

``_C`` (CPU) is always built. ``_C_cuda`` exists when the package was built with nvcc;
if it failed to import, the reason is kept so the error raised at the first CUDA step
says why instead of a bare ImportError.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import _C

_cuda_module: ModuleType | None
_cuda_import_error: str | None
try:
    from . import _C_cuda as _cuda_module  # type: ignore[attr-defined, no-redef]

    _cuda_import_error = None
except ImportError as exc:  # built without nvcc, or the CUDA runtime is missing
    _cuda_module = None
    _cuda_import_error = str(exc)

__all__ = ["cpu_module", "cuda_module", "has_cuda_kernels", "module_for", "check_device", "stream_for"]

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def cpu_module() -> ModuleType:
    """The CPU core (always present)."""
    return _C


def cuda_module() -> ModuleType:
    """The CUDA core, or a RuntimeError explaining why it is unavailable."""
    if _cuda_module is None:
        raise RuntimeError(
            "spam_lowmem was built without its CUDA kernels, so it cannot step CUDA tensors "
            f"({_cuda_import_error}). Rebuild with nvcc on PATH, e.g. "
            "`SPAM_LOWMEM_CUDA=ON pip install --no-build-isolation -e .`."
        )
    return _cuda_module


def has_cuda_kernels() -> bool:
    """True when the CUDA core was built and imports."""
    return _cuda_module is not None


def check_device(device: torch.device, what: str = "parameter") -> None:
    """Raise NotImplementedError for devices the core has no kernels for."""
    if device.type not in SUPPORTED_DEVICE_TYPES:
        raise NotImplementedError(
            f"spam_lowmem: {what} on device '{device}' is not supported; "
            f"supported device types are {', '.join(SUPPORTED_DEVICE_TYPES)}"
        )


def module_for(device: torch.device) -> ModuleType:
    """The core module that serves tensors on ``device``."""
    check_device(device)
    return _C if device.type == "cpu" else cuda_module()


def stream_for(device: torch.device) -> int:
    """The ``stream`` argument of a core call on ``device``: the current CUDA stream as an int,
    0 on the CPU (whose core has no streams)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
