"""The 8-bit code maps of the optimizer state, defined once and shared by every backend.

Two maps of 256 sorted values (Dettmers' "dynamic" data type, arXiv 1511.04561, with the
parameters bitsandbytes and torchao use for their 8-bit optimizers):

* signed (first moment): 0, 1.0 and, for each decade 10^-6 ... 10^0, 2^k values
  ``+-10^(k-6) * c`` where c runs over the centres of 2^k equal slices of [0.1, 1]
  (k = 0..6): 127 negative values, 0, and 128 positive ones up to 1.0;
* unsigned (second moment): 0, 1.0 and 2^(k+1) positive values per decade.

A value x of a block with absolute maximum A is stored as the code
``#{midpoints <= x / A}``: the nearest map value, ties going to the larger code.
The C++/CUDA core receives the map, its midpoints and a bucket table that turns that count
into one table read and one compare (see cpp/spam/quant8.h, which documents the layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["QuantMap", "dynamic_map", "quant_map", "BLOCK_SIZE", "BUCKETS"]

BLOCK_SIZE = 256
BUCKET_BASE = (127 - 24) << 8  # float bits of 2^-24, >> 15 (sign, 8 exponent, 8 mantissa bits)
BUCKETS = 24 * 256 + 1


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted float32 values of the signed or unsigned dynamic map."""
    values: list[float] = [0.0, 1.0]
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
        (False, count(lo, True), count(lo, True), count(hi, False)),     # x in [lo, hi)
        (True, count(-hi, True), count(-hi, True), count(-lo, True)),    # x in (-hi, -lo]
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


@dataclass(frozen=True)
class QuantMap:
    """A code map and the derived tables the core reads, on one device."""

    values: torch.Tensor  # float32 [256]
    midpoints: torch.Tensor  # float32 [256]: 255 midpoints, then +inf (a sentinel for the core)
    buckets: torch.Tensor  # int32 [2 * BUCKETS], packed (see _buckets)
    zero_code: int  # the code of 0.0 (what a fresh or reset block holds)

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
        _CACHE[key] = QuantMap(values.to(device), padded.to(device), buckets.to(device), zero_code)
    return _CACHE[key]
