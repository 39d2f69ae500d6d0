"""What the reference optimizers share that is not arithmetic: arguments, validation, the loop.

The constructor arguments, defaults and validation rules are those of the core optimizers
(:mod:`spam_lowmem.hyperparams`), so an oracle accepts and rejects exactly what the optimizer
it checks does. The arithmetic stays in each oracle's ``_update_tensor``, written in plain
PyTorch and never calling the compiled core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from spam_lowmem.hyperparams import Settings

__all__ = ["ReferenceOptimizer", "dense_grad"]


def dense_grad(p: Tensor, name: str) -> Tensor:
    """``p.grad``, rejecting sparse gradients with a clear message."""
    grad = p.grad
    assert grad is not None
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients; use dense gradients")
    return grad


class ReferenceOptimizer(torch.optim.Optimizer):
    """Base of the oracles: one call per group (``group["calls"]`` counts them), every
    parameter with a gradient updated by :meth:`_update_tensor`, and ``last_counts`` holding
    the clipped and non-finite gradient entries of the last :meth:`step` (all groups)."""

    #: the kind's hyper-parameters; the subclass's ``__init__`` is ``settings_constructor(SETTINGS)``
    SETTINGS: type[Settings]

    def _setup(self, params: Iterable[Any], settings: Settings) -> None:
        """``__init__`` once the arguments are bound: validate, :meth:`_configure`, torch's init."""
        defaults = settings.group_defaults()
        self.SETTINGS.check_group(defaults)
        self._configure(settings)
        self.last_counts: dict[str, int] = {"clipped": 0, "nonfinite": 0}
        super().__init__(params, defaults)

    def _configure(self, settings: Settings) -> None:
        """Subclass hook: keep the settings that configure the optimizer, not a group."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its (possibly overridden) hyper-parameters and, once
        torch has listed them, its parameters (sparse momentum needs 2-D ones)."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self.SETTINGS.check_group(merged)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.SETTINGS.check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        group.setdefault("calls", 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One call for every group; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clipped = nonfinite = 0
        for group in self.param_groups:
            n = group["calls"] + 1
            self._begin_call(group, n)
            for p in group["params"]:
                if p.grad is None:
                    continue
                c, b = self._update_tensor(p, self.state[p], group, n)
                clipped += c
                nonfinite += b
            group["calls"] = n
        self.last_counts = {"clipped": clipped, "nonfinite": nonfinite}
        return loss

    def _begin_call(self, group: dict[str, Any], n: int) -> None:
        """Subclass hook: group-wide work before call ``n`` updates any tensor."""

    def _update_tensor(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], n: int) -> tuple[int, int]:
        """Update ``p`` for call ``n`` of its group; return (clipped, non-finite) entry counts."""
        raise NotImplementedError
