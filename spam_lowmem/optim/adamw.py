"""AdamW on the spam_lowmem core: the baseline every memory preset is compared with.

Same arithmetic and conventions as ``torch.optim.AdamW`` (decoupled decay first, eps added
after bias correction), with 32-bit or blockwise 8-bit moments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .. import functional as F
from .base import SpikeAwareOptimizer, check_adam_group

__all__ = ["AdamW"]


class AdamW(SpikeAwareOptimizer):
    r"""AdamW with ``torch.optim.AdamW``'s conventions, arithmetic in the C++/CUDA core.

    .. math::
        p \gets p(1-\eta\lambda);\quad m \gets \beta_1 m + (1-\beta_1)g;\quad
        v \gets \beta_2 v + (1-\beta_2)g^2;\quad
        p \gets p - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t}+\epsilon}

    Args:
        params: parameters or param-group dicts; every keyword is also a group key.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (defaults 1e-3, (0.9, 0.999),
            1e-8, 1e-2).
        nonfinite: ``"skip"`` (default) leaves entries with NaN/Inf gradients untouched and
            counts them (:meth:`spike_stats`); ``"propagate"`` computes them as written.
        state_bits: 32 (moments in the parameter dtype) or 8 (blockwise 8-bit moments).
        min_8bit_size: parameters with fewer elements keep 32-bit moments. Default 4096.

    With ``state_bits=32`` this matches ``torch.optim.AdamW`` to float32 rounding; the
    ``spike_stats()["clipped"]`` count is always 0.
    """

    KIND = "AdamW"
    HYPERPARAMETERS = frozenset({"lr", "betas", "eps", "weight_decay", "nonfinite", "state_bits",
                                 "min_8bit_size"})

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        nonfinite: str = "skip",
        state_bits: int = 32,
        min_8bit_size: int = 4096,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        nonfinite=nonfinite, state_bits=state_bits, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_adam_group(group)

    def _step_group(self, group_index: int, group: dict[str, Any]) -> None:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        for device, batch in self._gather(group).items():
            step_sizes, sqrt_bc2s = [], []
            counts = [{"step": state["step"] + 1} for state in batch.states]  # stored after the core
            for new in counts:
                step_sizes.append(lr / (1.0 - beta1 ** new["step"]))
                sqrt_bc2s.append(math.sqrt(1.0 - beta2 ** new["step"]))
            packed_kw = self._packed_args(group_index, device, batch)
            with self._committing(batch, counts):
                F.adamw_step(
                    batch.params, batch.grads, **batch.moment_args(device), step_sizes=step_sizes,
                    sqrt_bc2s=sqrt_bc2s, counters=self._counters(group_index, device),
                    beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_keep=1.0 - lr * group["weight_decay"],
                    skip_nonfinite=group["nonfinite"] == "skip",
                    **packed_kw,
                )
            self._after_packed_step(group_index, device, packed_kw)
            batch.write_back()
