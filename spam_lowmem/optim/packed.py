"""Packed 4-bit weights stepped by the fused kernels: the policy side.

A spam_lowmem optimizer that has a parameter registered with
:meth:`~spam_lowmem.optim.base.SpikeAwareOptimizer.attach_packed` never reads that Parameter's
data (it is the placeholder of a packed :class:`~spam_lowmem.nn.QuantLinear`). Instead each
step hands the core the layer's packed buffers and the gradient; the core unpacks each
quantisation group, applies the optimizer's element update and re-quantises the group with
stochastic rounding in one pass (``cpp/spam/isa/packed_loop.h``, ``cuda/packed_step.cu``).
No full-precision copy of the weight exists at any time; the moments stay dense in the
Parameter's dtype, as for any parameter.

What is not supported (a clear NotImplementedError, never a silent fallback): packed weights
in a sparse-momentum group (density < 1) and packed weights that would get 8-bit moments
(``state_bits=8`` and ``numel >= min_8bit_size``). The unfused path
(``attach_packed_requant(..., fused=False)``) covers both.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..quant4 import PackedWeight
from . import moments

__all__ = ["PackedSource", "check_supported", "unsupported_reason"]


class PackedSource(Protocol):
    """What the optimizer needs from the owner of a packed weight (QuantLinear implements it)."""

    @property
    def is_materialized(self) -> bool: ...

    def packed_weight(self) -> PackedWeight: ...

    def next_sr_counter(self) -> tuple[int, int]: ...


def unsupported_reason(p: torch.Tensor, group: dict[str, Any]) -> str | None:
    """Why the fused packed step cannot run ``p`` in ``group``, or None."""
    if group.get("density", 1.0) < 1.0:
        return "sparse momentum (density < 1)"
    if moments.wants_8bit(p, group):
        return f"8-bit moments (state_bits=8 and {p.numel()} >= min_8bit_size={group.get('min_8bit_size', 4096)})"
    return None


def check_supported(p: torch.Tensor, group: dict[str, Any]) -> None:
    """Raise NotImplementedError if the fused packed step cannot run ``p`` in ``group``."""
    reason = unsupported_reason(p, group)
    if reason is not None:
        raise NotImplementedError(
            f"spam_lowmem: the fused packed 4-bit step does not support {reason} yet; put the "
            "packed weights in a dense group with state_bits=32, or use "
            "attach_packed_requant(optimizer, model, fused=False) (materialise, step, requantise)"
        )
