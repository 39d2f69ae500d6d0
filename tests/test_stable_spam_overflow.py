"""Stable-SPAM's gradient statistics with finite gradients whose square leaves float32's range.

One entry of 3e19 (finite in fp32 and bf16; its square, 9e38, is not) used to overflow the
core's fp32 sum of squares: ||g|| became inf, AdaGN's target inf / inf, and the whole tensor
NaN, unreported. A gradient of 1e-25 everywhere squares to 0 in fp32: ||g|| read 0 and AdaGN
was skipped, where the reference normalises. Such blocks are now summed in double, as the
reference and the CUDA kernel sum every square.
Oracle: spam_lowmem.reference.ReferenceStableSPAM (float64 sum of squares).
"""

from __future__ import annotations

import pytest
import torch

import spam_lowmem as sl
from spam_lowmem.reference import ReferenceStableSPAM
from spam_lowmem.testing import assert_close

KW = dict(lr=1e-3, gammas=(0.7, 0.9, 0.999), reset_interval=0)


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["entry 3e19", "entry 1e30", "all 1e-25"])
def test_gradients_outside_fp32_square_range_match_reference(dtype: torch.dtype, state_bits: int, case: str) -> None:
    gen = torch.Generator().manual_seed(0)
    init = (torch.randn(64, 128, generator=gen) * 0.1).to(dtype)
    p = torch.nn.Parameter(init.clone())
    q = torch.nn.Parameter(init.clone())
    opt = sl.StableSPAM([p], **KW, state_bits=state_bits)
    ref = ReferenceStableSPAM([q], **KW, state_bits=state_bits)
    for step in range(6):
        g = torch.randn(64, 128, generator=gen)
        if step == 3 and case.startswith("entry"):
            g[5, 7] = float(case.split()[1])  # finite in fp32 and bf16, its square is not
        if step == 3 and case == "all 1e-25":
            g *= 1e-25  # every square underflows fp32
        for param in (p, q):
            param.grad = g.to(dtype)
        opt.step()
        ref.step()
        assert bool(torch.isfinite(p).all()), f"NaN/inf parameters after step {step}"
        assert_close(p.detach(), q.detach(), msg=f"step {step}")
    assert torch.equal(opt.state[p]["grad_stats"].isfinite(), ref.state[q]["grad_stats"].isfinite())
