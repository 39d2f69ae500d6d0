"""Stable-SPAM: AdaClip + AdaGN + momentum reset (Huang et al., arXiv 2502.17055).

Follows docs/algorithms.md §4 (the authors' code) exactly, quirks included; each clean-up the
specification recommends is an explicit keyword.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .. import functional as F
from ..hyperparams import StableSPAMSettings, settings_constructor
from ..schedules import is_reset_call, stable_spam_decay
from . import sharding
from .base import DeviceBatch, SpikeAwareOptimizer

__all__ = ["StableSPAM"]


class _StableCall(NamedTuple):
    """The schedules of one Stable-SPAM call: reset, its mode, and the decayed beta1/gamma1."""

    reset: bool
    mode: int
    beta1: float
    gamma1: float


class StableSPAM(SpikeAwareOptimizer):
    r"""Stable-SPAM, arithmetic in the C++/CUDA core.

    Call :math:`T` of a group, :math:`sc = \eta_{min} + (1-\eta_{min})\tfrac12(1+\cos(\pi T/(T_{tot}+1)))`
    (1 without ``total_steps``), then per tensor (paper Alg. 1):

    .. math::
        &p \gets p(1-\eta\lambda);\quad k \gets k+1\\
        &M \gets \gamma_3 M + (1-\gamma_3)\max|g|,\quad \hat M = M/(1-\gamma_3^k),\quad
          g_i \gets g_i \hat M/\max|g| \text{ where } |g_i| > \hat M \quad\text{(AdaClip)}\\
        &\mu \gets \gamma_1 sc\,\mu + (1-\gamma_1 sc)\|g\|,\quad \nu \gets \gamma_2\nu + (1-\gamma_2)\|g\|^2,\quad
          g \gets \frac{g}{\|g\|}\cdot\frac{\mu/(1-(\gamma_1 sc)^k)}{\sqrt{\nu/(1-\gamma_2^k)}+\epsilon}
          \quad\text{(AdaGN)}\\
        &\textbf{if } T \bmod \Delta T = 0: \text{momentum reset, } k \gets 1\\
        &m \gets \beta_1' m + (1-\beta_1') g,\ \beta_1' = \beta_1 sc;\quad v \gets \beta_2 v + (1-\beta_2)g^2\\
        &p \gets p - \frac{\eta}{1-\beta_1'^k}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^k}+\epsilon}

    Statistics are per tensor and live on the parameter's device (``state["grad_stats"]``,
    float32 ``[M, mu, nu]``); no host sync happens in ``step()``.

    Args:
        params: parameters or param-group dicts; every keyword below is also a group key.
        lr: learning rate. Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`. Default (0.9, 0.999).
        gammas: :math:`(\gamma_1, \gamma_2, \gamma_3)`; :math:`\gamma_1 = -1` means "use
            :math:`\beta_1`". Default (0.7, 0.9, 0.999) (the paper's 4-bit setting; its BF16
            runs use (0.85, 0.99999, 0.999) with ``reset_interval=1000``).
        eps: added after bias correction (torch convention). Default 1e-8.
        weight_decay: decoupled, applied first. Default 0.
        reset_interval: momentum-reset period :math:`\Delta T`; 0 never resets. Default 1000.
        total_steps: :math:`T_{tot}` of the cosine decay of :math:`\beta_1` and :math:`\gamma_1`;
            None disables it. Past it the cosine wraps around, as implemented. Default None.
        eta_min: the floor :math:`\eta_{min}` of that decay. Default 0.5.
        stale_reset_step: clean-up option. True (default, as implemented, §4.5a): the reset
            call still steps with the old moments at bias-correction count 1 (about 0.32 of an
            Adam step), then stores zeros. False: moments are zeroed before the reset call's update.
        restart_stat_counts: clean-up option. True (default, as implemented, §4.5b): the reset
            also restarts the count used by AdaClip/AdaGN bias corrections, which inflates the
            clip threshold for ~100 calls after each reset. False: that count never restarts.
        nonfinite: ``"skip"`` (default): NaN/Inf gradient entries are left out of max/norm and
            of the update, and counted in :meth:`spike_stats`; ``"propagate"``: as the authors.
        state_bits: 32 (default) or 8 (blockwise 8-bit moments, as in :class:`SPAM`).
        min_8bit_size: parameters with fewer elements keep 32-bit moments. Default 4096.

    Notes:
        ``p.grad`` is not modified (the authors rescale it in place). State per parameter:
        ``step`` (Adam count), ``stat_step`` (statistics count), ``exp_avg``, ``exp_avg_sq``
        (parameter dtype; or 8-bit codes + absmax with ``state_bits=8``) and ``grad_stats``
        (3 x float32). Memory: 2 x parameter bytes + 12 B (8-bit: 2 + 8/256 B per element + 12 B).
    """

    _fp32_state_keys = ("grad_stats",)
    _required_state_keys = ("step", "stat_step", "grad_stats")
    _count_state_keys = ("step", "stat_step")
    KIND = "StableSPAM"

    SETTINGS = StableSPAMSettings
    __init__ = settings_constructor(StableSPAMSettings)

    def _check_loaded_state(self, p: torch.Tensor, saved: dict[str, Any], group: dict[str, Any], where: str) -> None:
        stats = saved.get("grad_stats")
        if isinstance(stats, torch.Tensor) and tuple(stats.shape) != (3,):
            raise ValueError(
                f"loaded 'grad_stats' of {where} has shape {tuple(stats.shape)}; expected "
                "(3,): [max|g| EMA, ||g|| EMA, ||g||^2 EMA]"
            )
        # the base checks that the three statistics are finite and >= 0 (each is an EMA of a
        # non-negative quantity; a negative ||g||^2 EMA would take a square root of it)
        super()._check_loaded_state(p, saved, group, where)

    def _init_extra_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        state["stat_step"] = 0
        state["grad_stats"] = torch.zeros(3, dtype=torch.float32, device=p.device)

    def _group_scalars(self, group: dict[str, Any], call: int) -> _StableCall:
        sc = stable_spam_decay(call, group["total_steps"], group["eta_min"])
        beta1, _ = group["betas"]
        gamma1 = group["gammas"][0]
        reset = is_reset_call(call, group["reset_interval"])
        if not reset:
            mode = F.MomentReset.NONE
        elif group["stale_reset_step"]:
            mode = F.MomentReset.AFTER_UPDATE
        else:
            mode = F.MomentReset.BEFORE_UPDATE
        return _StableCall(reset=reset, mode=mode, beta1=beta1 * sc, gamma1=(beta1 if gamma1 == -1 else gamma1) * sc)

    def _tensor_scalars(
        self, states: list[dict[str, Any]], group: dict[str, Any], call: _StableCall
    ) -> tuple[list[dict[str, int]], dict[str, list[float]]]:
        _, beta2 = group["betas"]
        _, gamma2, gamma3 = group["gammas"]
        lr, beta1, gamma1 = group["lr"], call.beta1, call.gamma1
        counts: list[dict[str, int]] = []
        stat_bcs: list[float] = []  # (1-gamma1^k, 1-gamma2^k, 1-gamma3^k) per tensor, flat
        step_sizes: list[float] = []
        sqrt_bc2s: list[float] = []
        restart_stats = call.reset and group["restart_stat_counts"]
        for state in states:
            # the statistics' bias corrections use the count before a reset restarts it
            k_stat = state["stat_step"] + 1
            stat_bcs += (1.0 - gamma1**k_stat, 1.0 - gamma2**k_stat, 1.0 - gamma3**k_stat)
            k = 1 if call.reset else state["step"] + 1
            counts.append({"step": k, "stat_step": 1 if restart_stats else k_stat})
            step_sizes.append(lr / (1.0 - beta1**k))
            sqrt_bc2s.append(math.sqrt(1.0 - beta2**k))
        return counts, {"stat_bias_corrections": stat_bcs, "step_sizes": step_sizes, "sqrt_bc2s": sqrt_bc2s}

    def _stats_reducer(self, group: dict[str, Any], batch: DeviceBatch) -> F.StatsReducer | None:
        """The cross-shard reduction of the per-tensor statistics of ``batch`` (``reduce_stats``
        of :func:`spam_lowmem.functional.stable_spam_step`, whose docstring states the phase
        rules): for a batch of DTensor shards, max|g| and ||g||^2 over the whole tensors
        (:func:`spam_lowmem.optim.sharding.stats_reducer`); None when every tensor is whole.
        A batch holds the tensors sharded over one process group (``_gather``), and every rank
        steps the same batches, so every rank reduces in the same calls."""
        shard_group = batch.process_group
        return None if shard_group is None else sharding.stats_reducer(shard_group)

    def _core_step(self, batch: DeviceBatch, group: dict[str, Any], call: _StableCall, core_kw: dict[str, Any]) -> None:
        _, beta2 = group["betas"]
        _, gamma2, gamma3 = group["gammas"]
        F.stable_spam_step(
            batch.params,
            batch.grads,
            **core_kw,
            grad_stats=[s["grad_stats"] for s in batch.states],
            gamma1=call.gamma1,
            gamma2=gamma2,
            gamma3=gamma3,
            beta1=call.beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_keep=1.0 - group["lr"] * group["weight_decay"],
            reset=call.mode,
            reduce_stats=self._stats_reducer(group, batch),
        )
