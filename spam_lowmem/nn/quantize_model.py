"""Turn a model's projection layers into 4-bit :class:`QuantLinear` layers, and keep packed
weights in sync with an optimizer.

Only the ``nn.Linear`` modules whose qualified name ends with one of ``targets`` are replaced
(by default the LLaMA projections q/k/v/o/gate/up/down, ALGORITHMS.md §5.1); ``lm_head``,
embeddings and norms stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..optim import packed as packed_policy
from ..optim.base import SpikeAwareOptimizer
from .quant_linear import QuantConfig, QuantLinear

__all__ = ["DEFAULT_TARGETS", "quantize_model", "attach_packed_requant", "PackedRequantHandle"]

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize_model(model: nn.Module, targets: str | Iterable[str] = DEFAULT_TARGETS, *,
                   weight_bits: int = 4, act_bits: int = 4, fmt: str = "int4", group_size: int = 256,
                   storage: str = "fake") -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose module name ends with a target (matched on
    whole name components: ``"q_proj"`` matches ``layers.0.self_attn.q_proj``) by a
    :class:`QuantLinear` reusing its Parameters, and return ``model``.

    Everything is validated before anything is replaced: a target that matches nothing, a
    matched module that is not ``nn.Linear``, a group size that does not divide a weight's
    element count, or a non-finite weight raise ValueError/TypeError and leave the model intact.
    """
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"spam_lowmem: targets must be non-empty module-name suffixes, got {targets!r}")
    config = QuantConfig(fmt, weight_bits, act_bits, group_size, storage)
    matched = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if not matched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"spam_lowmem: no module name ends with any of {targets}; the model's "
                         f"nn.Linear modules are {linears[:8]}{' ...' if len(linears) > 8 else ''}")
    for name, module in matched:
        if isinstance(module, QuantLinear):
            raise ValueError(f"spam_lowmem: '{name}' is already a QuantLinear")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"spam_lowmem: '{name}' matches the targets but is a "
                            f"{type(module).__name__}, not nn.Linear")
        config.check_weight(module.weight.numel(), f"weight of '{name}' {tuple(module.weight.shape)}")
        if not bool(torch.isfinite(module.weight.detach()).all()):
            raise ValueError(f"spam_lowmem: the weight of '{name}' contains NaN or Inf")
    kwargs: dict[str, Any] = dict(fmt=fmt, weight_bits=weight_bits, act_bits=act_bits,
                                  group_size=group_size, storage=storage)
    for name, module in matched:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear.from_linear(module, **kwargs))  # type: ignore[arg-type]
    return model


class PackedRequantHandle:
    """Returned by :func:`attach_packed_requant`; ``remove()`` detaches it. ``fused`` says which
    path was chosen."""

    def __init__(self, hooks: list[Any], modules: list[QuantLinear], fused: bool,
                 optimizer: torch.optim.Optimizer) -> None:
        self._hooks, self.modules, self.fused, self._optimizer = hooks, modules, fused, optimizer

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for m in self.modules:
            if self.fused:
                self._optimizer.detach_packed(m.weight)  # type: ignore[attr-defined]
            m.requant_attached = max(0, m.requant_attached - 1)
        self._hooks, self.modules = [], []


def _fused_supported(optimizer: torch.optim.Optimizer, modules: list[QuantLinear]) -> bool:
    if not isinstance(optimizer, SpikeAwareOptimizer):
        return False
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return all(packed_policy.unsupported_reason(m.weight, groups[id(m.weight)]) is None for m in modules)


def attach_packed_requant(optimizer: torch.optim.Optimizer, model: nn.Module, *,
                          fused: bool | None = None) -> PackedRequantHandle:
    """Keep the packed QuantLinear layers of ``model`` in step with ``optimizer``.

    Fused path (``fused=True``; the default for spam_lowmem.SPAM / StableSPAM / AdamW when
    every packed weight sits in a dense group with 32-bit moments): the optimizer steps each
    packed weight on its codes (:meth:`~spam_lowmem.optim.base.SpikeAwareOptimizer.attach_packed`):
    one pass per quantisation group unpacks it, applies the element update and re-quantises it
    with stochastic rounding; no full-precision working copy is ever built. ``fused=True`` with
    an unsupported setting raises NotImplementedError (TypeError for a non-spam_lowmem optimizer).

    Unfused path (``fused=False``, or the default for any other ``torch.optim`` optimizer):

    * step pre-hook: each packed layer whose weight has a gradient is materialised (codes
      unpacked into a working copy in the weight's dtype, one fused pass);
    * the optimizer updates that copy like any Parameter (its state is untouched by us);
    * step post-hook: each materialised layer is re-quantised with stochastic rounding into
      its codes (one fused pass per layer: group statistics, grid choice, rounding, nibble
      packing) and the working copy is released.

    Both paths draw the rounding uniforms from the layer's counter
    (:meth:`QuantLinear.next_sr_counter`) and give the same codes bit for bit.
    """
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    modules = [m for m in model.modules()
               if isinstance(m, QuantLinear) and m.storage == "packed" and id(m.weight) in in_optimizer]
    if not modules:
        raise ValueError("spam_lowmem: the optimizer holds no weight of a packed QuantLinear in this "
                         "model (quantize_model(..., storage='packed') first, then build the optimizer "
                         "or keep the original Parameters)")
    if fused is None:
        fused = _fused_supported(optimizer, modules)
    if fused:
        if not isinstance(optimizer, SpikeAwareOptimizer):
            raise TypeError(f"spam_lowmem: fused packed steps need a spam_lowmem optimizer (SPAM, "
                            f"StableSPAM, AdamW), got {type(optimizer).__name__}; use fused=False")
        attached: list[QuantLinear] = []
        try:
            for m in modules:
                optimizer.attach_packed(m.weight, m)
                attached.append(m)
        except Exception:
            for m in attached:  # all or nothing
                optimizer.detach_packed(m.weight)
            raise
        for m in modules:
            m.requant_attached += 1
        return PackedRequantHandle([], modules, True, optimizer)

    def pre_step(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        for m in modules:
            if m.weight.grad is not None:
                m.materialize()

    def post_step(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        for m in modules:
            m.release(requantize=True)

    hooks = [optimizer.register_step_pre_hook(pre_step), optimizer.register_step_post_hook(post_step)]
    for m in modules:
        m.requant_attached += 1
    return PackedRequantHandle(hooks, modules, False, optimizer)
