"""Pure-PyTorch reference (oracle) for Stable-SPAM, docs/algorithms.md §4.3-4.6.

This module is the *oracle* the C++/CUDA optimizers are tested against. Per tensor it
follows ``stable_adaclip``, ``stable_adagn`` and ``stable_spam_element`` of
``cpp/spam/math.h`` with the same fp32 operations in the same order; the two reductions
are ``max|g|`` in fp32 and the sum of squares of the clipped gradient in float64 (then
``sqrt`` in float64, cast to fp32). Scalars that depend only on step counts are computed
in Python float64 and enter the math rounded to fp32, as the C++ core receives them.

As-implemented quirks (§4.5) are the defaults and can be switched off:

* ``stale_reset_step=True`` (§4.5a): on a reset call the update still uses the old
  moments with Adam count ``k = 1``; zeros are stored afterwards. ``False``: the moments
  are zeroed before the update (a clean Adam restart, also with ``k = 1``).
* ``restart_stat_counts=True`` (§4.5b): the count used by the AdaClip/AdaGN bias
  corrections restarts with ``k`` (to 1 after the reset call, so the next call uses 2),
  while ``M, mu, nu`` keep their values. ``False``: that count never restarts.

It imports only ``torch``, ``math``, :mod:`spam_lowmem.schedules` and the argument
definitions of :mod:`spam_lowmem.hyperparams`, never the compiled extension.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from spam_lowmem.hyperparams import StableSPAMSettings, settings_constructor
from spam_lowmem.reference.base import ReferenceOptimizer, dense_grad
from spam_lowmem.reference.moments import init_moments, load_moments, store_moments
from spam_lowmem.reference.spam import f32
from spam_lowmem.schedules import is_reset_call, stable_spam_decay

__all__ = ["ReferenceStableSPAM"]


class ReferenceStableSPAM(ReferenceOptimizer):
    """Oracle Stable-SPAM optimizer (docs/algorithms.md §4.4, with the §4.5 quirks by default).

    Per call ``T = group["calls"] + 1``: ``sc = stable_spam_decay(T, total_steps, eta_min)``
    decays ``beta1`` and ``gamma1`` (``gamma1 = -1`` means ``beta1``). Per tensor: AdaClip
    (EMA of ``max|g|`` with ``gamma3``), AdaGN (EMAs of ``||g||`` and ``||g||^2``), the
    momentum reset every ``reset_interval`` calls, then AdamW (weight decay first, eps after
    the bias correction). State: ``step`` (Adam count k), ``stat_step`` (count of the
    statistics' bias corrections), ``exp_avg``, ``exp_avg_sq`` (parameter dtype) and
    ``grad_stats`` = fp32 ``[M, mu, nu]``.

    ``nonfinite="skip"`` keeps NaN/Inf gradient entries out of both reductions and leaves
    their ``p, m, v`` untouched (a reset still zeroes ``m, v``); ``"propagate"`` is plain
    arithmetic, so a NaN reaches the statistics and the whole tensor. ``last_counts`` holds
    the clipped (finite, ``|g| > threshold``) and non-finite entry counts of the last call.
    """

    SETTINGS = StableSPAMSettings
    __init__ = settings_constructor(StableSPAMSettings)

    def _update_tensor(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], T: int) -> tuple[int, int]:
        grad = dense_grad(p, "ReferenceStableSPAM")
        if not state:
            state["step"] = 0
            state["stat_step"] = 0
            init_moments(p, state, group)
            state["grad_stats"] = torch.zeros(3, dtype=torch.float32, device=p.device)
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        gamma1, gamma2, gamma3 = (float(x) for x in group["gammas"])
        sc = stable_spam_decay(T, group["total_steps"], float(group["eta_min"]))
        g1 = (beta1 if gamma1 == -1.0 else gamma1) * sc
        b1 = beta1 * sc
        skip = group["nonfinite"] == "skip"

        state["step"] += 1
        state["stat_step"] += 1
        kstat = state["stat_step"]

        g = grad.float()
        finite = torch.isfinite(g)
        abs_g = torch.abs(g)
        # AdaClip (math.h stable_adaclip): fold max|g| into M, threshold M_hat.
        stats = state["grad_stats"]
        red = torch.where(finite, abs_g, torch.zeros_like(abs_g)) if skip else abs_g
        gmax = red.amax() if red.numel() > 0 else torch.zeros((), dtype=torch.float32, device=g.device)
        M = f32(gamma3, g) * stats[0] + f32(1.0 - gamma3, g) * gmax
        thr = M / f32(1.0 - gamma3**kstat, g)
        clip_scale = torch.where(gmax > 0.0, thr / gmax, torch.ones_like(thr))
        spike = abs_g > thr
        gc = torch.where(spike, g * clip_scale, g)
        # ||clipped g||: sum of squares in float64, sqrt in float64, then fp32.
        gc_red = torch.where(finite, gc, torch.zeros_like(gc)) if skip else gc
        gd = gc_red.double()
        norm = torch.sqrt((gd * gd).sum()).float()
        # AdaGN (math.h stable_adagn): EMAs of the norm and squared norm, target norm c.
        mu = f32(g1, g) * stats[1] + f32(1.0 - g1, g) * norm
        nu = f32(gamma2, g) * stats[2] + f32(1.0 - gamma2, g) * (norm * norm)
        mu_hat = mu / f32(1.0 - g1**kstat, g)
        nu_hat = nu / f32(1.0 - gamma2**kstat, g)
        target = mu_hat / (torch.sqrt(nu_hat) + f32(eps, g))
        stats.copy_(torch.stack([M, mu, nu]))

        # Momentum reset (§4.4 step 5, §4.5): k restarts before this call's bias corrections.
        reset = is_reset_call(T, group["reset_interval"])
        if reset:
            state["step"] = 1
            if group["restart_stat_counts"]:
                state["stat_step"] = 1
        zero_before = reset and not group["stale_reset_step"]
        zero_after = reset and group["stale_reset_step"]
        k = state["step"]
        step_size = lr / (1.0 - b1**k)
        sqrt_bc2 = math.sqrt(1.0 - beta2**k)

        # Element math (math.h stable_spam_element).
        pf = p.float()
        m_old, v_old = load_moments(p, state)
        m_prev = torch.zeros_like(g) if zero_before else m_old
        v_prev = torch.zeros_like(g) if zero_before else v_old
        gn = torch.where(norm > 0.0, gc / norm * target, gc)
        m_new = f32(b1, g) * m_prev + f32(1.0 - b1, g) * gn
        v_new = f32(beta2, g) * v_prev + f32(1.0 - beta2, g) * (gn * gn)
        denom = torch.sqrt(v_new) / f32(sqrt_bc2, g) + f32(eps, g)
        p_decayed = pf * f32(1.0 - lr * wd, g)
        p_new = p_decayed - f32(step_size, g) * (m_new / denom)
        if skip:
            drop = ~finite
            p_new = torch.where(drop, pf, p_new)
            m_new = torch.where(drop, m_prev, m_new)
            v_new = torch.where(drop, v_prev, v_new)
        p.copy_(p_new)
        if zero_after:
            m_new, v_new = torch.zeros_like(m_new), torch.zeros_like(v_new)
        store_moments(state, m_new, v_new)
        n_clipped = int((spike & finite).sum().item())
        return n_clipped, int((~finite).sum().item())
