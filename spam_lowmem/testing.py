"""Helpers shared by the test-suite (shipped in the package so tests import the installed copy).

Tolerances live in one table keyed by storage dtype. Gradient streams are generated
independently of the parameters, so two optimizers fed the same stream can be compared
step by step without feedback amplifying rounding differences.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "TOLERANCES",
    "assert_close",
    "gradient_stream",
    "available_devices",
    "near_midpoint_blocks",
    "straddling_blocks",
]

#: (rtol, atol) for comparing a kernel against the reference after a trajectory. fp32 agrees
#: to a few ulp; 16-bit storage may round an element the other way now and then, and the
#: difference can grow to 2 ulp over a trajectory.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 1e-6),
    torch.bfloat16: (2**-6, 1e-5),
    torch.float16: (2**-9, 1e-5),
}


#: 16-bit trajectories: fraction of elements allowed outside (rtol, atol). A per-tensor
#: statistic (Stable-SPAM's norm, reduced in another order) that differs in its last fp32
#: bit flips the rounding of an element now and then; such elements must still lie within
#: a few ulp of the tensor's scale.
OUTLIER_FRACTION = 1e-3
OUTLIER_ULPS = 4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, msg: str = "") -> None:
    """Compare with the dtype-keyed tolerances above.

    fp32: every element within (rtol, atol). 16-bit storage: all but ``OUTLIER_FRACTION``
    of the elements within (rtol, atol), and every element within ``OUTLIER_ULPS`` ulp of
    ``max(|expected|)``.
    """
    rtol, atol = TOLERANCES[expected.dtype]
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")
        return
    a, e = actual.float(), expected.float()
    assert a.shape == e.shape and actual.dtype == expected.dtype, msg
    outside = (a - e).abs() > atol + rtol * e.abs()
    allowed = max(1, int(OUTLIER_FRACTION * e.numel()))
    assert int(outside.sum()) <= allowed, f"{msg}: {int(outside.sum())} elements outside tolerance"
    scale = float(e.abs().max()) if e.numel() else 0.0
    bound = OUTLIER_ULPS * torch.finfo(expected.dtype).eps * max(scale, 1e-3)
    worst = float((a - e).abs().max()) if e.numel() else 0.0
    assert worst <= bound, f"{msg}: max difference {worst} exceeds {OUTLIER_ULPS} ulp ({bound})"


def gradient_stream(
    shapes: Sequence[torch.Size | tuple[int, ...]],
    steps: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    spike_every: int = 7,
    spike_scale: float = 300.0,
    seed: int = 0,
) -> Iterator[list[torch.Tensor]]:
    """Yield ``steps`` lists of gradients with occasional large spikes in a few entries.

    The spikes are what SPAM and Stable-SPAM clip, so a test driven by this stream exercises
    the clipping paths, not only the Adam update.
    """
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grads = []
        for shape in shapes:
            g = torch.randn(shape, generator=gen) * (1.0 + 0.5 * torch.rand((), generator=gen))
            if step % spike_every == spike_every - 1 and g.numel() > 0:
                idx = torch.randint(0, g.numel(), (max(1, g.numel() // 50),), generator=gen)
                g.view(-1)[idx] *= spike_scale
            grads.append(g.to(dtype=dtype, device=device))
        yield grads


def available_devices() -> list[str]:
    """``["cpu"]`` plus ``"cuda"`` when a GPU and the CUDA kernels are both present."""
    from . import _backend

    devices = ["cpu"]
    if torch.cuda.is_available() and _backend.has_cuda_kernels():
        devices.append("cuda")
    return devices


def _stepped_multiples(mids: torch.Tensor, absmax: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """absmax * mids moved by ``shift`` float steps (bit patterns), kept within [-absmax, absmax]."""
    x = (mids * absmax).view(torch.int32).add(shift).view(torch.float32)
    return torch.where(x.abs() > absmax, absmax.expand_as(x).copysign(x), x)


def near_midpoint_blocks(signed: bool, *, blocks: int = 64, steps: int = 8, seed: int = 5) -> torch.Tensor:
    """Whole 256-element blocks whose values lie within ``steps`` float steps (bit patterns)
    of absmax * every midpoint of the map, for awkward absmax values over 60 binades; the last
    element of each block is its absmax. Where a quantiser multiplies by 1 / absmax instead of
    dividing (the VBMI runs), only such values can get another code than x / absmax."""
    from .qmap import quant_map

    mids = quant_map(signed).midpoints[:-1]
    gen = torch.Generator().manual_seed(seed)
    absmax = torch.ldexp(1.0 + torch.rand(blocks, generator=gen), torch.randint(-40, 20, (blocks,), generator=gen))
    out = []
    for d in absmax:
        shift = torch.randint(-steps, steps + 1, (mids.numel(),), generator=gen, dtype=torch.int32)
        x = _stepped_multiples(mids, d, shift)
        if signed:
            x = torch.where(torch.rand(mids.numel(), generator=gen) < 0.5, -x, x)
        out.append(torch.cat([x, d.view(1)]))
    return torch.cat(out)


def straddling_blocks(signed: bool, *, count: int = 16, seed: int = 11) -> torch.Tensor:
    """``count`` 256-element blocks [x, absmax, 0, ...] in each of which x * (1 / absmax) and
    x / absmax (float32, as the kernels round them) get different codes: a midpoint lies
    between them. Found by a seeded search over awkward absmax values and x within 3 float
    steps of absmax * a midpoint; a quantiser that multiplies must catch every one of them."""
    from .qmap import BLOCK_SIZE, quant_map

    q = quant_map(signed)
    mids = q.midpoints[:-1]
    gen = torch.Generator().manual_seed(seed)
    xs: list[torch.Tensor] = []
    ds: list[torch.Tensor] = []
    found = 0
    for _ in range(200):
        n = 1 << 17
        d = torch.ldexp(1.0 + torch.rand(n, generator=gen), torch.randint(-40, 20, (n,), generator=gen))
        mu = mids[torch.randint(0, mids.numel(), (n,), generator=gen)]
        shift = torch.randint(-3, 4, (n,), generator=gen, dtype=torch.int32)
        x = _stepped_multiples(mu, d, shift)
        differ = q.quantize_reference(x / d) != q.quantize_reference(x * (1.0 / d))
        xs.append(x[differ])
        ds.append(d[differ])
        found += int(differ.sum())
        if found >= count:
            break
    x, d = torch.cat(xs)[:count], torch.cat(ds)[:count]
    if x.numel() < count:
        raise RuntimeError(f"found {x.numel()} of {count} straddling values")
    blocks = torch.zeros(count, BLOCK_SIZE)
    blocks[:, 0], blocks[:, 1] = x, d
    return blocks.flatten()
