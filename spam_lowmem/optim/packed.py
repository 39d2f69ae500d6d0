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

from ..functional import PackedStep
from ..quant4 import PackedWeight
from . import moments

__all__ = ["PackedAttachments", "PackedSource", "check_supported", "unsupported_reason"]


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


class PackedAttachments:
    """The packed weights an optimizer steps through the fused kernels, and the per-group,
    per-device counters of packed groups whose update was not finite."""

    def __init__(self) -> None:
        self.sources: dict[int, tuple[torch.Tensor, PackedSource]] = {}  # id(p) -> (p, layer)
        self.bad_groups: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def attach(self, p: torch.Tensor, group: dict[str, Any], source: PackedSource) -> None:
        check_supported(p, group)
        w = source.packed_weight()
        if tuple(w.shape) != tuple(p.shape) or w.codes.device != p.device:
            raise ValueError(
                f"spam_lowmem: packed weight {tuple(w.shape)} on {w.codes.device} does "
                f"not match the parameter {tuple(p.shape)} on {p.device}"
            )
        self.sources[id(p)] = (p, source)

    def detach(self, p: torch.Tensor) -> None:
        self.sources.pop(id(p), None)

    def is_attached(self, p: torch.Tensor) -> bool:
        return id(p) in self.sources

    def step_for(self, p: torch.Tensor, group: dict[str, Any]) -> PackedStep | None:
        """The packed weight and stochastic-rounding counter of ``p``'s next step, or None."""
        entry = self.sources.get(id(p))
        if entry is None:
            return None
        source = entry[1]
        check_supported(p, group)
        if source.is_materialized:
            raise RuntimeError(
                "spam_lowmem: a packed weight attached for fused steps is materialised "
                "(a dense working copy exists); call release() on its layer first"
            )
        seed, step = source.next_sr_counter()
        return PackedStep(source.packed_weight(), seed, step)

    def _bad_counter(self, group_index: int, device: torch.device) -> torch.Tensor:
        """Counter of packed groups left unchanged because their update was not finite. On CPU a
        fresh one per call (checked after the step, free there); on CUDA the telemetry buffer."""
        if device.type == "cpu":
            return torch.zeros(1, dtype=torch.int64)
        key = (group_index, device)
        bad = self.bad_groups.get(key)
        if bad is None:
            bad = self.bad_groups[key] = torch.zeros(1, dtype=torch.int64, device=device)
        return bad

    def core_kwargs(self, group_index: int, device: torch.device, packed: list[PackedStep | None]) -> dict[str, Any]:
        """``packed``/``packed_bad`` keywords of the core step (none if nothing is packed)."""
        if all(item is None for item in packed):
            return {}
        return {"packed": packed, "packed_bad": self._bad_counter(group_index, device)}

    def after_step(self, group_index: int, device: torch.device, kwargs: dict[str, Any]) -> None:
        """CPU: raise if a packed group could not be re-quantised (as requantize_ does); CUDA:
        leave the count on the device for ``spike_stats()`` (no sync in the step)."""
        bad = kwargs.get("packed_bad")
        if bad is None or device.type != "cpu":
            return
        n = int(bad.item())
        if n:
            key = (group_index, device)
            self.bad_groups[key] = self.bad_groups.get(key, torch.zeros(1, dtype=torch.int64)) + n
            raise ValueError(
                f"spam_lowmem: {n} packed weight group(s) got NaN or Inf from the update; "
                "their packed data was left unchanged (their moments were updated)"
            )
