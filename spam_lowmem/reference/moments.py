"""Reference moment storage: dense, or blockwise 8-bit written the readable way.

8-bit layout and rules are those of :mod:`spam_lowmem.qmap` (the one shared definition):
blocks of 256 that restart at each row of a parameter of ``dim() >= 2`` (flat over 1-D
parameters and the compact arrays of sparse momentum; docs/algorithms.md §13.2), absmax =
max|x| per block (NaN if the block holds a NaN), code = ``searchsorted(midpoints, x / absmax,
right=True)`` (nearest, ties up), ``x = map[code] * absmax``. The rows are quantised the
plain way: viewed [R, L], zero-padded to whole blocks, quantised, the padding dropped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from spam_lowmem.qmap import BLOCK_SIZE, absmax_shape, num_blocks, quant_map

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
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        state[f"{key}_codes"] = torch.full(p.shape, quant_map(signed).zero_code, dtype=torch.uint8, device=p.device)
        state[f"{key}_absmax"] = torch.zeros(absmax_shape(p.shape), dtype=torch.float32, device=p.device)


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


def _rows(x: Tensor, rows: int | None) -> Tensor:
    """``x`` as the [R, L] rows its blocks restart at: one row of everything when ``rows`` is
    None (flat); else R = rows and L = prod(x.shape[1:]) (numel / R when x is already flat)."""
    if rows is None:
        return x.reshape(1, -1)
    if x.dim() >= 2 and x.shape[0] == rows:
        return x.reshape(rows, math.prod(x.shape[1:]))
    return x.reshape(rows, x.numel() // rows if rows else 0)


def _layout_rows(absmax: Tensor) -> int | None:
    """The rows of the layout ``absmax`` has: None for 1-D (flat), its first dim for 2-D."""
    return absmax.shape[0] if absmax.dim() == 2 else None


def dequantize_blocks(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """Values of ``codes`` (a tensor of that shape), the blocks laid out as ``absmax`` says."""
    values = quant_map(signed, codes.device).values
    rows = _rows(codes, _layout_rows(absmax))
    per_row = absmax if absmax.dim() == 2 else absmax.reshape(1, -1)
    scale = per_row.repeat_interleave(BLOCK_SIZE, dim=1)[:, : rows.shape[1]]
    return (values[rows.long()] * scale).reshape(codes.shape)


def quantize_blocks(x: Tensor, signed: bool, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of a float32 tensor: flat blocks of 256 (codes [numel], absmax
    [ceil(numel/256)]) or, given ``rows``, blocks restarting at each of ``rows`` rows of
    ``L = prod(x.shape[1:])`` elements (codes [rows, L], absmax [rows, ceil(L/256)])."""
    x2 = _rows(x, rows)
    r, length = x2.shape
    # zero padding to whole blocks: a zero never raises an absmax, and is dropped again below
    padded = torch.nn.functional.pad(x2, (0, (-length) % BLOCK_SIZE)).view(r, num_blocks(length), BLOCK_SIZE)
    absmax = padded.abs().amax(dim=2)  # amax propagates NaN
    scale = absmax.repeat_interleave(BLOCK_SIZE, dim=1)[:, :length]
    normalized = torch.where(scale > 0, x2 / scale, torch.zeros_like(x2))
    # An infinite entry of an infinite block is taken as +-1, not inf / inf = NaN (quant8.h,
    # quantize_value): an infinite moment keeps its sign.
    normalized = torch.where(x2.isinf() & scale.isinf(), x2.sign(), normalized)
    codes = quant_map(signed, x.device).quantize_reference(normalized)
    if rows is None:
        return codes.reshape(-1), absmax.reshape(-1)
    return codes, absmax


def load_moments(p: Tensor | None, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(m, v) of the previous step as float32 tensors shaped like ``p`` (flat when ``p`` is None:
    the compact moments of sparse momentum)."""
    if "exp_avg_codes" not in state:
        return state["exp_avg"].float(), state["exp_avg_sq"].float()
    m = dequantize_blocks(state["exp_avg_codes"], state["exp_avg_absmax"], True)
    v = dequantize_blocks(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], False)
    if p is None:
        return m.reshape(-1), v.reshape(-1)
    return m.view(p.shape), v.view(p.shape)


def store_moments(state: dict[str, Any], m: Tensor, v: Tensor) -> None:
    if "exp_avg_codes" not in state:
        state["exp_avg"].copy_(m)
        state["exp_avg_sq"].copy_(v)
        return
    for key, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        absmax = state[f"{key}_absmax"]
        codes, new_absmax = quantize_blocks(value.float(), signed, _layout_rows(absmax))  # the state's layout
        state[f"{key}_codes"].copy_(codes.reshape(state[f"{key}_codes"].shape))
        absmax.copy_(new_absmax.reshape(absmax.shape))
