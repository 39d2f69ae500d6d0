"""Pure-PyTorch reference (oracle) for SPAM, docs/algorithms.md §2.2-2.7.

This module is the *oracle* the C++/CUDA optimizers are tested against: it is written
for readability, not speed. Every element follows ``spam_element`` in ``cpp/spam/math.h``
with the same fp32 operations in the same order (one torch op per C++ operation, never a
fused ``addcmul``/``lerp``), so the compiled kernels and this file agree to about 1 ulp.
Step-count policies come from :mod:`spam_lowmem.schedules`; constants that depend only on
step counts are computed in Python float64 and enter the element math rounded to fp32,
exactly as the C++ core receives them.

It imports only ``torch``, ``math``, :mod:`spam_lowmem.schedules`, the pure-torch subset
hash :mod:`spam_lowmem.sparse_subset` and the argument definitions of
:mod:`spam_lowmem.hyperparams`, never the compiled extension.

Sparse momentum (``density < 1``, docs/algorithms.md §3) is written the authors' way: a full-size
bool ``mask`` per parameter (built from the same hash rule as the optimizer's, so the subsets
agree), ``g = grad[mask]``, compact moments, the update scattered into a zero full-size tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spam_lowmem import sparse_subset as subsets
from spam_lowmem.hyperparams import SPAMSettings, settings_constructor
from spam_lowmem.reference.base import ReferenceOptimizer, dense_grad
from spam_lowmem.reference.moments import init_compact_moments, init_moments, load_moments, store_moments
from spam_lowmem.schedules import (
    is_reset_call,
    spam_clip_active,
    spam_update_scale,
    spam_warmup_factor,
)

__all__ = ["ReferenceSPAM"]


def f32(x: float, like: Tensor) -> Tensor:
    """``x`` rounded to fp32, as a 0-dim tensor on ``like``'s device.

    Host scalars reach ``math.h`` as fp32; 0-dim same-device tensors (rather than Python
    floats) also keep torch from turning a division into a multiplication by a reciprocal.
    """
    return torch.tensor(x, dtype=torch.float32, device=like.device)


def as_f32(x: float) -> float:
    """The Python float nearest to ``x`` in fp32 (what a ``static_cast<float>`` gives)."""
    return float(torch.tensor(x, dtype=torch.float32).item())


def _spam_elements(
    g: Tensor,
    pf: Tensor,
    m_old: Tensor,
    v_old: Tensor,
    *,
    reset: bool,
    theta: float,
    beta1: float,
    beta2: float,
    eps: float,
    scale: float,
    decay: float,
    skip: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """math.h ``spam_element`` on fp32 tensors: (p_new, m_new, v_new, spike, finite)."""
    m_prev = torch.zeros_like(g) if reset else m_old
    v_prev = torch.zeros_like(g) if reset else v_old
    finite = torch.isfinite(g)
    cap_sq = f32(theta, g) * v_prev
    spike = (g * g) > cap_sq if theta > 0.0 else torch.zeros_like(g, dtype=torch.bool)
    g_used = torch.where(spike, torch.copysign(torch.sqrt(cap_sq), g), g)
    m_new = f32(beta1, g) * m_prev + f32(1.0 - beta1, g) * g_used
    v_new = f32(beta2, g) * v_prev + f32(1.0 - beta2, g) * (g_used * g_used)
    u = m_new / (torch.sqrt(v_new) + f32(eps, g))
    p_stepped = pf - f32(scale, g) * u
    p_new = p_stepped - f32(decay, g) * p_stepped
    if skip:
        drop = ~finite
        p_new = torch.where(drop, pf, p_new)
        m_new = torch.where(drop, m_prev, m_new)
        v_new = torch.where(drop, v_prev, v_new)
    return p_new, m_new, v_new, spike, finite


class ReferenceSPAM(ReferenceOptimizer):
    """Oracle SPAM optimizer (docs/algorithms.md §2.4, dense group; §2.3 warmup; §2.5 counters).

    Per call ``n = group["calls"] + 1`` and per parameter, in order: momentum reset on
    ``n % reset_interval == 0`` (the bias-correction count ``t`` keeps counting unless
    ``reset_bias_correction=True``); ``t += 1``; spike clipping ``g^2 > threshold * v_prev``
    outside the ``clip_delay`` holdoff; Adam moments; ``p -= lr*s*sqrt(1-b2^t)/(1-b1^t) *
    m/(sqrt(v)+eps)`` with the post-reset cosine warmup ``s``; then ``p -= lr*wd*p``.

    ``nonfinite="skip"`` leaves ``p, m, v`` of entries with a NaN/Inf gradient untouched (a
    reset still zeroes ``m, v``); ``"propagate"`` is plain arithmetic (the authors' code).
    After each ``step()``, ``last_counts`` holds the numbers of clipped and non-finite
    gradient entries of that call (summed over all groups).
    """

    SETTINGS = SPAMSettings
    __init__ = settings_constructor(SPAMSettings)

    def _configure(self, settings: SPAMSettings) -> None:  # type: ignore[override]
        seed = settings.subset_seed
        #: the base of the subset seeds, as :class:`spam_lowmem.SPAM`'s (docs/algorithms.md §3)
        self.subset_base_seed = subsets.DEFAULT_SUBSET_SEED if seed is None else int(seed)

    def _begin_call(self, group: dict[str, Any], n: int) -> None:
        if group.get("density", 1.0) < 1.0 and is_reset_call(n, group["reset_interval"]):
            # The authors regenerate after call n-1 (when (n-1)+1 is a reset call), i.e.
            # before the reset call uses it: a Bernoulli(d) mask, state restarted.
            for p in group["params"]:
                if self.state[p]:
                    self._new_mask(p, self.state[p], group, exact=False)

    def _update_tensor(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], n: int) -> tuple[int, int]:
        """One tensor, dense (§2.4) or sparse momentum in the authors' layout (§3: ``g[mask]``,
        compact m/v, the update scattered back into the full tensor)."""
        grad = dense_grad(p, "ReferenceSPAM")
        sparse = group.get("density", 1.0) < 1.0
        if not state:
            state["step"] = 0
            if sparse:
                self._new_mask(p, state, group, exact=True)
            else:
                init_moments(p, state, group)
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        interval = group["reset_interval"]

        # Host side: counters and per-tensor scalars (float64, rounded to fp32 on use).
        reset = is_reset_call(n, interval)
        if reset and group["reset_bias_correction"]:
            state["step"] = 0  # documented clean-up; the authors keep counting (§2.4 step 3)
        state["step"] += 1
        clip_on = group["spike_clipping"] and spam_clip_active(n, interval, group["clip_delay"])
        theta = as_f32(float(group["threshold"])) if clip_on else 0.0
        warmup = spam_warmup_factor(n, interval, group["warmup_steps"])
        scale = spam_update_scale(lr, beta1, beta2, state["step"], warmup)

        if sparse:
            mask = state["mask"]
            g, pf = grad[mask].float(), p[mask].float()  # 1-D copies, flat-index order
            m_old, v_old = load_moments(None, state)
            # Weight decay: a no-op in the authors' code (p.data[mask] is a copy); opt-in clean-up.
            decay = lr * wd if group["sparse_weight_decay"] else 0.0
        else:
            g, pf = grad.float(), p.float()
            m_old, v_old = load_moments(p, state)
            decay = lr * wd
        # Element math, math.h spam_element, fp32, same operation order.
        p_new, m_new, v_new, spike, finite = _spam_elements(
            g,
            pf,
            m_old,
            v_old,
            reset=reset,
            theta=theta,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            scale=scale,
            decay=decay,
            skip=group["nonfinite"] == "skip",
        )
        if sparse:
            full = p.detach().clone()
            full[mask] = p_new.to(p.dtype)  # unselected entries keep their exact values
            p_new = full
        p.copy_(p_new)
        store_moments(state, m_new, v_new)
        return int(spike.sum().item()), int((~finite).sum().item())

    # ------------------------------------------------------------------ sparse momentum
    def _new_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], *, exact: bool) -> None:
        """A new subset: exactly floor(d*numel) entries (first) or Bernoulli(d) (at resets),
        hashed with the seed of draw ``subset_draws`` of ``p``'s position in the optimizer."""
        index = [id(q) for g in self.param_groups for q in g["params"]].index(id(p))
        draw = state.get("subset_draws", 0)
        seed = subsets.subset_seed(self.subset_base_seed, index, draw)
        state["subset_draws"] = draw + 1
        d = float(group["density"])
        rule = subsets.exact_rule(seed, p.numel(), d, p.device) if exact else subsets.bernoulli_rule(seed, p.numel(), d)
        state["subset"] = rule
        state["mask"] = subsets.subset_mask(rule, p.device).view(p.shape)  # full-size bool
        init_compact_moments(p, state, group, int(state["mask"].sum()))
