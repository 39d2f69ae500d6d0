"""Pure-PyTorch reference (oracle) for SPAM, ALGORITHMS.md §2.2-2.7.

This module is the *oracle* the C++/CUDA optimizers are tested against: it is written
for readability, not speed. Every element follows ``spam_element`` in ``cpp/spam/math.h``
with the same fp32 operations in the same order (one torch op per C++ operation, never a
fused ``addcmul``/``lerp``), so the compiled kernels and this file agree to about 1 ulp.
Step-count policies come from :mod:`spam_lowmem.schedules`; constants that depend only on
step counts are computed in Python float64 and enter the element math rounded to fp32,
exactly as the C++ core receives them.

It imports only ``torch``, ``math``, :mod:`spam_lowmem.schedules` and the pure-torch subset
hash :mod:`spam_lowmem.sparse_subset`, never the compiled extension.

Sparse momentum (``density < 1``, ALGORITHMS.md §3) is written the authors' way: a full-size
bool ``mask`` per parameter (built from the same hash rule as the optimizer's, so the subsets
agree), ``g = grad[mask]``, compact moments, the update scattered into a zero full-size tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from spam_lowmem import sparse_subset as subsets
from spam_lowmem.reference.moments import init_compact_moments, init_moments, load_moments, store_moments
from spam_lowmem.schedules import (
    is_reset_call,
    spam_clip_active,
    spam_update_scale,
    spam_warmup_factor,
)

__all__ = ["ReferenceSPAM"]

NONFINITE_POLICIES = ("skip", "propagate")


def f32(x: float, like: Tensor) -> Tensor:
    """``x`` rounded to fp32, as a 0-dim tensor on ``like``'s device.

    Host scalars reach ``math.h`` as fp32; 0-dim same-device tensors (rather than Python
    floats) also keep torch from turning a division into a multiplication by a reciprocal.
    """
    return torch.tensor(x, dtype=torch.float32, device=like.device)


def as_f32(x: float) -> float:
    """The Python float nearest to ``x`` in fp32 (what a ``static_cast<float>`` gives)."""
    return float(torch.tensor(x, dtype=torch.float32).item())


def dense_grad(p: Tensor, name: str) -> Tensor:
    """``p.grad``, rejecting sparse gradients with a clear message."""
    grad = p.grad
    assert grad is not None
    if grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients; use dense gradients")
    return grad


def check_common(group: dict[str, Any]) -> None:
    """Validate the hyper-parameters shared by SPAM and Stable-SPAM (raises ValueError)."""
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if not float(lr) >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    betas = tuple(group["betas"])
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"Invalid betas (each must lie in [0, 1)): {group['betas']}")
    if not float(eps) >= 0.0:
        raise ValueError(f"Invalid eps: {eps}")
    if not float(wd) >= 0.0:
        raise ValueError(f"Invalid weight_decay: {wd}")
    ri = group["reset_interval"]
    if isinstance(ri, bool) or not isinstance(ri, int) or ri < 0:
        raise ValueError(f"Invalid reset_interval (a non-negative int): {ri}")
    if group["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite policy {group['nonfinite']!r}; use one of {NONFINITE_POLICIES}")


def _check_spam(group: dict[str, Any]) -> None:
    check_common(group)
    for key in ("warmup_steps", "clip_delay"):
        val = group[key]
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"Invalid {key} (a non-negative int): {val}")
    if group["spike_clipping"] and not float(group["threshold"]) > 0.0:
        raise ValueError(f"Invalid threshold (must be > 0 with spike_clipping): {group['threshold']}")
    d = group.get("density", 1.0)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
        raise ValueError(f"Invalid density: {d!r} (expected a number in (0, 1])")
    if d < 1.0:
        for p in group.get("params", []):
            if p.dim() != 2:
                raise ValueError(f"sparse momentum needs 2-D weights; got shape {tuple(p.shape)}")


def _spam_elements(g: Tensor, pf: Tensor, m_old: Tensor, v_old: Tensor, *, reset: bool, theta: float,
                   beta1: float, beta2: float, eps: float, scale: float, decay: float,
                   skip: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """math.h ``spam_element`` on fp32 tensors: (p_new, m_new, v_new, spike, finite)."""
    m_prev = torch.zeros_like(g) if reset else m_old
    v_prev = torch.zeros_like(g) if reset else v_old
    finite = torch.isfinite(g)
    cap_sq = f32(theta, g) * v_prev
    if theta > 0.0:
        spike = (g * g) > cap_sq
    else:
        spike = torch.zeros_like(g, dtype=torch.bool)
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


class ReferenceSPAM(torch.optim.Optimizer):
    """Oracle SPAM optimizer (ALGORITHMS.md §2.4, dense group; §2.3 warmup; §2.5 counters).

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

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
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
        density: float = 1.0,
        sparse_weight_decay: bool = False,
        subset_seed: int | None = None,
    ) -> None:
        seed = subset_seed if subset_seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        #: draws the subset seeds in the same order as :class:`spam_lowmem.SPAM`
        self.subset_generator = torch.Generator().manual_seed(int(seed))
        defaults = dict(state_bits=state_bits, min_8bit_size=min_8bit_size,
            density=density, sparse_weight_decay=sparse_weight_decay,
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, threshold=threshold,
            reset_interval=reset_interval, warmup_steps=warmup_steps, clip_delay=clip_delay,
            spike_clipping=spike_clipping, reset_bias_correction=reset_bias_correction,
            nonfinite=nonfinite,
        )
        _check_spam(defaults)
        self.last_counts: dict[str, int] = {"clipped": 0, "nonfinite": 0}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after validating its (possibly overridden) hyper-parameters."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_spam(merged)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_spam(group)  # with its parameters: the 2-D rule of sparse momentum
        except ValueError:
            self.param_groups.pop()
            raise
        group.setdefault("calls", 0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SPAM call for every group; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clipped = nonfinite = 0
        for group in self.param_groups:
            n = group["calls"] + 1
            sparse = group.get("density", 1.0) < 1.0
            if sparse and is_reset_call(n, group["reset_interval"]):
                # The authors regenerate after call n-1 (when (n-1)+1 is a reset call), i.e.
                # before the reset call uses it: a Bernoulli(d) mask, state restarted.
                for p in group["params"]:
                    if self.state[p]:
                        self._new_mask(p, self.state[p], group, exact=False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if sparse:
                    c, b = self._update_sparse(p, self.state[p], group, n)
                else:
                    c, b = self._update_tensor(p, self.state[p], group, n)
                clipped += c
                nonfinite += b
            group["calls"] = n
        self.last_counts = {"clipped": clipped, "nonfinite": nonfinite}
        return loss

    @staticmethod
    def _update_tensor(p: Tensor, state: dict[str, Any], group: dict[str, Any], n: int) -> tuple[int, int]:
        grad = dense_grad(p, "ReferenceSPAM")
        if not state:
            state["step"] = 0
            init_moments(p, state, group)
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        interval = group["reset_interval"]

        # Host side: counters and per-tensor scalars (float64, rounded to fp32 on use).
        reset = is_reset_call(n, interval)
        if reset and group["reset_bias_correction"]:
            state["step"] = 0  # documented clean-up; the authors keep counting (§2.4 step 3)
        state["step"] += 1
        t = state["step"]
        clip_on = group["spike_clipping"] and spam_clip_active(n, interval, group["clip_delay"])
        theta = as_f32(float(group["threshold"])) if clip_on else 0.0
        warmup = spam_warmup_factor(n, interval, group["warmup_steps"])
        scale = spam_update_scale(lr, beta1, beta2, t, warmup)

        # Element math, math.h spam_element, fp32, same operation order.
        g = grad.float()
        pf = p.float()
        m_old, v_old = load_moments(p, state)
        p_new, m_new, v_new, spike, finite = _spam_elements(
            g, pf, m_old, v_old, reset=reset, theta=theta, beta1=beta1, beta2=beta2, eps=eps,
            scale=scale, decay=lr * wd, skip=group["nonfinite"] == "skip")
        p.copy_(p_new)
        store_moments(state, m_new, v_new)
        return int(spike.sum().item()), int((~finite).sum().item())

    # ------------------------------------------------------------------ sparse momentum
    def _new_mask(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], *, exact: bool) -> None:
        """A new subset: exactly floor(d*numel) entries (first) or Bernoulli(d) (at resets)."""
        seed = subsets.draw_seed(self.subset_generator)
        d = float(group["density"])
        rule = (subsets.exact_rule(seed, p.numel(), d, p.device) if exact
                else subsets.bernoulli_rule(seed, p.numel(), d))
        state["subset"] = rule
        state["mask"] = subsets.subset_mask(rule, p.device).view(p.shape)  # full-size bool
        init_compact_moments(p, state, group, int(state["mask"].sum()))

    def _update_sparse(self, p: Tensor, state: dict[str, Any], group: dict[str, Any], n: int) -> tuple[int, int]:
        """Sparse momentum, the authors' layout: g[mask], compact m/v, scattered update."""
        grad = dense_grad(p, "ReferenceSPAM")
        if not state:
            state["step"] = 0
            self._new_mask(p, state, group, exact=True)
        mask = state["mask"]
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        beta1, beta2 = (float(b) for b in group["betas"])
        interval = group["reset_interval"]
        reset = is_reset_call(n, interval)
        if reset and group["reset_bias_correction"]:
            state["step"] = 0
        state["step"] += 1
        t = state["step"]
        clip_on = group["spike_clipping"] and spam_clip_active(n, interval, group["clip_delay"])
        theta = as_f32(float(group["threshold"])) if clip_on else 0.0
        warmup = spam_warmup_factor(n, interval, group["warmup_steps"])
        scale = spam_update_scale(lr, beta1, beta2, t, warmup)
        # Weight decay: a no-op in the authors' code (p.data[mask] is a copy); opt-in clean-up.
        decay = lr * wd if group["sparse_weight_decay"] else 0.0

        g = grad[mask].float()  # 1-D copy, flat-index order
        ps = p[mask].float()
        m_old, v_old = load_moments(None, state)
        p_sel, m_new, v_new, spike, finite = _spam_elements(
            g, ps, m_old, v_old, reset=reset, theta=theta, beta1=beta1, beta2=beta2, eps=eps,
            scale=scale, decay=decay, skip=group["nonfinite"] == "skip")
        full = p.detach().clone()
        full[mask] = p_sel.to(p.dtype)  # unselected entries keep their exact values
        p.copy_(full)
        store_moments(state, m_new, v_new)
        return int(spike.sum().item()), int((~finite).sum().item())
