"""The 8-bit code maps of the optimizer state, defined once and shared by every backend.

Two maps of 256 sorted values (Dettmers' "dynamic" data type, arXiv 1511.04561, with the
parameters bitsandbytes and torchao use for their 8-bit optimizers):

* signed (first moment): 0, 1.0 and, for each decade 10^-6 ... 10^0, 2^k values
  ``+-10^(k-6) * c`` where c runs over the centres of 2^k equal slices of [0.1, 1]
  (k = 0..6): 127 negative values, 0, and 128 positive ones up to 1.0;
* unsigned (second moment): 1.0 and 2^(k+1) positive values per decade, and in place of
  bitsandbytes' 0 the floor ``V_FLOOR = 1e-7``: **the second-moment map has no zero**.

Why no zero in the v map: v is m squared, so inside one 256-entry block it spans the square of
m's range. With a zero code, an entry whose v is below ~1.6e-7 of its block's absmax (a
gradient 1/2500 of the block's largest) reads back as v = 0 while its m, on the signed map,
does not: the step becomes ``lr * m / eps`` and the entry jumps by thousands of learning rates
(measured: benchmarks/bench_8bit_fidelity.py). With the floor such a v reads back as
``1e-7 * absmax``, larger than the true value, so the step only gets smaller. A v that is
exactly 0 (an entry that never had a gradient) reads back as the floor too, harmlessly: its m
is 0. A fresh or reset block has absmax 0 and reads back as exact zeros whatever its codes.
The same move for 4-bit states is the "zero-point problem" of Li et al. (arXiv 2309.01507).

A value x of a block with absolute maximum A is stored as the code
``#{midpoints <= x / A}``: the nearest map value, ties going to the larger code. A NaN
``x / A`` (a block whose A is NaN), of either sign, gets the last code, 255, where
``searchsorted`` puts NaN: a NaN's sign bit differs between x86 and CUDA, the code must not.
In a block whose A is inf, an infinite x counts as +-1 (not inf / inf), so it keeps its sign.
The C++/CUDA core receives the map, its midpoints, a bucket table that turns that count
into one table read and one compare, and the byte tables of the AVX-512 VBMI kernels (see
cpp/spam/quant8.h, which documents both layouts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "QuantMap",
    "dynamic_map",
    "quant_map",
    "BLOCK_SIZE",
    "BUCKETS",
    "absmax_shape",
    "block_layout",
    "num_blocks",
    "V_FLOOR",
]

BLOCK_SIZE = 256


def num_blocks(n: int) -> int:
    """Blocks of :data:`BLOCK_SIZE` covering ``n`` elements (one absmax each; the last may be partial)."""
    return -(-n // BLOCK_SIZE)


def block_layout(shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, blocks_per_row)`` of the 8-bit blocks of a dense moment of a tensor of ``shape``.

    A tensor of ``dim() >= 2`` restarts its blocks at each of its ``shape[0]`` rows (row length
    ``L = prod(shape[1:])``, ``num_blocks(L)`` blocks a row, the last one partial when
    ``L % 256 != 0``), so that any split of its rows (FSDP2's ``Shard(0)``) falls between blocks;
    a 0-D or 1-D tensor is one row of all its elements (the flat layout). docs/algorithms.md §13.2.
    """
    if len(shape) < 2:
        return 1, num_blocks(math.prod(shape))
    return int(shape[0]), num_blocks(math.prod(shape[1:]))


def absmax_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the float32 absmax of a dense 8-bit moment of a tensor of ``shape``:
    ``[rows, blocks_per_row]`` for ``dim() >= 2`` (:func:`block_layout`), else
    ``[num_blocks(numel)]`` (flat). The core reads the layout from this shape."""
    rows, per_row = block_layout(shape)
    return (rows, per_row) if len(shape) >= 2 else (per_row,)


BUCKET_BASE = (127 - 24) << 8  # float bits of 2^-24, >> 15 (sign, 8 exponent, 8 mantissa bits)
BUCKETS = 24 * 256 + 1
#: the smallest value of the unsigned (second-moment) map, which has no zero (see above)
V_FLOOR = 1e-7


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values of the signed or unsigned dynamic map.

    The signed map is bitsandbytes' ``create_dynamic_map(signed=True)``; the unsigned one is
    ``create_dynamic_map(signed=False)`` with its 0 replaced by ``V_FLOOR`` (module docstring).
    """
    values: list[float] = [0.0 if signed else V_FLOOR, 1.0]
    for k in range(7):
        slices = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, slices + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        decade = centres * (10.0 ** (k - 6))
        values += decade.tolist()
        if signed:
            values += (-decade).tolist()
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def _bucket_edges() -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and (exclusive) largest |x| of every bucket, as float32."""
    keys = torch.arange(BUCKETS + 1, dtype=torch.int64) + BUCKET_BASE
    edges = (keys << 15).to(torch.int32).view(torch.float32)
    lo, hi = edges[:-1].clone(), edges[1:].clone()
    lo[0] = 0.0  # bucket 0 also holds everything below 2^-24
    hi[-1] = float("inf")  # the last bucket also holds |x| > 1 (NaN after normalisation)
    return lo, hi


def _buckets(midpoints: torch.Tensor) -> torch.Tensor:
    """The packed per-sign, per-bucket lookup the core uses (layout in cpp/spam/quant8.h).

    Entry bits 0-15: 1 + #{midpoints <= the bucket's smallest |x|-side value}; bits 16-31: the
    low 15 float bits of the one midpoint inside the bucket (its sign, exponent and top 8
    mantissa bits are the bucket's own), mirrored (0x7fff - bits) in the x < 0 half, or 0x8000
    when the bucket holds no midpoint. The core then needs one integer compare per value.
    """
    lo, hi = _bucket_edges()
    count = lambda x, right: torch.searchsorted(midpoints, x.contiguous(), right=right)  # noqa: E731
    tables = []
    for negative, base, inside_lo, inside_hi in (
        (False, count(lo, True), count(lo, True), count(hi, False)),  # x in [lo, hi)
        (True, count(-hi, True), count(-hi, True), count(-lo, True)),  # x in (-hi, -lo]
    ):
        inside = inside_hi - inside_lo
        if int(inside.max()) > 1:
            raise AssertionError("a quantisation bucket holds two midpoints; use finer buckets")
        has_mid = inside == 1
        mid = midpoints[base.clamp(max=midpoints.numel() - 1)]
        low = mid.abs().view(torch.int32).to(torch.int64) & 0x7FFF
        if bool((has_mid & ((mid.abs() < lo) | (mid.abs() >= hi))).any()):
            raise AssertionError("a bucket's midpoint lies outside the bucket")
        mirrored = 0x7FFF - low if negative else low
        mid_key = torch.where(has_mid, mirrored, torch.full_like(low, 0x8000))
        tables.append((base.to(torch.int64) + 1) | (mid_key << 16))
    packed = torch.cat(tables)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # as the int32 bit pattern


SIMD_EDGE_MARGIN = 8  # float steps a midpoint keeps from the edges of its SIMD bucket
SIMD_BINADE_LOW = 96  # exponents below are one bucket: |x| < 2^-30, far below any midpoint
# Byte offsets in the SIMD tables (the layout is drawn in cpp/spam/quant8.h).
SIMD_BASE, SIMD_MIDS, SIMD_VALUES, SIMD_BYTES = 192, 704, 1728, 2752


def _byte_planes(table: torch.Tensor) -> torch.Tensor:
    """A float32 [256] table as 4 planes of 256 bytes: byte j of entry c at 256 * j + c."""
    return table.contiguous().view(torch.uint8).view(256, 4).t().contiguous().flatten()


def _check_edge_margins(midpoints: torch.Tensor, starts: torch.Tensor) -> None:
    """Assert the SIMD buckets (smallest |x| bits of each, sorted) keep the midpoints clear of
    their edges, in float steps counted as bit patterns (see _simd_tables)."""
    magnitudes = midpoints.abs().view(torch.int32).to(torch.int64)
    edges = torch.cat([starts, torch.tensor([0x7F800000])])
    bucket = torch.searchsorted(edges, magnitudes, right=True) - 1
    if int((edges[bucket + 1] - magnitudes).min()) <= SIMD_EDGE_MARGIN:
        raise AssertionError("a midpoint lies too close below the upper edge of its SIMD bucket")
    near_lower = bucket[magnitudes - edges[bucket] <= SIMD_EDGE_MARGIN]
    if bool(torch.isin(near_lower - 1, bucket).any()):
        raise AssertionError("a midpoint lies close above a SIMD bucket edge with a midpoint below")


def _simd_tables(signed: bool, values: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """The byte tables of the AVX-512 VBMI kernels (layout in cpp/spam/quant8.h).

    Buckets of |x|: each binade e in [96, 127] is cut by its top k mantissa bits, k the
    smallest that leaves at most one midpoint per bucket (0 at both ends: the bottom bucket
    holds every |x| < 2^-30, the top one [1, 2) and NaN). A bucket's entry is the number of
    midpoints below it, so code = base + (midpoints[base] <= x).
    """
    positive = midpoints[midpoints > 0].view(torch.int32).to(torch.int64)
    shifts = torch.zeros(32, dtype=torch.int64)  # applied to the top 16 bits of |x|
    deltas = torch.zeros(32, dtype=torch.int64)
    starts: list[int] = []  # float bits of each positive bucket's smallest |x|
    for e in range(SIMD_BINADE_LOW, 128):
        inside = positive[(positive >> 23) == e]
        k = 0
        while torch.unique(inside >> (23 - k)).numel() != inside.numel():
            k += 1
        if k > 7:  # the kernels cut buckets from the top 16 bits (8 exponent, 7 mantissa)
            raise AssertionError("SIMD buckets would need more than 7 mantissa bits")
        if e in (SIMD_BINADE_LOW, 127) and (k > 0 or inside.numel() > 0):
            raise AssertionError("the end binades of the SIMD buckets must hold no midpoint")
        offset = len(starts)
        # bucket = (top16(|x|) >> (7 - k)) + offset - (e << k), or offset alone (k = 0)
        shifts[e & 31], deltas[e & 31] = (15, offset) if k == 0 else (7 - k, offset - (e << k))
        starts += [0 if e == SIMD_BINADE_LOW else (e << 23) | (j << (23 - k)) for j in range(2**k)]
    lo = torch.tensor(starts, dtype=torch.int64).to(torch.int32).view(torch.float32)
    hi = torch.cat([lo[1:], torch.tensor([float("inf")])])
    n = lo.numel()
    base = torch.zeros(512, dtype=torch.int64)
    base[:n] = torch.searchsorted(midpoints, lo, right=False)  # #{midpoints < lo}
    if int((torch.searchsorted(midpoints, hi, right=False) - base[:n]).max()) > 1:
        raise AssertionError("a SIMD quantisation bucket holds two midpoints")
    # The kernels quantise x * (1 / absmax) and divide only where a midpoint they compared
    # lies near (quant8_vbmi.h, vbmi_near_decision). So no other midpoint may come near the
    # edges of a bucket: none close below an upper edge, and none close above a lower edge
    # unless the bucket below holds no midpoint (its lookup then compares that one).
    _check_edge_margins(midpoints, torch.tensor(starts, dtype=torch.int64))
    if signed:  # x < 0: bucket(|x|) + 256 holds x in (-hi, -lo]: #{midpoints <= -hi} below it
        if n > 256:
            raise AssertionError("too many SIMD buckets for the signed map")
        negative_or = 256
        base[256 : 256 + n] = torch.searchsorted(midpoints, -hi, right=True)
    else:  # the unsigned map: every x < 0 has code 0 (bucket 511, base 0)
        if n > 511:
            raise AssertionError("too many SIMD buckets for the unsigned map")
        negative_or = 511
    if int(base.max()) > 255:
        raise AssertionError("SIMD bucket base out of range")
    header = torch.zeros(96, dtype=torch.int16)
    header[:32], header[32:64] = shifts.to(torch.int16), deltas.to(torch.int16)
    header[64] = negative_or
    # the 256th midpoint is a NaN: no x, not even +inf (a NaN-absmax block divides by 1), reaches it
    padded = torch.cat([midpoints, torch.tensor([float("nan")])])
    tables = torch.cat([header.view(torch.uint8), base.to(torch.uint8), _byte_planes(padded), _byte_planes(values)])
    assert tables.numel() == SIMD_BYTES and header.numel() * 2 == SIMD_BASE
    assert SIMD_MIDS == SIMD_BASE + 512 and SIMD_VALUES == SIMD_MIDS + 1024
    return tables


@dataclass(frozen=True)
class QuantMap:
    """A code map and the derived tables the core reads, on one device."""

    values: torch.Tensor  # float32 [256]
    midpoints: torch.Tensor  # float32 [256]: 255 midpoints, then +inf (a sentinel for the core)
    buckets: torch.Tensor  # int32 [2 * BUCKETS], packed (see _buckets)
    simd: torch.Tensor  # uint8 [SIMD_BYTES]: the AVX-512 VBMI kernels' tables (_simd_tables)
    zero_code: int  # the code nearest 0.0 (what a fresh or reset block holds; its absmax is 0)

    def quantize_reference(self, normalized: torch.Tensor) -> torch.Tensor:
        """Codes of already-normalised values: #{midpoints <= x} (readable oracle)."""
        flat = normalized.float().contiguous()
        mids = self.midpoints[:-1].to(flat.device)
        return torch.searchsorted(mids, flat, right=True).to(torch.uint8)


_CACHE: dict[tuple[bool, torch.device], QuantMap] = {}


def quant_map(signed: bool, device: torch.device | str = "cpu") -> QuantMap:
    """The (cached, read-only) signed or unsigned map with its tables on ``device``."""
    device = torch.device(device)
    key = (signed, device)
    if key not in _CACHE:
        values = dynamic_map(signed)
        midpoints = (values[:-1] + values[1:]) / 2.0
        buckets = _buckets(midpoints)
        zero_code = int(torch.searchsorted(midpoints, torch.zeros(1), right=True))
        padded = torch.cat([midpoints, torch.tensor([float("inf")])])
        simd = _simd_tables(signed, values, midpoints)
        _CACHE[key] = QuantMap(values.to(device), padded.to(device), buckets.to(device), simd.to(device), zero_code)
    return _CACHE[key]
