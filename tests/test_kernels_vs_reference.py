"""The C++ core (through sl.SPAM / sl.StableSPAM) against the pure-PyTorch reference.

One step from a random non-zero state, and >= 200-step trajectories that cross several
momentum resets, warmups and clipping events, on odd sizes and fp32/bf16/fp16.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import spam_lowmem as sl
from spam_lowmem.reference import ReferenceSPAM, ReferenceStableSPAM
from spam_lowmem.testing import TOLERANCES, assert_close, gradient_stream

SIZES = [(1,), (7,), (255,), (4097,), (65537,), (33, 129)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

SPAM_KW: dict[str, Any] = dict(
    lr=1e-2, threshold=20.0, reset_interval=50, warmup_steps=10, clip_delay=5, weight_decay=0.01
)
STABLE_KW: dict[str, Any] = dict(
    lr=1e-2, reset_interval=50, total_steps=150, weight_decay=0.01, gammas=(0.7, 0.9, 0.999)
)
PAIRS = {
    "spam": (sl.SPAM, ReferenceSPAM, SPAM_KW),
    "spam-clean": (sl.SPAM, ReferenceSPAM, dict(SPAM_KW, reset_bias_correction=True)),
    "stable": (sl.StableSPAM, ReferenceStableSPAM, STABLE_KW),
    "stable-clean": (
        sl.StableSPAM,
        ReferenceStableSPAM,
        dict(STABLE_KW, stale_reset_step=False, restart_stat_counts=False),
    ),
}


def make_params(dtype: torch.dtype, sizes: list[tuple[int, ...]] = SIZES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(7)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in sizes]


def clone_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def run_lockstep(name: str, dtype: torch.dtype, steps: int) -> tuple[int, int]:
    """Drive ours and the reference with one gradient stream; compare every 25 steps."""
    ours_cls, ref_cls, kw = PAIRS[name]
    ours_p = make_params(dtype)
    ref_p = clone_params(ours_p)
    ours, ref = ours_cls(ours_p, **kw), ref_cls(ref_p, **kw)
    ref_clipped = 0
    for step, grads in enumerate(gradient_stream([p.shape for p in ours_p], steps, dtype=dtype)):
        for a, b, g in zip(ours_p, ref_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        ref_clipped += ref.last_counts["clipped"]
        if step % 25 == 24 or step == steps - 1:
            for a, b in zip(ours_p, ref_p):
                assert_close(a.detach(), b.detach(), msg=f"{name} {dtype} step {step + 1}")
    for a, b in zip(ours_p, ref_p):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(ours.state[a][key], ref.state[b][key], msg=key)
        if "grad_stats" in ref.state[b]:
            torch.testing.assert_close(ours.state[a]["grad_stats"], ref.state[b]["grad_stats"], rtol=1e-4, atol=1e-6)
    return ours.spike_stats()["clipped"], ref_clipped


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_trajectory_matches_reference(name: str, dtype: torch.dtype) -> None:
    ours_clipped, ref_clipped = run_lockstep(name, dtype, steps=200)
    assert ref_clipped > 0, "the gradient stream must exercise clipping"
    # An entry sitting exactly on the threshold may round either way in 16-bit storage.
    slack = 0 if dtype == torch.float32 else max(2, ref_clipped // 200)
    assert abs(ours_clipped - ref_clipped) <= slack


def random_state(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        st = opt.state[p]
        st["exp_avg"].copy_(torch.randn(p.shape, generator=gen) * 0.1)
        st["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) * 0.01)
        if "grad_stats" in st:
            st["grad_stats"].copy_(torch.tensor([3.0, 40.0, 2000.0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["spam", "stable"])
def test_one_step_from_random_state(name: str, dtype: torch.dtype) -> None:
    """Bring both to call 30 with zero-gradient steps, overwrite the state, take one step."""
    ours_cls, ref_cls, kw = PAIRS[name]
    kw = dict(kw, weight_decay=0.0, lr=0.0)
    ours_p = make_params(dtype)
    ref_p = clone_params(ours_p)
    ours, ref = ours_cls(ours_p, **kw), ref_cls(ref_p, **kw)
    for _ in range(29):
        for a, b in zip(ours_p, ref_p):
            a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        ours.step()
        ref.step()
    random_state(ours, ours_p, 3)
    random_state(ref, ref_p, 3)
    for group in (*ours.param_groups, *ref.param_groups):
        group["lr"] = 1e-2
    grads = next(iter(gradient_stream([p.shape for p in ours_p], 1, dtype=dtype, spike_every=1)))
    for a, b, g in zip(ours_p, ref_p, grads):
        a.grad, b.grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    rtol, atol = TOLERANCES[dtype]
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(
            a.detach(), b.detach(), rtol=rtol / 10 if dtype == torch.float32 else rtol, atol=atol
        )
        torch.testing.assert_close(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=rtol, atol=atol)
    assert ours.spike_stats()["clipped"] == ref.last_counts["clipped"] > 0


@pytest.mark.parametrize("name", ["spam", "stable"])
def test_mixed_dtypes_in_one_group(name: str) -> None:
    ours_cls, ref_cls, kw = PAIRS[name]
    ours_p = [make_params(d, [(300,)])[0] for d in DTYPES]
    ref_p = clone_params(ours_p)
    ours, ref = ours_cls(ours_p, **kw), ref_cls(ref_p, **kw)
    for _ in range(60):
        for a, b in zip(ours_p, ref_p):
            g = torch.randn(a.shape).to(a.dtype)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_p, ref_p):
        assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_isolated_spikes_are_clipped_where_the_reference_clips(state_bits: int, dtype: torch.dtype) -> None:
    """The CPU loops test runs of 64 elements for spikes and skip the clip's sqrt in runs
    without one. Spikes on run edges, inside a run and in the partial last run must be clipped
    exactly where the reference clips, and nowhere else."""
    n = 5000  # >= 4096, so 8-bit state; 78 full runs of 64 and a partial one
    spikes = [0, 63, 64, 1000, 4095, 4999]
    kw: dict[str, Any] = dict(
        lr=1e-2, threshold=5000.0, reset_interval=1000, warmup_steps=2, clip_delay=2, state_bits=state_bits
    )
    gen = torch.Generator().manual_seed(11)
    ours_p = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))]
    ref_p = clone_params(ours_p)
    ours, ref = sl.SPAM(ours_p, **kw), ReferenceSPAM(ref_p, **kw)
    # Equal magnitudes keep every 8-bit v code away from 0 (a v quantised to 0 would "spike").
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    for step in range(6):
        g = 1e-3 * sign
        if step == 4:
            g[spikes] *= 1e4
        ours_p[0].grad, ref_p[0].grad = g.to(dtype), g.to(dtype)
        ours.step()
        ref.step()
        clipped = ours.spike_stats()["clipped"]
        assert clipped == ref.last_counts["clipped"], (step, clipped, ref.last_counts)
        assert clipped == (len(spikes) if step == 4 else 0), (step, clipped)
        assert_close(ours_p[0].detach(), ref_p[0].detach(), msg=f"step {step + 1}")
