"""How far one Adam-family step may move an entry, and gradient streams that probe it.

Exact Adam cannot move an entry arbitrarily far in one step, whatever its gradients: with
m and v started from zero t steps ago (docs/algorithms.md, "8-bit state"),

    m_t = (1-b1) sum_{j<t} b1^j g_{t-j},      v_t = (1-b2) sum_{j<t} b2^j g_{t-j}^2,

so by Cauchy-Schwarz (split b1^j = (b1/sqrt(b2))^j * sqrt(b2)^j)

    |m_t| <= K_t sqrt(v_t),   K_t = (1-b1)/sqrt(1-b2) * sqrt(sum_{j<t} r^j),  r = b1^2 / b2.

With bias corrections the update direction is bounded by

    |m_hat / (sqrt(v_hat) + eps)| <= sqrt(1-b2^t) / (1-b1^t) * K_t,

which is 1 at t = 1 and tends to (1-b1)/sqrt((1-b2)(1-r)) (7.27 for betas (0.9, 0.999));
Kingma and Ba's "about lr * (1-b1)/sqrt(1-b2)" is the bound's single-spike case. Quantised
moments must keep this property: an 8-bit v that rounds to 0 under a non-zero m breaks it by
orders of magnitude (lr * m / eps). The tests (tests/test_quant8_bounds.py) and
benchmarks/bench_8bit_fidelity.py check every step of 8-bit runs against it on the streams below.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = [
    "adam_ratio_bound",
    "adam_direction_bound",
    "split_scale_stream",
    "lognormal_stream",
    "rare_rows_stream",
    "denormal_stream",
    "STREAMS",
]


def adam_ratio_bound(beta1: float, beta2: float, t: int) -> float:
    """K_t: the largest |m_t| / sqrt(v_t) any gradient sequence gives after t steps from zero."""
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}")
    r = beta1 * beta1 / beta2
    series = float(t) if r == 1.0 else (1.0 - r**t) / (1.0 - r)
    return (1.0 - beta1) / math.sqrt(1.0 - beta2) * math.sqrt(series)


def adam_direction_bound(beta1: float, beta2: float, t: int) -> float:
    """The bound on |m_hat / sqrt(v_hat)| at bias-correction count t (1 at t = 1)."""
    return math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) * adam_ratio_bound(beta1, beta2, t)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def split_scale_stream(
    shape: tuple[int, ...], steps: int, *, ratio: float = 1e-4, seed: int = 0
) -> Iterator[torch.Tensor]:
    """A random half of the entries gets gradients ``ratio`` times smaller than the other half
    (mixed within every 256-entry block): v spans ratio**2 inside a block."""
    gen = _generator(seed)
    scale = torch.where(torch.rand(shape, generator=gen) < 0.5, ratio, 1.0)
    for _ in range(steps):
        yield torch.randn(shape, generator=gen) * scale


def lognormal_stream(
    shape: tuple[int, ...], steps: int, *, sigma: float = 1.5, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Per-entry gradient scales exp(sigma * z), z ~ N(0, 1) fixed per entry, times N(0, 1) noise."""
    gen = _generator(seed)
    scale = torch.exp(sigma * torch.randn(shape, generator=gen))
    for _ in range(steps):
        yield torch.randn(shape, generator=gen) * scale


def rare_rows_stream(
    shape: tuple[int, ...], steps: int, *, active: float = 0.05, seed: int = 0
) -> Iterator[torch.Tensor]:
    """Embedding-like: each row gets a gradient with probability ``active`` per step, else exact
    zeros (a rare token), so most entries coast on m and v alone most of the time."""
    gen = _generator(seed)
    rows = shape[0]
    for _ in range(steps):
        on = (torch.rand(rows, 1, generator=gen) < active).float()
        yield torch.randn(shape, generator=gen) * on


def denormal_stream(shape: tuple[int, ...], steps: int, *, seed: int = 0) -> Iterator[torch.Tensor]:
    """A quarter of the entries gets float32 denormal gradients (~1e-40, their squares flush
    to 0 in v), a quarter exact zeros, the rest N(0, 1)."""
    gen = _generator(seed)
    kind = torch.randint(0, 4, shape, generator=gen)
    scale = torch.where(kind == 0, 1e-40, torch.where(kind == 1, 0.0, 1.0))
    for _ in range(steps):
        yield torch.randn(shape, generator=gen) * scale


STREAMS = {
    "split_scale": split_scale_stream,
    "lognormal": lognormal_stream,
    "rare_rows": rare_rows_stream,
    "denormal": denormal_stream,
}
