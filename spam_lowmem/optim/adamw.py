"""AdamW on the spam_lowmem core: the baseline every memory preset is compared with.

Same arithmetic and conventions as ``torch.optim.AdamW`` (decoupled decay first, eps added
after bias correction), with 32-bit or blockwise 8-bit moments.
"""

from __future__ import annotations

import math
from typing import Any

from ..hyperparams import AdamWSettings, settings_constructor
from .base import SpikeAwareOptimizer

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
    ALGORITHM = "adamw"  # the core's element algorithm (cpp/spam/algorithms.h)
    SETTINGS = AdamWSettings
    __init__ = settings_constructor(AdamWSettings)

    def _group_scalars(self, group: dict[str, Any], call: int) -> None:
        """AdamW has no schedule of its own (LR schedulers act on ``lr``)."""

    def _tensor_scalars(
        self, states: list[dict[str, Any]], group: dict[str, Any], call: None
    ) -> tuple[list[dict[str, int]], dict[str, list[float]]]:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        steps = [state["step"] + 1 for state in states]
        return [{"step": step} for step in steps], {
            "step_sizes": [lr / (1.0 - beta1**step) for step in steps],
            "sqrt_bc2s": [math.sqrt(1.0 - beta2**step) for step in steps],
        }

    def _element_hyper(self, group: dict[str, Any], call: None) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return {
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_keep": 1.0 - group["lr"] * group["weight_decay"],
        }
