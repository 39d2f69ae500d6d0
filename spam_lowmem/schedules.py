"""Step-count policies of SPAM and Stable-SPAM, as pure functions of the call index.

Python owns these (the C++ core only sees the resulting scalars). ``n`` is always the
1-based index of the current ``step()`` call of a parameter group.

References: docs/algorithms.md §2.2-2.5 (SPAM) and §4.3 (Stable-SPAM).
"""

from __future__ import annotations

import math

__all__ = [
    "spam_warmup_factor",
    "is_reset_call",
    "spam_clip_active",
    "spam_update_scale",
    "stable_spam_decay",
]


def is_reset_call(n: int, reset_interval: int) -> bool:
    """True when call ``n`` resets the moments (``n % dT == 0``; never when ``dT == 0``)."""
    return reset_interval > 0 and n % reset_interval == 0


def spam_warmup_factor(n: int, reset_interval: int, warmup_steps: int) -> float:
    """Post-reset cosine warmup multiplier ``s`` of SPAM (§2.3).

    ``s = 1 - dr(j)`` with ``dr(j) = 0.99 * (1 + cos(pi * j / (N + 1))) / 2`` for ``j < N``
    and ``0`` otherwise, where ``j`` counts calls since the last reset (the reset call has
    ``j = 0``, so ``s = 0.01`` there). Before the first reset there is no warmup (``s = 1``):
    the authors start their warmup counter at ``N + 1``.
    """
    if reset_interval <= 0 or n < reset_interval:
        return 1.0
    j = n % reset_interval
    if j >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * 0.5 * (1.0 + math.cos(math.pi * j / (warmup_steps + 1)))


def spam_clip_active(n: int, reset_interval: int, clip_delay: int) -> bool:
    """Whether spike clipping runs on call ``n`` (§2.4 step 5).

    Off for the first ``clip_delay`` calls of training and of every reset period, where
    ``v`` is (near) zero and every entry would count as a spike.
    """
    if n < clip_delay:
        return False
    return reset_interval <= 0 or n % reset_interval >= clip_delay


def spam_update_scale(lr: float, beta1: float, beta2: float, t: int, warmup: float) -> float:
    """``lr * s * sqrt(1 - beta2^t) / (1 - beta1^t)``: SPAM's per-tensor step size (§2.4 step 7)."""
    return lr * warmup * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def stable_spam_decay(T: int, total_steps: int | None, eta_min: float) -> float:
    """Stable-SPAM's cosine factor ``sc`` on beta1 and gamma1 (§4.3).

    ``sc = eta_min + (1 - eta_min) * (1 + cos(pi * T / (total_T + 1))) / 2``, from 1 down to
    ``eta_min`` (0.5 in the paper). Past ``total_T`` the cosine wraps around, as implemented.
    ``1`` when ``total_steps`` is None.
    """
    if total_steps is None:
        return 1.0
    return eta_min + (1.0 - eta_min) * 0.5 * (1.0 + math.cos(math.pi * T / (total_steps + 1)))
