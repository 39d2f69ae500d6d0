"""spam_lowmem: SPAM and Stable-SPAM for training LLMs stably under a fixed memory budget.

Public API: :class:`SPAM`, :class:`StableSPAM`, :class:`AdamW` (C++/CUDA core, 32- or 8-bit state), :mod:`spam_lowmem.reference`
(pure-PyTorch oracle), :mod:`spam_lowmem.functional` (stateless core entry points).
"""

from __future__ import annotations

from . import functional, reference, schedules
from ._backend import has_cuda_kernels
from .optim import SPAM, AdamW, StableSPAM

__version__ = "0.1.0"

__all__ = ["SPAM", "StableSPAM", "AdamW", "functional", "reference", "schedules", "has_cuda_kernels", "__version__"]
