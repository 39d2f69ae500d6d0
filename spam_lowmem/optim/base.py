"""Shared machinery of the spam_lowmem optimizers (torch.optim conventions).

* validation of parameters and gradients (clear errors, nothing lost);
* gathering the tensors of a group per device into the lists the core steps in one call,
  with an explicit copy-back path for non-contiguous parameters (never a silent copy
  that drops the in-place update);
* spike telemetry counted on the device (no sync in ``step()``);
* packed 4-bit weights (:mod:`spam_lowmem.optim.packed`): parameters registered with
  :meth:`SpikeAwareOptimizer.attach_packed` are stepped on their packed codes by the fused
  kernels;
* ``load_state_dict`` that keeps float32 side state float32 for bf16/fp16 parameters
  (torch's loader would cast it to the parameter dtype, DESIGN.md P7) and checks shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch

from .. import _backend
from ..functional import PackedStep
from . import moments
from . import packed as packed_policy

__all__ = ["SpikeAwareOptimizer", "DeviceBatch"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NONFINITE_POLICIES = ("skip", "propagate")


@dataclass
class DeviceBatch:
    """The tensors of one group on one device, in the order the core receives them."""

    params: list[torch.Tensor] = field(default_factory=list)  # contiguous views or copies
    grads: list[torch.Tensor] = field(default_factory=list)
    owners: list[torch.Tensor] = field(default_factory=list)  # the user's parameters
    states: list[dict[str, Any]] = field(default_factory=list)
    copy_back: list[int] = field(default_factory=list)  # indices whose params are copies
    packed: list[PackedStep | None] = field(default_factory=list)  # fused 4-bit weights

    def moment_args(self, device: torch.device) -> dict[str, Any]:
        """Moment buffers (dense or 8-bit) of this batch, as the core step calls take them."""
        return moments.moment_args(self.states, device)

    def write_back(self) -> None:
        """Copy the updated contiguous copies into non-contiguous parameters."""
        for i in self.copy_back:
            self.owners[i].detach().copy_(self.params[i])


def check_range(name: str, value: float, low: float, high: float, *, closed_high: bool = False) -> None:
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"Invalid {name}: {value} (expected a value in [{low}, {high}{bracket})")


def check_non_negative(name: str, value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid {name}: {value} (expected >= 0)")


def check_count(name: str, value: object) -> None:
    """A non-negative int (bools rejected): step counts and periods."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 0)")


def check_adam_group(group: dict[str, Any]) -> None:
    """The hyper-parameters every Adam-family group has: lr, betas, eps, weight decay, NaN policy."""
    check_non_negative("learning rate", group["lr"])
    beta1, beta2 = group["betas"]
    check_range("beta1", beta1, 0.0, 1.0)
    check_range("beta2", beta2, 0.0, 1.0)
    check_non_negative("eps", group["eps"])
    check_non_negative("weight_decay", group["weight_decay"])
    if group["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite policy: {group['nonfinite']!r} "
                         f"(expected one of {NONFINITE_POLICIES})")


class SpikeAwareOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_validate_group``, ``_init_extra_state``, ``_step_group``.

    Every group also carries ``state_bits`` (32: moments in the parameter dtype; 8: blockwise
    8-bit moments, :mod:`spam_lowmem.optim.moments`) and ``min_8bit_size``.
    """

    #: state entries besides the moments that stay float32 whatever the parameter dtype
    _fp32_state_keys: tuple[str, ...] = ()
    #: state entries besides the moments every initialised parameter must have (checked on load)
    _required_state_keys: tuple[str, ...] = ("step",)
    #: version of the state layout written by state_dict(); a mismatch on load is an error
    LAYOUT_VERSION = 1

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._telemetry: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._requant_bad: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._packed: dict[int, tuple[torch.Tensor, packed_policy.PackedSource]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ packed 4-bit weights
    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("spam_lowmem: the parameter is not in this optimizer")

    def attach_packed(self, p: torch.Tensor, source: packed_policy.PackedSource) -> None:
        """Step ``p`` through the fused packed 4-bit kernels: ``p`` is the (placeholder) weight
        Parameter of ``source`` (a packed :class:`~spam_lowmem.nn.QuantLinear`), whose codes are
        updated and re-quantised in place by :meth:`step`; ``p``'s data is never read. Usually
        called by :func:`spam_lowmem.nn.attach_packed_requant`. Raises NotImplementedError for
        groups the fused step does not support (:mod:`spam_lowmem.optim.packed`)."""
        group = self._group_of(p)
        packed_policy.check_supported(p, group)
        w = source.packed_weight()
        if tuple(w.shape) != tuple(p.shape) or w.codes.device != p.device:
            raise ValueError(f"spam_lowmem: packed weight {tuple(w.shape)} on {w.codes.device} does "
                             f"not match the parameter {tuple(p.shape)} on {p.device}")
        self._packed[id(p)] = (p, source)

    def detach_packed(self, p: torch.Tensor) -> None:
        """Undo :meth:`attach_packed` (a no-op for a parameter that is not attached)."""
        self._packed.pop(id(p), None)

    def is_packed(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is stepped through the fused packed kernels."""
        return id(p) in self._packed

    def _packed_step(self, p: torch.Tensor, group: dict[str, Any]) -> PackedStep | None:
        entry = self._packed.get(id(p))
        if entry is None:
            return None
        source = entry[1]
        packed_policy.check_supported(p, group)
        if source.is_materialized:
            raise RuntimeError("spam_lowmem: a packed weight attached for fused steps is materialised "
                               "(a dense working copy exists); call release() on its layer first")
        seed, step = source.next_sr_counter()
        return PackedStep(source.packed_weight(), seed, step)

    def _packed_bad(self, group_index: int, device: torch.device) -> torch.Tensor:
        """Counter of packed groups left unchanged because their update was not finite. On CPU a
        fresh one per call (checked after the step, free there); on CUDA the telemetry buffer."""
        if device.type == "cpu":
            return torch.zeros(1, dtype=torch.int64)
        key = (group_index, device)
        bad = self._requant_bad.get(key)
        if bad is None:
            bad = self._requant_bad[key] = torch.zeros(1, dtype=torch.int64, device=device)
        return bad

    def _packed_args(self, group_index: int, device: torch.device, batch: DeviceBatch) -> dict[str, Any]:
        """``packed``/``packed_bad`` keywords of the core step (none if nothing is packed)."""
        if all(item is None for item in batch.packed):
            return {}
        return {"packed": batch.packed, "packed_bad": self._packed_bad(group_index, device)}

    def _after_packed_step(self, group_index: int, device: torch.device, kwargs: dict[str, Any]) -> None:
        """CPU: raise if a packed group could not be re-quantised (as requantize_ does); CUDA:
        leave the count on the device for :meth:`spike_stats` (no sync in the step)."""
        bad = kwargs.get("packed_bad")
        if bad is None or device.type != "cpu":
            return
        n = int(bad.item())
        if n:
            key = (group_index, device)
            self._requant_bad[key] = self._requant_bad.get(key, torch.zeros(1, dtype=torch.int64)) + n
            raise ValueError(f"spam_lowmem: {n} packed weight group(s) got NaN or Inf from the update; "
                             "their packed data was left unchanged (their moments were updated)")

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate everything before torch appends the group, so a rejected group leaves the
        # optimizer exactly as it was.
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            self._check_param(p)
        merged = {**self.defaults, **param_group, "params": params}
        self._validate_group(merged)
        self._validate_precision(merged)
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        group.setdefault("calls", 0)
        group["layout_version"] = self.LAYOUT_VERSION

    @staticmethod
    def _validate_precision(group: dict[str, Any]) -> None:
        bits = group.get("state_bits", 32)
        if bits not in (8, 32) or isinstance(bits, bool):
            raise ValueError(f"Invalid state_bits: {bits!r} (expected 8 or 32)")
        size = group.get("min_8bit_size", 4096)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"Invalid min_8bit_size: {size!r} (expected an int >= 0)")

    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        if p.is_complex():
            raise ValueError("spam_lowmem optimizers do not support complex parameters "
                             "(view them as real with torch.view_as_real first)")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"spam_lowmem: parameter dtype {p.dtype} is not supported; "
                            "use float32, bfloat16 or float16")
        if p.is_sparse:
            raise ValueError("spam_lowmem: sparse parameters are not supported")
        _backend.check_device(p.device)

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        moments.init_moments(p, state, moments.wants_8bit(p, group))
        self._init_extra_state(p, state)

    def _init_extra_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Subclass hook for state beyond the step count and the moments."""

    def _step_group(self, group_index: int, group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._validate_group(group)
            self._validate_precision(group)
            self._step_group(index, group)
            group["calls"] += 1
        return loss

    def _gather(self, group: dict[str, Any]) -> dict[torch.device, DeviceBatch]:
        """Collect the parameters with gradients, per device, initialising state lazily."""
        batches: dict[torch.device, DeviceBatch] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("spam_lowmem optimizers do not support sparse gradients")
            if grad.dtype != p.dtype or grad.shape != p.shape:
                raise RuntimeError(f"spam_lowmem: gradient {grad.dtype}{tuple(grad.shape)} does not "
                                   f"match its parameter {p.dtype}{tuple(p.shape)}")
            packed = self._packed_step(p, group)  # checked before any state is created
            state = self.state[p]
            if not state:
                self._init_state(p, state, group)
            batch = batches.setdefault(p.device, DeviceBatch())
            batch.packed.append(packed)
            if packed is not None:  # the placeholder is never read: an empty array names the dtype
                batch.params.append(torch.empty(0, dtype=p.dtype, device=p.device))
            else:
                data = p.detach()
                if not data.is_contiguous():
                    batch.copy_back.append(len(batch.params))
                    data = data.contiguous()
                batch.params.append(data)
            batch.grads.append(grad.detach().contiguous())
            batch.owners.append(p)
            batch.states.append(state)
        return batches

    # ------------------------------------------------------------------ telemetry
    def _counters(self, group_index: int, device: torch.device) -> torch.Tensor:
        key = (group_index, device)
        counters = self._telemetry.get(key)
        if counters is None:
            counters = torch.zeros(2, dtype=torch.int64, device=device)
            self._telemetry[key] = counters
        return counters

    def spike_stats(self) -> dict[str, Any]:
        """Gradient entries clipped as spikes (and non-finite entries seen) since the last call.

        Counted on the device inside ``step()`` without a host sync; reading them here syncs
        once. Returns ``{"clipped": int, "nonfinite": int, "requant_nonfinite_groups": int,
        "nonfinite_state_blocks": int, "groups": [{...the same keys}]}`` and resets the
        counters; ``requant_nonfinite_groups`` counts packed 4-bit groups whose fused update was
        not finite and which kept their old codes (on CPU such a step also raises).
        ``nonfinite_state_blocks`` is a snapshot, not a count since the last call: the 8-bit
        moment blocks (m and v counted apart) whose absmax is NaN or inf now, so that all their
        entries read back as NaN (or +-inf where the moment itself is infinite). That follows a
        non-finite gradient under ``nonfinite="propagate"``, or a moment that overflowed from a
        finite gradient (g**2 > 3.4e38), which ``nonfinite`` does not count.
        """
        groups = [{"clipped": 0, "nonfinite": 0, "requant_nonfinite_groups": 0, "nonfinite_state_blocks": 0}
                  for _ in self.param_groups]
        for (index, _device), counters in self._telemetry.items():
            clipped, nonfinite = counters.tolist()
            counters.zero_()
            if index < len(groups):
                groups[index]["clipped"] += int(clipped)
                groups[index]["nonfinite"] += int(nonfinite)
        for (index, _device), bad in self._requant_bad.items():
            n = int(bad.item())
            bad.zero_()
            if index < len(groups):
                groups[index]["requant_nonfinite_groups"] += n
        for index, group in enumerate(self.param_groups):
            groups[index]["nonfinite_state_blocks"] = self._nonfinite_state_blocks(group)
        return {**{key: sum(g[key] for g in groups) for key in groups[0]}, "groups": groups}

    def _nonfinite_state_blocks(self, group: dict[str, Any]) -> int:
        """8-bit blocks of the group whose absmax is NaN or inf (one host sync per device)."""
        per_device: dict[torch.device, torch.Tensor] = {}
        for p in group["params"]:
            state = self.state.get(p, {})
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                absmax = state.get(key)
                if absmax is not None:
                    bad = (~absmax.isfinite()).sum()
                    per_device[absmax.device] = per_device.get(absmax.device, 0) + bad
        return sum(int(count) for count in per_device.values())

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; float32 side state stays float32 and shapes are checked."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(saved_ids) != len(params):
            raise ValueError("loaded state dict contains a parameter group that doesn't match "
                             "the size of optimizer's group")
        for group in saved_groups:
            version = group.get("layout_version")
            if version != self.LAYOUT_VERSION:
                raise ValueError(f"loaded state dict has layout version {version!r}; this "
                                 f"{type(self).__name__} reads version {self.LAYOUT_VERSION}")
        id_to_param = dict(zip(saved_ids, params))
        for pid, saved in state_dict["state"].items():
            p = id_to_param.get(pid)
            if p is None:
                raise ValueError(f"loaded state dict has state for unknown parameter id {pid}")
            self._check_loaded_state(p, saved)
        super().load_state_dict(state_dict)
        for pid, saved in state_dict["state"].items():
            p = id_to_param[pid]
            for key, value in saved.items():
                # torch's loader casts every tensor to the parameter dtype, uint8 codes and
                # float32 absmax included (DESIGN.md P7): keep what was saved instead.
                keep = key in self._fp32_state_keys or key in moments.FP32_KEYS
                if isinstance(value, torch.Tensor) and (keep or not value.is_floating_point()):
                    self.state[p][key] = value.to(device=p.device, copy=True)
            for key, value in self.state[p].items():  # the core needs contiguous state
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.contiguous()

    def _check_loaded_state(self, p: torch.Tensor, saved: dict[str, Any]) -> None:
        shape = tuple(p.shape)
        keys = moments.QUANT_KEYS if moments.is_quantized(saved) else moments.DENSE_KEYS
        missing = [k for k in (*self._required_state_keys, *keys) if k not in saved]
        if missing:
            raise ValueError(f"loaded state for a parameter of shape {shape} lacks {missing}: "
                             f"it was not saved by {type(self).__name__}")
        if moments.is_quantized(saved):
            blocks = (p.numel() + 255) // 256
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                if saved[key].dtype != torch.uint8 or saved[key].numel() != p.numel():
                    raise ValueError(f"loaded '{key}' does not hold one uint8 code per element of "
                                     f"the parameter of shape {shape}")
            for key in moments.FP32_KEYS:
                if saved[key].numel() != blocks:
                    raise ValueError(f"loaded '{key}' has {saved[key].numel()} blocks; a parameter "
                                     f"of shape {shape} has {blocks}")
        else:
            for key in moments.DENSE_KEYS:
                if tuple(saved[key].shape) != shape:
                    raise ValueError(f"loaded '{key}' has shape {tuple(saved[key].shape)} but the "
                                     f"parameter has shape {shape}")

    # ------------------------------------------------------------------ memory
    def memory_report(self) -> dict[str, Any]:
        """Bytes of optimizer state, per parameter and in total, measured from ``self.state``.

        Each entry: ``index`` (position in ``param_groups``), ``shape``, ``numel``,
        ``state_bits`` (of its moments), ``fallback`` (8-bit asked for but kept dense because
        it is under ``min_8bit_size``), ``density`` (of its group; < 1: sparse momentum),
        ``moment_numel`` (values per moment: ``numel``, or the subset size when sparse), and bytes
        of ``values``, ``indices`` (sparse subset rule + compact block starts), ``absmax``,
        ``other``, ``total``; ``ratio_to_adamw32`` compares a total with 32-bit AdamW state
        (8 bytes/element), per entry and overall.
        """
        entries, total, numel = [], 0, 0
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                kinds = moments.state_bytes(state)
                quant = moments.is_quantized(state)
                moment = state.get("exp_avg_codes", state.get("exp_avg"))
                entry = {"index": index, "shape": tuple(p.shape), "numel": p.numel(),
                         "initialised": bool(state),
                         "state_bits": 8 if quant else (32 if state else None),
                         "fallback": bool(state) and not quant and group.get("state_bits", 32) == 8,
                         "density": group.get("density", 1.0),
                         "moment_numel": moment.numel() if isinstance(moment, torch.Tensor) else 0,
                         **kinds, "total": sum(kinds.values()),
                         "ratio_to_adamw32": sum(kinds.values()) / (8 * p.numel()) if p.numel() else 0.0}
                entries.append(entry)
                total += entry["total"]
                numel += p.numel()
                index += 1
        return {"params": entries, "total_bytes": total, "numel": numel,
                "bytes_per_param": total / numel if numel else 0.0,
                "ratio_to_adamw32": total / (8 * numel) if numel else 0.0,
                "fallbacks": [e["index"] for e in entries if e["fallback"]]}
