"""Reference moment storage: dense, or blockwise 8-bit written the readable way.

8-bit layout and rules are those of :mod:`spam_lowmem.qmap` (the one shared definition):
blocks of 256, absmax = max|x| per block (NaN if the block holds a NaN), code =
``searchsorted(midpoints, x / absmax, right=True)`` (nearest, ties up), ``x = map[code] * absmax``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spam_lowmem.qmap import BLOCK_SIZE, num_blocks, quant_map

__all__ = [
    "dequantize_blocks",
    "init_compact_moments",
    "init_moments",
    "load_moments",
    "quantize_blocks",
    "store_moments",
]


def _uses_8bit(p: Tensor, group: dict[str, Any]) -> bool:
    return group.get("state_bits", 32) == 8 and p.numel() >= group.get("min_8bit_size", 4096)


def init_moments(p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    if not _uses_8bit(p, group):
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return
    blocks = num_blocks(p.numel())
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        state[f"{key}_codes"] = torch.full(
            (p.numel(),), quant_map(signed).zero_code, dtype=torch.uint8, device=p.device
        )
        state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


def init_compact_moments(p: Tensor, state: dict[str, Any], group: dict[str, Any], compact: int) -> None:
    """Zero moments for ``compact`` selected entries of ``p`` (sparse momentum, 1-D arrays)."""
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
        state.pop(key, None)
    if not _uses_8bit(p, group):
        state["exp_avg"] = torch.zeros(compact, dtype=p.dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(compact, dtype=p.dtype, device=p.device)
        return
    blocks = num_blocks(compact)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        state[f"{key}_codes"] = torch.full((compact,), quant_map(signed).zero_code, dtype=torch.uint8, device=p.device)
        state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


def dequantize_blocks(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    values = quant_map(signed, codes.device).values
    return values[codes.long()] * absmax.repeat_interleave(BLOCK_SIZE)[: codes.numel()]


def quantize_blocks(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of a flat float32 tensor."""
    n = x.numel()
    padded = torch.nn.functional.pad(x, (0, (-n) % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
    absmax = padded.abs().amax(dim=1)  # amax propagates NaN
    scale = absmax.repeat_interleave(BLOCK_SIZE)[:n]
    normalized = torch.where(scale > 0, x / scale, torch.zeros_like(x))
    # An infinite entry of an infinite block is taken as +-1, not inf / inf = NaN (quant8.h,
    # quantize_value): an infinite moment keeps its sign.
    normalized = torch.where(x.isinf() & scale.isinf(), x.sign(), normalized)
    return quant_map(signed, x.device).quantize_reference(normalized), absmax


def load_moments(p: Tensor | None, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(m, v) of the previous step as float32 tensors shaped like ``p`` (flat when ``p`` is None:
    the compact moments of sparse momentum)."""
    if "exp_avg_codes" not in state:
        return state["exp_avg"].float(), state["exp_avg_sq"].float()
    m = dequantize_blocks(state["exp_avg_codes"], state["exp_avg_absmax"], True)
    v = dequantize_blocks(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], False)
    if p is None:
        return m, v
    return m.view(p.shape), v.view(p.shape)


def store_moments(state: dict[str, Any], m: Tensor, v: Tensor) -> None:
    if "exp_avg_codes" not in state:
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
        return
    for key, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        codes, absmax = quantize_blocks(value.reshape(-1).float(), signed)
        state[f"{key}_codes"].copy_(codes)
        state[f"{key}_absmax"].copy_(absmax)
