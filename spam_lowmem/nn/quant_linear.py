"""``QuantLinear``: a linear layer trained with 4-bit weights and activations (W4A4,
docs/algorithms.md §5): ``y = Q(x) @ Q(W)^T (+ b)``, backward ``grad_x = grad_y @ Q(W)``,
``grad_W = grad_y^T @ Q(x)`` (straight-through for the weight), gradients unquantised.

Two storages:

* ``"fake"`` — the authors' setup: a full-precision master ``weight`` Parameter, fake
  quantised on every forward. Same state-dict keys as ``nn.Linear``.
* ``"packed"`` — no persistent full-precision copy. The weight lives as nibble codes plus
  per-group metadata (buffers ``weight_codes``, ``weight_scale`` and ``weight_zero`` for int4 or
  ``weight_outlier_idx``/``weight_outlier_val`` for fp4; layout in ``cpp/spam/quant4_ops.h``)::

        weight_codes  uint8 [out*in/2]   | e1 e0 | e3 e2 | ...   (element 2i: low nibble)
        weight_scale  fp32  [groups]     one per group_size consecutive elements
        weight_zero   uint8 [groups]     int4 zero point

  The forward/backward dequantise the codes into a temporary (they *are* the 4-bit weight,
  so there is no second quantisation). ``weight`` stays a real Parameter so any optimizer can
  hold it, but it is *transient*: between steps it is a 1-element NaN placeholder expanded to
  ``(out, in)`` (right shape for autograd and optimizer state, one element of storage, NaN if
  read by mistake; an in-place update on it raises). Around ``optimizer.step()`` the hooks of
  :func:`attach_packed_requant` step the codes in place. With a spam_lowmem optimizer (SPAM,
  StableSPAM, AdamW) this is *fused*: the optimizer steps the packed buffers directly, one
  pass per quantisation group (unpack, element update, stochastic re-quantisation, pack), and
  the weight is never materialised: the backward's gradient (a full tensor in the weight's
  dtype, as for any layer) and the optimizer's moments are the only full-size tensors. With
  any other optimizer the hooks materialise the weight (unpack into a working copy), let the
  optimizer update it, then re-quantise it and release it (three passes). Both paths give the
  same codes bit for bit. The working dtype is the module's dtype (fp32 by default; bf16 halves
  the gradient and the optimizer state; the re-quantiser adds the optimizer's change to the
  exact stored value, so the working value's own bf16 rounding never moves a code).

  State dict of a packed layer: the buffers above, ``weight_sr_state`` (rounding counter), and
  ``weight`` as a *0-element marker* in the working dtype. The marker makes any loader that
  expects a dense ``(out, in)`` weight fail on a size mismatch (``nn.Linear.load_state_dict``,
  transformers' ``from_pretrained``) instead of silently keeping random weights; QuantLinear
  ignores it. Loaded packed buffers are validated (dtype, shape, zero points <= 15, fp4
  outlier positions inside the group) and a bad one raises ValueError naming its key.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import quant4 as q4

__all__ = ["QuantConfig", "QuantLinear", "STORAGES"]

STORAGES: tuple[str, ...] = ("fake", "packed")
_ACT_BITS = (4, 16)  # 16: activations not quantised (W4A16)


@dataclass(frozen=True)
class QuantConfig:
    """Validated quantisation settings of one layer."""

    fmt: str = "int4"
    weight_bits: int = 4
    act_bits: int = 4
    group_size: int = 256
    storage: str = "fake"

    def __post_init__(self) -> None:
        q4.check_format(self.fmt)
        for name in ("weight_bits", "act_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"spam_lowmem: {name} must be an int, got {type(value).__name__}")
        if self.weight_bits != 4:
            raise ValueError(f"spam_lowmem: weight_bits={self.weight_bits} is not supported (only 4)")
        if self.act_bits not in _ACT_BITS:
            raise ValueError(
                f"spam_lowmem: act_bits={self.act_bits} is not supported; use 4, or 16 to leave activations unquantised"
            )
        if not isinstance(self.storage, str) or self.storage not in STORAGES:
            raise ValueError(f"spam_lowmem: storage={self.storage!r} is not one of {STORAGES}")
        q4.check_group_size(self.group_size, None, packed=self.storage == "packed", fmt=self.fmt)

    def check_weight(self, numel: int, name: str = "weight") -> None:
        q4.check_group_size(self.group_size, numel, what=name, packed=self.storage == "packed", fmt=self.fmt)


def _quant_act(x: Tensor, cfg: QuantConfig) -> Tensor:
    if cfg.act_bits == 16:
        return x
    return q4.fake_quantize_activation(x, fmt=cfg.fmt, group_size=cfg.group_size)  # type: ignore[arg-type]


class _QuantLinearFn(torch.autograd.Function):
    """Q(x) @ Q(W)^T with the straight-through weight gradient. ``module`` supplies Q(W): the
    fake-quantised master weight, or the unpacked codes (recomputed in backward rather than
    kept alive between the passes)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, module: QuantLinear) -> Tensor:
        xq = _quant_act(x.reshape(-1, x.shape[-1]).contiguous(), module.config)
        wq = module.quantized_weight(x.dtype)
        y = xq @ wq.t()
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.module = module
        ctx.x_shape = x.shape
        ctx.save_for_backward(xq, weight)  # weight: so torch catches an in-place change before backward
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        xq, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(xq.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ ctx.module.quantized_weight(xq.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ xq).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0)
        return grad_x, grad_w, grad_b, None


def _placeholder(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The released weight: one NaN viewed as ``shape`` (stride 0)."""
    return torch.full((), math.nan, dtype=dtype, device=device).expand(shape)


class QuantLinear(nn.Module):
    """Linear layer with 4-bit weights and activations; see the module docstring.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        fmt: ``"int4"`` (min-max weights, INT4 activations with top-2 outliers) or ``"fp4"``.
        weight_bits: 4. act_bits: 4, or 16 for unquantised activations.
        group_size: elements per quantisation group (default 256); must divide
            ``in_features * out_features`` (groups may straddle rows).
        storage: ``"fake"`` (full-precision master weight) or ``"packed"`` (Memory at rest:
            0.5 + 5/group_size bytes per weight for int4, 0.5 + 16/group_size for fp4, i.e.
            0.52 / 0.56 B at group 256, plus the bias; the fused step of a spam_lowmem
            optimizer needs no working copy, the unfused path holds one in the module's dtype
            during a step).
        device, dtype: of the weight (for packed storage: of the transient working copy).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        fmt: str = "int4",
        weight_bits: int = 4,
        act_bits: int = 4,
        group_size: int = 256,
        storage: str = "fake",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        _weight: nn.Parameter | None = None,
        _bias: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.config = QuantConfig(fmt, weight_bits, act_bits, group_size, storage)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.config.check_weight(self.in_features * self.out_features)
        if _weight is None:
            _weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(_weight, a=math.sqrt(5))  # nn.Linear's initialisation
        if bias and _bias is None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            _bias = nn.Parameter(torch.empty(out_features, device=_weight.device, dtype=_weight.dtype))
            nn.init.uniform_(_bias, -bound, bound)
        self.weight = _weight
        self.bias = _bias if bias else None
        self._materialized = True
        self._warned_unattached = False
        self.requant_attached = 0
        if storage == "packed":
            self._init_packed()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **config: Any) -> QuantLinear:
        """Wrap ``linear``, reusing its Parameter objects (an optimizer built on the original
        model keeps working). Packed storage packs the weight round-to-nearest."""
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            **config,
            _weight=linear.weight,
            _bias=linear.bias,
        )

    # ------------------------------------------------------------------ packed storage
    @property
    def storage(self) -> str:
        return self.config.storage

    def _init_packed(self) -> None:
        w = self.weight
        if not bool(torch.isfinite(w.detach()).all()):
            raise ValueError("spam_lowmem: QuantLinear weight contains NaN or Inf")
        packed = q4.pack_weight(w.detach(), fmt=self.config.fmt, group_size=self.config.group_size)  # type: ignore[arg-type]
        for name, t in packed.tensors().items():
            self.register_buffer("weight_" + name, t)
        self._sr_seed = int(torch.randint(0, 2**62, ()).item())  # follows torch.manual_seed
        self._sr_step = 0
        self.release(requantize=False)

    def packed_weight(self) -> q4.PackedWeight:
        """View of the packed buffers (shared storage, not a copy)."""
        b = self._buffers
        return q4.PackedWeight(
            codes=b["weight_codes"],
            scale=b["weight_scale"],
            zero=b.get("weight_zero"),  # type: ignore[arg-type]
            outlier_idx=b.get("weight_outlier_idx"),
            outlier_val=b.get("weight_outlier_val"),
            shape=(self.out_features, self.in_features),
            fmt=self.config.fmt,
            group_size=self.config.group_size,
        )

    @property
    def is_materialized(self) -> bool:
        """Whether ``weight`` currently holds real values (always true for fake storage)."""
        return self._materialized

    def materialize(self) -> None:
        """Packed: make ``weight`` a real tensor (its dtype) holding the dequantised codes."""
        if self.storage != "packed" or self._materialized:
            return
        self.weight.data = q4.unpack_weight(self.packed_weight(), dtype=self.weight.dtype)
        self._materialized = True

    def release(self, *, requantize: bool = True) -> None:
        """Packed: drop the working ``weight`` back to the placeholder, first re-quantising it into
        the codes with stochastic rounding (``requantize=True``). A weight with NaN/Inf raises
        ValueError and the codes of the affected groups stay as they were."""
        if self.storage != "packed" or not self._materialized:
            return
        try:
            if requantize:
                seed, step = self.next_sr_counter()
                q4.requantize_(self.weight.detach(), self.packed_weight(), seed=seed, step=step)
        finally:  # also after a NaN/Inf error: the good groups are written, the copy is dropped
            self.weight.data = _placeholder(
                (self.out_features, self.in_features), self.weight.device, self.weight.dtype
            )
            self._materialized = False

    def next_sr_counter(self) -> tuple[int, int]:
        """``(seed, step)`` of the next stochastic re-quantisation, advancing the step: fresh
        uniforms for every re-quantisation. The unfused path (:meth:`release`) and the fused
        optimizer step (:mod:`spam_lowmem.optim.packed`) both draw from here, so they round with
        the same numbers and give the same codes."""
        step = self._sr_step
        self._sr_step += 1
        return self._sr_seed, step

    def quantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Q(W) as used by forward and backward (a new tensor, no autograd history)."""
        dtype = dtype or self.weight.dtype
        if self.storage == "packed":
            return q4.unpack_weight(self.packed_weight(), dtype=dtype)
        wq = q4.fake_quantize_weight(
            self.weight.detach(),
            fmt=self.config.fmt,  # type: ignore[arg-type]
            group_size=self.config.group_size,
        )
        return wq.to(dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"spam_lowmem: QuantLinear expects inputs with last dim {self.in_features}, got shape {tuple(x.shape)}"
            )
        if (
            self.storage == "packed"
            and not self.requant_attached
            and not self._warned_unattached
            and torch.is_grad_enabled()
            and self.weight.requires_grad
        ):
            self._warned_unattached = True
            warnings.warn(
                "spam_lowmem: packed QuantLinear is computing weight gradients but no "
                "optimizer re-quantises it; call spam_lowmem.nn.attach_packed_requant("
                "optimizer, model) or the step will fail on the placeholder weight",
                stacklevel=2,
            )
        return _QuantLinearFn.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fmt={c.fmt}, weight_bits={c.weight_bits}, "
            f"act_bits={c.act_bits}, group_size={c.group_size}, storage={c.storage}"
        )

    # ------------------------------------------------------------------ module behaviour
    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        if self.storage != "packed":
            return super()._apply(fn, recurse)
        # The packed metadata keeps its dtype under .half()/.to(dtype) (an fp16 scale would
        # change every weight): only the device of fn's result is taken. The working weight
        # follows fn like any parameter; a released placeholder goes through fn as an empty
        # tensor, so a device move does not allocate the full (out, in) expansion.
        keep = {n: self._buffers[n] for n in self._buffers if n.startswith("weight_")}
        w = self.weight
        if not self._materialized:
            w.data = torch.empty(0, dtype=w.dtype, device=w.device)
        try:
            super()._apply(fn, recurse)
        finally:
            for name, old in keep.items():
                self._buffers[name] = old.to(self._buffers[name].device)  # type: ignore[union-attr]
            w = self.weight
            if not self._materialized:
                w.data = _placeholder((self.out_features, self.in_features), w.device, w.dtype)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantLinear:
        w = self.weight
        saved = w.data
        if not self._materialized:  # copy 1 element, not the (out, in) expansion
            w.data = torch.empty(0, dtype=saved.dtype, device=saved.device)
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        finally:
            w.data = saved
        if not new._materialized:
            new.weight.data = _placeholder((self.out_features, self.in_features), saved.device, saved.dtype)
        new.requant_attached = 0
        return new

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.storage == "packed":
            # the codes are the weight; the placeholder (or a working copy) is never saved. The
            # 0-element marker in its place makes a dense loader fail loudly (module docstring).
            destination[prefix + "weight"] = torch.empty(0, dtype=self.weight.dtype, device=self.weight_codes.device)
            destination[prefix + "weight_sr_state"] = torch.tensor([self._sr_seed, self._sr_step], dtype=torch.int64)

    def _packed_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of every packed buffer this layer's format has, by buffer name."""
        return {name: (t.dtype, tuple(t.shape)) for name, t in self.packed_weight().tensors().items()}

    def _check_loaded_packed(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Validate the packed buffers of ``state_dict`` before anything is copied: a wrong dtype
        (which ``copy_`` would cast, e.g. int32 positions wrapping in int16), size, or value
        that would make a kernel index outside the group raises ValueError naming the key."""
        group = self.config.group_size
        for name, (dtype, shape) in self._packed_specs().items():
            key = prefix + "weight_" + name
            if key not in state_dict:
                continue  # reported as missing by torch (or replaced by a dense weight)
            t = state_dict[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"spam_lowmem: {key} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"spam_lowmem: {key} has dtype {t.dtype}, this {self.config.fmt} layer stores {dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"spam_lowmem: {key} has shape {tuple(t.shape)}, this layer "
                    f"({self.out_features}x{self.in_features}, group_size {group}, "
                    f"{self.config.fmt}) needs {shape}"
                )
            if name == "outlier_idx" and t.numel():
                lo, hi = int(t.min()), int(t.max())
                if lo < 0 or hi >= group:
                    bad = lo if lo < 0 else hi
                    raise ValueError(
                        f"spam_lowmem: {key} holds position {bad}, outside the group "
                        f"[0, {group}); the checkpoint is corrupt or from another "
                        "group_size"
                    )
            if name == "zero" and t.numel() and int(t.max()) > 15:
                raise ValueError(f"spam_lowmem: {key} holds zero point {int(t.max())}, outside the int4 range [0, 15]")
        sr = state_dict.get(prefix + "weight_sr_state")
        if sr is not None and (not isinstance(sr, torch.Tensor) or sr.dtype != torch.int64 or tuple(sr.shape) != (2,)):
            raise ValueError(f"spam_lowmem: {prefix}weight_sr_state must be an int64 tensor of shape (2,) (seed, step)")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.storage != "packed":
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        self._check_loaded_packed(state_dict, prefix)
        params = self._parameters
        self._parameters = {k: v for k, v in params.items() if k != "weight"}
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            self._parameters = params
        for key in (prefix + "weight", prefix + "weight_sr_state"):
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        sr = state_dict.get(prefix + "weight_sr_state")
        if sr is not None:
            self._sr_seed, self._sr_step = (int(v) for v in sr.tolist())
        dense = state_dict.get(prefix + "weight")
        if dense is not None and dense.numel() == 0:
            dense = None  # the marker of a packed checkpoint (see _save_to_state_dict)
        if dense is not None:  # a full-precision checkpoint (e.g. from nn.Linear): pack it
            if tuple(dense.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"size mismatch for {prefix}weight: copying a param with shape "
                    f"{tuple(dense.shape)}, the module has {(self.out_features, self.in_features)}"
                )
                return
            with torch.no_grad():
                q4.pack_weight(
                    dense.to(self.weight_codes.device),
                    fmt=self.config.fmt,  # type: ignore[arg-type]
                    group_size=self.config.group_size,
                    out=self.packed_weight(),
                )
            for name in self.packed_weight().tensors():  # the dense weight stands in for them
                if prefix + "weight_" + name in missing_keys and prefix + "weight_" + name not in state_dict:
                    missing_keys.remove(prefix + "weight_" + name)
        if self._materialized:  # a working copy would no longer match the codes
            self.weight.data = q4.unpack_weight(self.packed_weight(), dtype=self.weight.dtype)
