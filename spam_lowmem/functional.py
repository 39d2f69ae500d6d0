"""Stateless, typed entry points into the C++/CUDA core.

Each function steps every tensor of one parameter group on one device in place, with a
single call into the core (one OpenMP region on CPU, multi-tensor launches on the current
CUDA stream, no host synchronisation). Callers pass detached, C-contiguous tensors; the
optimizers in :mod:`spam_lowmem.optim` take care of that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.dlpack import to_dlpack

from . import _backend

__all__ = ["MomentReset", "spam_step", "stable_spam_step"]


class MomentReset:
    """How a momentum reset treats the current call (mirrors ``spam::MomentReset``)."""

    NONE = 0
    BEFORE_UPDATE = 1  # m, v read as zero, then updated (SPAM; Stable-SPAM clean mode)
    AFTER_UPDATE = 2  # step with the old m, v, then store zeros (Stable-SPAM as implemented)


def _capsules(tensors: Sequence[torch.Tensor]) -> list[object]:
    """DLPack capsules for the core. ``to_dlpack`` costs ~0.5 us a tensor where the
    ``__dlpack__`` protocol method costs ~4 us, which matters for groups of many small
    tensors. A capsule keeps its tensor alive until the core has imported it."""
    return [to_dlpack(t) for t in tensors]


def _stream_kwargs(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    return {"stream": torch.cuda.current_stream(device).cuda_stream}


def spam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    update_scales: Sequence[float],
    counters: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    clip_threshold: float,
    weight_decay_scale: float,
    reset: int,
    skip_nonfinite: bool,
) -> None:
    """One SPAM step (ALGORITHMS.md §2.4) over tensors that all live on one device.

    ``update_scales[i] = lr * s * sqrt(1 - beta2^t_i) / (1 - beta1^t_i)``; ``clip_threshold``
    is theta, or 0 for no clipping this call; ``counters`` (int64, 2 entries, same device)
    accumulates [clipped, non-finite] entries.
    """
    device = counters.device
    _backend.module_for(device).spam_step(
        _capsules(params), _capsules(grads), _capsules(exp_avgs), _capsules(exp_avg_sqs),
        list(update_scales), to_dlpack(counters),
        beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
        eps=eps, clip_threshold=clip_threshold, weight_decay_scale=weight_decay_scale,
        reset=reset, skip_nonfinite=skip_nonfinite, **_stream_kwargs(device),
    )


def stable_spam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    grad_stats: Sequence[torch.Tensor],
    stat_bias_corrections: Sequence[float],
    step_sizes: Sequence[float],
    sqrt_bc2s: Sequence[float],
    counters: torch.Tensor,
    *,
    gamma1: float,
    gamma2: float,
    gamma3: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_keep: float,
    reset: int,
    skip_nonfinite: bool,
) -> None:
    """One Stable-SPAM step (ALGORITHMS.md §4.4) over tensors that all live on one device.

    ``gamma1`` and ``beta1`` already include the cosine factor ``sc``;
    ``stat_bias_corrections`` holds ``(1-gamma1^k, 1-gamma2^k, 1-gamma3^k)`` per tensor;
    ``step_sizes[i] = lr / (1 - beta1^k_i)``, ``sqrt_bc2s[i] = sqrt(1 - beta2^k_i)``;
    ``weight_keep = 1 - lr * weight_decay``.
    """
    device = counters.device
    module = _backend.module_for(device)
    extra = _stream_kwargs(device)
    if device.type == "cuda":
        nbytes = module.stable_spam_scratch_bytes([p.numel() for p in params])
        extra["scratch"] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    module.stable_spam_step(
        _capsules(params), _capsules(grads), _capsules(exp_avgs), _capsules(exp_avg_sqs),
        _capsules(grad_stats), list(stat_bias_corrections), list(step_sizes), list(sqrt_bc2s),
        to_dlpack(counters),
        gamma1=gamma1, one_minus_gamma1=1.0 - gamma1, gamma2=gamma2,
        one_minus_gamma2=1.0 - gamma2, gamma3=gamma3, one_minus_gamma3=1.0 - gamma3,
        beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
        eps=eps, weight_keep=weight_keep, reset=reset, skip_nonfinite=skip_nonfinite, **extra,
    )
