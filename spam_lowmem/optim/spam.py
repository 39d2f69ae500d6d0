"""SPAM: spike-aware Adam with momentum reset (Huang et al., arXiv 2501.06842).

Follows ALGORITHMS.md §2 (the authors' code) exactly, quirks included; each clean-up the
specification recommends is an explicit keyword.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import functional as F
from ..schedules import is_reset_call, spam_clip_active, spam_update_scale, spam_warmup_factor
from .base import NONFINITE_POLICIES, SpikeAwareOptimizer, check_non_negative, check_range

__all__ = ["SPAM"]


class SPAM(SpikeAwareOptimizer):
    r"""SPAM (Spike-Aware Adam with Momentum reset), arithmetic in the C++/CUDA core.

    For call :math:`n` of a parameter group (:math:`n = 1, 2, \dots`), per tensor:

    .. math::
        &\textbf{if } n \bmod \Delta T = 0: m \gets 0,\ v \gets 0
            \quad\text{(momentum reset; } t \text{ keeps counting)}\\
        &t \gets t + 1\\
        &\textbf{if } n \ge D \textbf{ and } n \bmod \Delta T \ge D:\
            g_i \gets \operatorname{sign}(g_i)\sqrt{\theta v_i}
            \text{ where } g_i^2 > \theta v_i \quad\text{(spike clipping, } v \text{ of the previous step)}\\
        &m \gets \beta_1 m + (1-\beta_1) g,\quad v \gets \beta_2 v + (1-\beta_2) g^2\\
        &p \gets p - \eta\, s(n)\, \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m}{\sqrt{v}+\epsilon}\\
        &p \gets p - \eta\lambda p

    with the post-reset cosine warmup :math:`s(n) = 1 - 0.99\cdot\tfrac12(1+\cos(\pi j/(N+1)))`
    for :math:`j = n \bmod \Delta T < N` after the first reset, else 1 (paper Alg. 1, eqs. 2-4).

    Args:
        params: parameters or param-group dicts; every keyword below is also a group key.
        lr: learning rate :math:`\eta` (LR schedulers act on it). Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`. Default (0.9, 0.999).
        eps: added to :math:`\sqrt{v}` *before* bias correction (HF-AdamW style). Default 1e-6.
        weight_decay: :math:`\lambda`, applied after the update with the group lr, not scaled
            by :math:`s`. Default 0.
        threshold: spike threshold :math:`\theta`. Default 5000.
        reset_interval: momentum-reset period :math:`\Delta T` in calls; 0 never resets. Default 500.
        warmup_steps: post-reset warmup length :math:`N`. Default 150 (the paper's value).
        clip_delay: :math:`D`, calls without clipping at the start and after each reset. Default 20.
        spike_clipping: set False to turn clipping off (then ``threshold`` is unused).
        reset_bias_correction: clean-up option. False (default, as implemented): the
            bias-correction count :math:`t` keeps counting through resets, which inflates
            steps for hundreds of calls after each reset (ALGORITHMS.md §2.6a). True:
            :math:`t` restarts at each reset, like a fresh Adam.
        nonfinite: ``"skip"`` (default): a NaN/Inf gradient entry leaves its parameter and
            moments untouched this step and is counted in :meth:`spike_stats` (``nonfinite``);
            ``"propagate"``: plain arithmetic, as the authors' code (NaN reaches the state).
        state_bits: 32 (default): moments in the parameter dtype. 8: blockwise 8-bit moments
            (256-element blocks, fp32 absmax, dynamic maps; :mod:`spam_lowmem.qmap`),
            dequantised, updated and requantised in the same fused pass; the spike test reads
            the dequantised previous v.
        min_8bit_size: parameters with fewer elements keep 32-bit moments under
            ``state_bits=8`` (listed by :meth:`memory_report`). Default 4096.

    Notes:
        * ``p.grad`` is not modified (the authors write the clipped values into it; nothing
          downstream of ``step()`` reads them).
        * State per parameter: ``step`` (int) and the moments: ``exp_avg``, ``exp_avg_sq`` in
          the parameter dtype (torch's convention; bf16 parameters keep bf16 moments, the
          papers' "pure BF16" setting), 2 x parameter bytes; or with ``state_bits=8``
          ``exp_avg_codes``/``exp_avg_sq_codes`` (uint8) and ``*_absmax`` (fp32 per 256),
          2 + 8/256 bytes per element. Each group keeps its call count in
          ``group["calls"]``, so schedules survive ``state_dict()``/``load_state_dict()``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        threshold: float = 5000.0,
        reset_interval: int = 500,
        warmup_steps: int = 150,
        clip_delay: int = 20,
        *,
        spike_clipping: bool = True,
        reset_bias_correction: bool = False,
        nonfinite: str = "skip",
        state_bits: int = 32,
        min_8bit_size: int = 4096,
    ) -> None:
        defaults = dict(state_bits=state_bits, min_8bit_size=min_8bit_size,
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, threshold=threshold,
            reset_interval=reset_interval, warmup_steps=warmup_steps, clip_delay=clip_delay,
            spike_clipping=spike_clipping, reset_bias_correction=reset_bias_correction,
            nonfinite=nonfinite,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_non_negative("learning rate", group["lr"])
        beta1, beta2 = group["betas"]
        check_range("beta1", beta1, 0.0, 1.0)
        check_range("beta2", beta2, 0.0, 1.0)
        check_non_negative("eps", group["eps"])
        check_non_negative("weight_decay", group["weight_decay"])
        if group["spike_clipping"] and not group["threshold"] > 0.0:
            raise ValueError(f"Invalid threshold: {group['threshold']} (must be > 0 with "
                             "spike_clipping=True; pass spike_clipping=False to turn clipping off)")
        for key in ("reset_interval", "warmup_steps", "clip_delay"):
            value = group[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Invalid {key}: {value!r} (expected an int >= 0)")
        if group["nonfinite"] not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite policy: {group['nonfinite']!r} "
                             f"(expected one of {NONFINITE_POLICIES})")

    def _step_group(self, group_index: int, group: dict[str, Any]) -> None:
        n = group["calls"] + 1
        interval = group["reset_interval"]
        reset = is_reset_call(n, interval)
        warmup = spam_warmup_factor(n, interval, group["warmup_steps"])
        clip = group["spike_clipping"] and spam_clip_active(n, interval, group["clip_delay"])
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        for device, batch in self._gather(group).items():
            scales = []
            for state in batch.states:
                if reset and group["reset_bias_correction"]:
                    state["step"] = 0
                state["step"] += 1
                scales.append(spam_update_scale(lr, beta1, beta2, state["step"], warmup))
            F.spam_step(
                batch.params, batch.grads, **batch.moment_args(device),
                update_scales=scales, counters=self._counters(group_index, device),
                beta1=beta1, beta2=beta2, eps=group["eps"],
                clip_threshold=float(group["threshold"]) if clip else 0.0,
                weight_decay_scale=lr * group["weight_decay"],
                reset=F.MomentReset.BEFORE_UPDATE if reset else F.MomentReset.NONE,
                skip_nonfinite=group["nonfinite"] == "skip",
            )
            batch.write_back()
