"""Typed entry points to the 4-bit quantisers of the C++/CUDA core (docs/algorithms.md §5).

Formats (``fmt``), each per group of ``group_size`` consecutive elements of the flattened
tensor (groups may straddle rows, as in the authors' code):

* ``"int4"`` — weights: asymmetric min-max INT4; activations: symmetric INT4 with the top-2
  ``|x|`` of each group kept exact;
* ``"fp4"`` — the authors' "FP4", a uniform 9-level grid ``{0,±.25,±.5,±.75,±1}·alpha`` with
  the top-2 ``|x|`` kept exact, for weights and activations alike.

Rounding is round-half-to-even (``torch.round``). Weights need ``numel % group_size == 0``
(a layer's shape is fixed, so a mismatch is a configuration error). Activations may end with
one shorter tail group: their element count depends on the batch, and the authors' code
(which would crash there) gives the same result whenever the count divides; a
``group_size`` larger than the activation makes the whole tensor one group.

Edge rules of the fake quantisers (identical in the C++ and CUDA kernels and the reference):

* **non-finite entries** (NaN, +-Inf) pass through unchanged, and each group's statistics
  (min/max for int4 weights, the top-2 and max|rest| otherwise) are taken over its *finite*
  entries, which are quantised as if the non-finite ones were absent: one overflowed value
  neither turns its group into NaN nor rescales it, and a NaN stays visible downstream.
  Packing (:func:`pack_weight`, :func:`requantize_`) refuses such groups instead;
* **finite data near the fp32 limit** never overflows inside the quantiser: where the plain
  formula would (int4 weights: ``max - min`` of values of opposite sign beyond FLT_MAX; int4
  activations: ``x * 7`` or ``q * scale``), an equivalent order is used (``max/15 - min/15``,
  ``round(7 * (x / scale))``, ``q * (scale / 7)``); elsewhere the plain formula, so ordinary
  data keeps its bits;
* dequantised codes **saturate** at +-FLT_MAX: the rounded int4 zero point can put the top
  level up to half a step beyond the group's range, which for data near FLT_MAX would round
  to Inf. (Storing the fp32 result to bf16/fp16 still rounds as that dtype does.)

The packed form (:class:`PackedWeight`) stores two codes per byte, element ``2i`` in the low
nibble of byte ``i``, plus fp32 per-group metadata; the layout is drawn in
``cpp/spam/quant4_ops.h``. Pure-PyTorch oracle: :mod:`spam_lowmem.reference.quant4`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
from torch.utils.dlpack import to_dlpack

from . import _backend

__all__ = [
    "Format",
    "FORMATS",
    "PackedWeight",
    "check_format",
    "check_group_size",
    "fake_quantize_weight",
    "fake_quantize_activation",
    "pack_weight",
    "unpack_weight",
    "requantize_",
    "packed_bytes_per_weight",
]

Format = Literal["int4", "fp4"]
FORMATS: tuple[str, ...] = ("int4", "fp4")
_FMT_CODE = {"int4": 0, "fp4": 1}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP4_MAX_GROUP = 32767  # fp4 outlier positions are stored as int16


def check_format(fmt: object) -> None:
    """Raise TypeError/ValueError unless ``fmt`` is one of :data:`FORMATS`."""
    if not isinstance(fmt, str):
        raise TypeError(f"spam_lowmem: fmt must be a string, one of {FORMATS}; got {type(fmt).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"spam_lowmem: unsupported 4-bit format {fmt!r}; expected one of {FORMATS}")


def check_group_size(
    group_size: object, numel: int | None = None, *, what: str = "weight", packed: bool = False, fmt: str = "int4"
) -> None:
    """Validate a group size; ``numel`` (weights) must be a multiple of it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"spam_lowmem: group_size must be an int, got {type(group_size).__name__}")
    if group_size <= 0:
        raise ValueError(f"spam_lowmem: group_size must be positive, got {group_size}")
    if numel is not None and numel % group_size != 0:
        raise ValueError(
            f"spam_lowmem: group_size {group_size} does not divide the {numel} elements "
            f"of the {what}; choose a divisor of numel"
        )
    if packed and group_size % 2 != 0:
        raise ValueError(f"spam_lowmem: packed storage needs an even group_size, got {group_size}")
    if packed and fmt == "fp4" and group_size > FP4_MAX_GROUP:
        raise ValueError(f"spam_lowmem: packed fp4 needs group_size <= {FP4_MAX_GROUP}, got {group_size}")


def _check_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"spam_lowmem: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"spam_lowmem: {name} dtype {t.dtype} is not supported; use float32, bfloat16 or float16")
    _backend.check_device(t.device, name)


def _stream(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    return {"stream": torch.cuda.current_stream(device).cuda_stream}


def fake_quantize_weight(w: torch.Tensor, *, fmt: Format = "int4", group_size: int = 256) -> torch.Tensor:
    """Quantise then dequantise a weight (new tensor, same shape and dtype). NaN/Inf entries
    pass through; each group is quantised over its finite entries (module docstring)."""
    check_format(fmt)
    _check_tensor(w, "weight")
    check_group_size(group_size, w.numel(), what="weight")
    src = w.detach().contiguous()
    out = torch.empty_like(src)
    if src.numel():
        module = _backend.module_for(src.device)
        fn = module.q4_fake_weight_int4 if fmt == "int4" else module.q4_fake_fp4
        fn(to_dlpack(src), to_dlpack(out), group_size, **_stream(src.device))
    return out


def fake_quantize_activation(x: torch.Tensor, *, fmt: Format = "int4", group_size: int = 256) -> torch.Tensor:
    """Quantise then dequantise an activation; the top-2 finite ``|x|`` per group stay exact and
    NaN/Inf entries pass through (module docstring). ``group_size`` must be a positive int; one
    larger than ``x.numel()`` makes the whole tensor one group (same result, and no memory is
    spent on elements that do not exist)."""
    check_format(fmt)
    _check_tensor(x, "activation")
    check_group_size(group_size, None, what="activation")
    src = x.detach().contiguous()
    out = torch.empty_like(src)
    if src.numel():
        group = min(group_size, src.numel())  # also keeps a huge Python int within int64
        module = _backend.module_for(src.device)
        fn = module.q4_fake_act_int4 if fmt == "int4" else module.q4_fake_fp4
        fn(to_dlpack(src), to_dlpack(out), group, **_stream(src.device))
    return out


@dataclass
class PackedWeight:
    """A 4-bit weight: nibble codes plus per-group fp32 metadata (layout: quant4_ops.h).

    ``zero`` is set for int4, ``outlier_idx``/``outlier_val`` for fp4 (the two elements per
    group kept exact: int16 position within the group, fp32 value).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    outlier_idx: torch.Tensor | None
    outlier_val: torch.Tensor | None
    shape: tuple[int, ...]
    fmt: str
    group_size: int

    @classmethod
    def empty(
        cls, shape: tuple[int, ...], *, fmt: Format, group_size: int, device: torch.device | str = "cpu"
    ) -> PackedWeight:
        """Uninitialised buffers for a weight of ``shape``."""
        check_format(fmt)
        numel = 1
        for s in shape:
            numel *= int(s)
        check_group_size(group_size, numel, packed=True, fmt=fmt)
        groups = numel // group_size
        int4 = fmt == "int4"
        return cls(
            codes=torch.empty(numel // 2, dtype=torch.uint8, device=device),
            scale=torch.empty(groups, dtype=torch.float32, device=device),
            zero=torch.empty(groups, dtype=torch.uint8, device=device) if int4 else None,
            outlier_idx=None if int4 else torch.empty(groups, 2, dtype=torch.int16, device=device),
            outlier_val=None if int4 else torch.empty(groups, 2, dtype=torch.float32, device=device),
            shape=tuple(int(s) for s in shape),
            fmt=fmt,
            group_size=group_size,
        )

    @property
    def numel(self) -> int:
        return self.codes.numel() * 2

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers that exist for this format, by name."""
        names = ("codes", "scale", "zero", "outlier_idx", "outlier_val")
        return {n: t for n in names if (t := getattr(self, n)) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def _capsules(self) -> list[object | None]:
        return [
            None if t is None else to_dlpack(t)
            for t in (self.codes, self.scale, self.zero, self.outlier_idx, self.outlier_val)
        ]

    def _ref(self, module: ModuleType, *, seed: int, step: int) -> object:
        """This weight as ``module``'s PackedWeightRef (checked there) for one fused optimizer
        update whose stochastic rounding uses the counter (``seed``, ``step``)."""
        return module.PackedWeightRef(
            *self._capsules(),
            numel=self.numel,
            fmt=_FMT_CODE[self.fmt],
            group=self.group_size,
            seed=int(seed) & (2**64 - 1),
            step=int(step) & (2**64 - 1),
        )


def packed_bytes_per_weight(fmt: Format, group_size: int = 256) -> float:
    """Storage bytes per weight element: 0.5 for the codes plus the per-group metadata
    (int4: fp32 scale + uint8 zero = 5 B; fp4: fp32 step + 2 x (int16 + fp32) = 16 B)."""
    check_format(fmt)
    check_group_size(group_size, None, packed=True, fmt=fmt)
    return 0.5 + (5 if fmt == "int4" else 16) / group_size


def _bad_counter(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int64, device=device)


def _raise_nonfinite(bad: torch.Tensor, what: str) -> None:
    n = int(bad.item())  # one host sync on CUDA, by design: the caller asked for the check
    if n:
        raise ValueError(
            f"spam_lowmem: {what}: {n} group(s) contain NaN or Inf; the packed data of those groups was left unchanged"
        )


def pack_weight(
    w: torch.Tensor, *, fmt: Format = "int4", group_size: int = 256, out: PackedWeight | None = None
) -> PackedWeight:
    """Round-to-nearest packing with the format's own grid, so ``unpack_weight(pack_weight(w))``
    equals :func:`fake_quantize_weight` bit for bit. Raises ValueError on non-finite weights."""
    check_format(fmt)
    _check_tensor(w, "weight")
    check_group_size(group_size, w.numel(), packed=True, fmt=fmt)
    src = w.detach().contiguous()
    if out is None:
        out = PackedWeight.empty(tuple(w.shape), fmt=fmt, group_size=group_size, device=src.device)
    elif (out.fmt, out.group_size, out.numel) != (fmt, group_size, w.numel()):
        raise ValueError("spam_lowmem: 'out' has a different format, group size or size")
    bad = _bad_counter(src.device)
    _backend.module_for(src.device).q4_pack(
        to_dlpack(src), *out._capsules(), to_dlpack(bad), fmt=_FMT_CODE[fmt], group=group_size, **_stream(src.device)
    )
    _raise_nonfinite(bad, "pack_weight")
    return out


def unpack_weight(
    packed: PackedWeight, *, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantise ``packed`` into a new tensor of ``packed.shape`` (or into ``out``)."""
    if out is None:
        out = torch.empty(packed.shape, dtype=dtype, device=packed.codes.device)
    _check_tensor(out, "out")
    if not out.is_contiguous() or out.numel() != packed.numel:
        raise ValueError("spam_lowmem: 'out' must be contiguous with the packed weight's numel")
    _backend.module_for(out.device).q4_unpack(
        *packed._capsules(),
        to_dlpack(out.detach()),
        fmt=_FMT_CODE[packed.fmt],
        group=packed.group_size,
        **_stream(out.device),
    )
    return out


def requantize_(
    w: torch.Tensor, packed: PackedWeight, *, seed: int, step: int, check_finite: bool = True
) -> torch.Tensor:
    """Re-quantise the updated weight ``w`` into ``packed`` in place, with stochastic rounding
    (unbiased: E[dequant] = w for every element inside the group's window, which the grid
    choice guarantees; see ``cpp/spam/quant4.h``). Uniforms are a pure function of
    (``seed``, ``step``, element index), identical on CPU and CUDA.

    Groups containing NaN/Inf keep their old packed data; with ``check_finite`` their count
    raises ValueError (one host sync on CUDA). Returns the count as a 1-element int64 tensor.
    """
    _check_tensor(w, "weight")
    if w.numel() != packed.numel:
        raise ValueError(f"spam_lowmem: weight has {w.numel()} elements, packed has {packed.numel}")
    src = w.detach().contiguous()
    bad = _bad_counter(src.device)
    _backend.module_for(src.device).q4_requant_sr(
        to_dlpack(src),
        *packed._capsules(),
        to_dlpack(bad),
        fmt=_FMT_CODE[packed.fmt],
        group=packed.group_size,
        seed=int(seed) & (2**64 - 1),
        step=int(step) & (2**64 - 1),
        **_stream(src.device),
    )
    if check_finite:
        _raise_nonfinite(bad, "requantize_")
    return bad
