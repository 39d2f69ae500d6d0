"""spam_lowmem: SPAM and Stable-SPAM for training LLMs stably under a fixed memory budget.

Public API: :class:`SPAM`, :class:`StableSPAM`, :class:`AdamW` (C++/CUDA core, 32- or 8-bit
state, sparse momentum), :func:`quantize_model` / :class:`QuantLinear` (4-bit weight training),
:mod:`spam_lowmem.reference` (pure-PyTorch oracle), :mod:`spam_lowmem.functional` (stateless
core entry points), :mod:`spam_lowmem.integrations` (Hugging Face Trainer; not imported here, so
that ``import spam_lowmem`` never imports transformers).
"""

from __future__ import annotations

from . import functional, nn, quant4, reference, schedules
from ._backend import has_cuda_kernels
from .nn import QuantLinear, attach_packed_requant, quantize_model
from .optim import SPAM, AdamW, StableSPAM
from .planner import PRESETS, Plan, plan
from .sparse import density_for_galore_rank, sparse_param_groups

__version__ = "0.1.0"

__all__ = [
    "SPAM",
    "StableSPAM",
    "AdamW",
    "functional",
    "reference",
    "schedules",
    "has_cuda_kernels",
    "__version__",
    "sparse_param_groups",
    "density_for_galore_rank",
    "nn",
    "quant4",
    "QuantLinear",
    "quantize_model",
    "attach_packed_requant",
    "plan",
    "Plan",
    "PRESETS",
]
