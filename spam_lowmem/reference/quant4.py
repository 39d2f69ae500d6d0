"""Pure-PyTorch reference (oracle) for the 4-bit quantisers, docs/algorithms.md §5.

Readable, vectorised over groups, fp32 math, one torch op per C++ operation of
``cpp/spam/quant4.h`` so the compiled kernels match it bit for bit. Conventions:

* a group is ``group_size`` consecutive elements of the row-major flattened tensor, so groups
  may straddle rows (as in the authors' code). Weights need ``numel % group_size == 0``;
  activations may end with one shorter tail group (the batch size is not the layer's choice);
* rounding is round-half-to-even (``torch.round``, the authors' rule);
* "top-2" outliers: the two largest ``|x|`` of a group, ties to the lower index;
* divisions by constants use 0-dim tensors: ``x / 15`` with a Python scalar may be computed as
  ``x * (1/15)``, which differs from the C++ division in the last bit;
* edge rules (``quant4.h``, "Edge rules"): non-finite entries (NaN, +-Inf) pass through the fake
  quantisers unchanged and are left out of their group's statistics (min/max, top-2,
  max|rest|), so the finite entries are quantised over the finite range; finite data whose
  plain formula would overflow fp32 uses an equivalent order that does not (int4 weights:
  ``scale = max/15 - min/15`` when ``max - min`` overflows; int4 activations:
  ``round(7 * (x / scale))`` and ``q * (scale / 7)`` when ``x * 7`` or ``q * scale`` overflow);
  dequantised codes saturate at +-FLT_MAX.

Packed layout (nibble order pinned in ``quant4.h``): element ``2i`` in the low nibble of byte
``i``, element ``2i+1`` in the high nibble::

    byte i:  | bits 7..4: elem 2i+1 | bits 3..0: elem 2i |

Imports only ``torch``; never the compiled extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "fake_act_int4",
    "fake_fp4",
    "fake_weight_int4",
    "pack",
    "pack_nibbles",
    "requant_sr",
    "sr_uniform",
    "unpack",
    "unpack_nibbles",
]

WEIGHT_SCALE_MIN = 1e-5
ACT_SCALE_MIN = 1e-6
FP4_ZERO = 4
FLOAT_MAX = torch.finfo(torch.float32).max
MAX_SCALE_MOVES = 320
LEVEL_TOL = 2.0**-16  # quant4.h kLevelTol: "already on the lattice" tolerance, in levels


def _c(v: float, like: Tensor) -> Tensor:
    """fp32 0-dim constant on ``like``'s device (keeps divisions true divisions)."""
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def _rows(x: Tensor, group_size: int) -> tuple[Tensor, Tensor | None]:
    """fp32 (groups, G) view of the whole groups and the (1, n) tail group, if any."""
    flat = x.reshape(-1).float()
    whole = flat.numel() // group_size * group_size
    tail = flat[whole:].reshape(1, -1) if whole < flat.numel() else None
    return flat[:whole].reshape(-1, group_size), tail


def _join(parts: list[Tensor | None], like: Tensor) -> Tensor:
    flat = torch.cat([p.reshape(-1) for p in parts if p is not None])
    return flat.to(like.dtype).reshape(like.shape)


def top2(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Indices (groups, 2) of the two largest |x| per row, ties to the lower index, and the
    largest |x| of the rest (0 for rows of <= 2 finite elements). Non-finite entries count as
    magnitude -1: never above a finite one, never in the rest's max (torch.sort would rank a
    NaN above everything)."""
    a = torch.where(rows.isfinite(), rows.abs(), _c(-1.0, rows))
    k = min(2, rows.shape[1])
    idx = torch.sort(a, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, True)
    return idx, a.masked_fill(mask, 0.0).amax(dim=1, keepdim=True)


def _int4_weight_grid(rows: Tensor) -> tuple[Tensor, Tensor]:
    finite = rows.isfinite()
    inf = _c(float("inf"), rows)
    lo = torch.where(finite, rows, inf).amin(dim=1, keepdim=True)  # over the finite entries
    hi = torch.where(finite, rows, -inf).amax(dim=1, keepdim=True)
    fifteen = _c(15.0, rows)
    span = hi - lo
    # max - min of finite values can overflow (1e38 - -1e38... up to 2*FLT_MAX): split the division
    scale = torch.where(span.isfinite(), span.clamp(min=WEIGHT_SCALE_MIN) / fifteen, hi / fifteen - lo / fifteen)
    zero = (-torch.round(lo / scale)).clamp(0, 15)
    return scale, zero


def _int4_weight_codes(rows: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (torch.round(rows / scale) + zero).clamp(0, 15)


def _dequant(codes: Tensor, zero: Tensor, scale: Tensor) -> Tensor:
    """``(code - zero) * scale``, saturated at +-FLT_MAX (a rounded zero point can put the top
    level scale/2 beyond the group's range); NaN passes through, as in quant4.h."""
    return ((codes - zero) * scale).clamp(-FLOAT_MAX, FLOAT_MAX)


def fake_weight_int4(w: Tensor, group_size: int) -> Tensor:
    """INT4 asymmetric min-max fake quantisation (docs/algorithms.md §5.2), per group. NaN/Inf
    entries pass through; the finite ones use the min/max of the group's finite entries."""
    rows, _ = _rows(w, group_size)
    scale, zero = _int4_weight_grid(rows)
    fake = _dequant(_int4_weight_codes(rows, scale, zero), zero, scale)
    return _join([torch.where(rows.isfinite(), fake, rows)], w)


def _keep_top2(rows: Tensor, fake: Tensor, idx: Tensor) -> Tensor:
    """The top-2 restored exactly, and the non-finite entries passed through."""
    fake = torch.where(rows.isfinite(), fake, rows)
    return fake.scatter(1, idx, rows.gather(1, idx))


def _act_int4_rows(rows: Tensor) -> Tensor:
    idx, rest = top2(rows)
    scale = rest.clamp(min=ACT_SCALE_MIN)
    seven = _c(7.0, rows)
    x7 = rows * seven  # overflows for |x| > FLT_MAX/7: then 7 * (x / scale), as quant4.h
    q = torch.round(torch.where(x7.isfinite(), x7 / scale, seven * (rows / scale))).clamp(-8, 7)
    qs = q * scale
    return _keep_top2(rows, torch.where(qs.isfinite(), qs / seven, q * (scale / seven)), idx)


def _fp4_step(rest: Tensor) -> Tensor:
    return rest.clamp(min=ACT_SCALE_MIN) * _c(0.25, rest)


def _fp4_rows(rows: Tensor) -> Tensor:
    idx, rest = top2(rows)
    step = _fp4_step(rest)
    return _keep_top2(rows, torch.round(rows / step).clamp(-4, 4) * step, idx)


def fake_act_int4(x: Tensor, group_size: int) -> Tensor:
    """INT4 symmetric fake quantisation with the top-2 |x| kept exact (§5.2); tail allowed.
    NaN/Inf entries pass through and are not candidates for the top-2 nor part of max|rest|."""
    rows, tail = _rows(x, group_size)
    return _join([_act_int4_rows(rows), None if tail is None else _act_int4_rows(tail)], x)


def fake_fp4(x: Tensor, group_size: int) -> Tensor:
    """The authors' "FP4": 9-level grid {0,±.25,±.5,±.75,±1}·alpha, top-2 exact (§5.3).
    NaN/Inf entries pass through and are not candidates for the top-2 nor part of alpha."""
    rows, tail = _rows(x, group_size)
    return _join([_fp4_rows(rows), None if tail is None else _fp4_rows(tail)], x)


# ------------------------------------------------------------------------ nibbles
def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes (even count, values 0..15) -> bytes; element 2i in the low nibble."""
    c = codes.reshape(-1, 2).to(torch.uint8)
    return c[:, 0] | (c[:, 1] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """bytes -> uint8 codes, inverse of :func:`pack_nibbles`."""
    return torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)


# ------------------------------------------------------------------------ packing
def pack(w: Tensor, fmt: str, group_size: int) -> dict[str, Tensor]:
    """Round-to-nearest packing: ``codes`` (uint8, numel/2), ``scale`` (fp32, groups) and
    ``zero`` (uint8, int4) or ``outlier_idx`` (int16, groups x 2) + ``outlier_val`` (fp32)."""
    rows, _ = _rows(w, group_size)
    if fmt == "int4":
        scale, zero = _int4_weight_grid(rows)
        codes = _int4_weight_codes(rows, scale, zero)
        return {"codes": pack_nibbles(codes), "scale": scale.reshape(-1), "zero": zero.reshape(-1).to(torch.uint8)}
    idx, rest = top2(rows)
    step = _fp4_step(rest)
    codes = (torch.round(rows / step).clamp(-4, 4) + FP4_ZERO).scatter(1, idx, float(FP4_ZERO))
    return {
        "codes": pack_nibbles(codes),
        "scale": step.reshape(-1),
        "outlier_idx": idx.to(torch.int16),
        "outlier_val": rows.gather(1, idx),
    }


def unpack(
    p: dict[str, Tensor], fmt: str, group_size: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Dequantise: ``(code - zero) * scale`` (zero = 4 for fp4), then fp4 outliers exact."""
    codes = unpack_nibbles(p["codes"]).float().reshape(-1, group_size)
    scale = p["scale"].reshape(-1, 1)
    if fmt == "int4":
        out = _dequant(codes, p["zero"].float().reshape(-1, 1), scale)
    else:
        out = _dequant(codes, _c(float(FP4_ZERO), codes), scale)
        out = out.scatter(1, p["outlier_idx"].long(), p["outlier_val"])
    return out.to(dtype).reshape(shape)


# ------------------------------------------------------------------------ stochastic rounding
_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64_tensor(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 bit patterns (torch int64 + and * wrap mod 2^64)."""
    x = x + _i64(0x9E3779B97F4A7C15)
    x = (x ^ _srl(x, 30)) * _i64(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _i64(0x94D049BB133111EB)
    return x ^ _srl(x, 31)


def _mix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sr_uniform(seed: int, step: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """The 24-bit uniforms in [0, 1) that requantisation ``step`` draws for elements 0..numel-1."""
    key = _mix64_int((seed ^ _mix64_int(step & _MASK64)) & _MASK64)
    i = torch.arange(numel, dtype=torch.int64, device=device)
    bits = _srl(_mix64_tensor(i ^ _i64(key)), 40)
    return bits.float() * (2.0**-24)


def _sr_round(v: Tensor, u: Tensor) -> Tensor:
    """floor(v) + [u < frac(v)], except that values within 2^-16 of an integer snap to it."""
    r = torch.round(v)
    f = torch.floor(v)
    return torch.where((v - r).abs() <= LEVEL_TOL, r, f + (u < v - f).float())


def _int4_requant_grid(old_scale: Tensor, old_zero: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group (scale, zero) after an update: scale moves by powers of two only (quant4.h)."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    min_scale = _c(WEIGHT_SCALE_MIN, lo) / _c(15.0, lo)
    fifteen = _c(15.0, lo)

    def zrange(s: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.floor(lo / s + LEVEL_TOL), torch.floor((fifteen - hi / s) + LEVEL_TOL)

    s = torch.where((old_scale > 0) & old_scale.isfinite(), old_scale, min_scale)
    zlo, zhi = zrange(s)
    for _ in range(MAX_SCALE_MOVES):
        grow = ~(zlo <= zhi)
        if not bool(grow.any()):
            break
        s = torch.where(grow, s * 2, s)
        zlo, zhi = zrange(s)
    same = s == old_scale
    hlo, hhi = zrange(s * 0.5)
    shrink = same & (s * 0.5 >= min_scale) & (hhi - hlo >= 4)
    s = torch.where(shrink, s * 0.5, s)
    zlo, zhi = torch.where(shrink, hlo, zlo).clamp(0, 15), torch.where(shrink, hhi, zhi).clamp(0, 15)
    same = same & ~shrink
    keep = same & (old_zero >= zlo) & (old_zero <= zhi)
    return s, torch.where(keep, old_zero, torch.floor((zlo + zhi) * 0.5))


def _fp4_requant_step(old: Tensor, rest: Tensor) -> Tensor:
    min_step = _c(ACT_SCALE_MIN, rest) * 0.25
    s = torch.where((old > 0) & old.isfinite(), old, min_step)
    for _ in range(MAX_SCALE_MOVES):
        grow = ~(rest / s <= 4)
        if not bool(grow.any()):
            break
        s = torch.where(grow, s * 2, s)
    shrink = (s == old) & (s * 0.5 >= min_step) & (rest / (s * 0.5) <= 3)
    return torch.where(shrink, s * 0.5, s)


def requant_sr(w: Tensor, p: dict[str, Tensor], fmt: str, group_size: int, seed: int, step: int) -> dict[str, Tensor]:
    """Stochastic-rounding re-quantisation of the working copy ``w`` given the old packed
    ``p``; returns new buffers. Groups with a non-finite value keep their old data (the
    caller raises)."""
    rows, _ = _rows(w, group_size)
    if w.dtype != torch.float32:
        # a bf16/fp16 working copy was materialised as round(old): round the optimizer's
        # change added to the exact old value, so untouched elements keep their code
        old = unpack(p, fmt, group_size, tuple(rows.shape))
        rows = old + (rows - old.to(w.dtype).float())
    u = sr_uniform(seed, step, rows.numel(), rows.device).reshape(rows.shape)
    bad = ~rows.isfinite().all(dim=1, keepdim=True)
    safe = torch.where(bad, torch.zeros_like(rows), rows)
    old_codes = unpack_nibbles(p["codes"]).reshape(rows.shape)
    out: dict[str, Tensor] = {}
    if fmt == "int4":
        old_scale, old_zero = p["scale"].reshape(-1, 1), p["zero"].float().reshape(-1, 1)
        scale, zero = _int4_requant_grid(old_scale, old_zero, safe.amin(1, keepdim=True), safe.amax(1, keepdim=True))
        codes = _sr_round(safe / scale + zero, u).clamp(0, 15)
        out["zero"] = torch.where(bad, old_zero, zero).reshape(-1).to(torch.uint8)
    else:
        idx, rest = top2(safe)
        old_scale = p["scale"].reshape(-1, 1)
        scale = _fp4_requant_step(old_scale, rest)
        codes = (_sr_round(safe / scale, u).clamp(-4, 4) + FP4_ZERO).scatter(1, idx, float(FP4_ZERO))
        out["outlier_idx"] = torch.where(bad, p["outlier_idx"], idx.to(torch.int16))
        out["outlier_val"] = torch.where(bad, p["outlier_val"], safe.gather(1, idx))
    out["scale"] = torch.where(bad, old_scale, scale).reshape(-1)
    out["codes"] = pack_nibbles(torch.where(bad, old_codes, codes.to(torch.uint8)))
    return out
