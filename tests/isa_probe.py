"""Run by tests/test_cpu_isa.py in a subprocess per CPU kernel build (SPAM_LOWMEM_CPU_ISA):
8-bit quantisation of awkward values, a few 8-bit optimizer steps and sparse steps of
parameter shards (offsets), saved for comparison.

Usage: python tests/isa_probe.py OUT.pt
"""

from __future__ import annotations

import sys

import torch

import spam_lowmem as sl
from spam_lowmem import _C
from spam_lowmem import functional as F
from spam_lowmem.qmap import quant_map
from spam_lowmem.testing import near_midpoint_blocks, straddling_blocks


def awkward_values() -> torch.Tensor:
    """Midpoints and their neighbours, powers of two, zeros of both signs, random values over
    many decades, and blocks whose absmax is NaN (+NaN and -NaN) or 0."""
    gen = torch.Generator().manual_seed(7)
    parts = []
    for signed in (True, False):
        mids = quant_map(signed).midpoints[:-1]
        parts += [mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))]
    powers = torch.tensor([2.0**-k for k in range(60)])
    parts += [powers, -powers, torch.tensor([0.0, -0.0, 1.0, -1.0])]
    parts.append(torch.randn(50_000, generator=gen) * torch.logspace(-12, 0, 50_000))
    x = torch.cat(parts)
    x = torch.cat([x, torch.zeros(-x.numel() % 256)])  # whole blocks, then the special ones
    nan_block = torch.randn(256, generator=gen)
    nan_block[17] = float("nan")
    nan_block[18], nan_block[19] = float("inf"), -float("inf")  # divided by 1 (quant_divisor)
    neg_nan_block = torch.randn(256, generator=gen)
    neg_nan_block[200] = -float("nan")
    signed_zero_block = torch.zeros(256)
    signed_zero_block[::3] = -0.0
    return torch.cat([x, nan_block, neg_nan_block, signed_zero_block, torch.randn(100, generator=gen)])


def optimizer_states() -> dict[str, torch.Tensor]:
    """Seven steps of the 8-bit SPAM (dense and sparse), sparse SPAM with 32-bit values and the
    8-bit AdamW on fixed gradients, one with spikes, one with a non-finite entry; parameters
    and state as saved."""
    out: dict[str, torch.Tensor] = {}
    makers = {
        "spam": lambda ps: sl.SPAM(ps, lr=1e-2, warmup_steps=2, reset_interval=3, clip_delay=0, state_bits=8),
        "sparse": lambda ps: sl.SPAM(
            [{"params": [p for p in ps if p.dim() == 2], "density": 0.3}, {"params": [p for p in ps if p.dim() == 1]}],
            lr=1e-2,
            warmup_steps=2,
            reset_interval=3,
            clip_delay=0,
            state_bits=8,
            subset_seed=5,
        ),
        "sparse32": lambda ps: sl.SPAM(
            [{"params": [p for p in ps if p.dim() == 2], "density": 0.25}, {"params": [p for p in ps if p.dim() == 1]}],
            lr=1e-2,
            warmup_steps=2,
            reset_interval=3,
            clip_delay=0,
            subset_seed=9,
        ),
        "adamw": lambda ps: sl.AdamW(ps, lr=1e-2, weight_decay=0.1, state_bits=8),
    }
    for name, make in makers.items():
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(shape, generator=gen).requires_grad_() for shape in ((300, 70), (4096 + 17,), (64, 64))]
        opt = make(params)
        for step in range(7):
            for p in params:
                g = torch.randn(p.shape, generator=gen) * 1e-3
                if step == 3:
                    g.view(-1)[::501] *= 1e4  # spikes
                if step == 4:
                    g.view(-1)[11] = float("inf")
                p.grad = g
            opt.step()
        for i, p in enumerate(params):
            out[f"{name}.param{i}"] = p.detach().clone()
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor):
                    out[f"{name}.param{i}.{key}"] = value.clone()
    return out


def sharded_states() -> dict[str, torch.Tensor]:
    """Row shards of a (300, 70) parameter stepped in one sparse call with their offsets
    (docs/algorithms.md §13.3), fp32 (the window walk) and bf16 (the index walk), 32- and 8-bit
    compact moments, across a reset; parameters and moments as left."""
    from spam_lowmem import sparse_subset as S
    from spam_lowmem.optim import moments

    out: dict[str, torch.Tensor] = {}
    rows, cols = 300, 70
    ranges = [(0, 170 * cols), (170 * cols, 130 * cols)]
    rule = S.exact_rule(31, rows * cols, 0.3)
    masks = [S.subset_mask(rule, offset=o, count=c) for o, c in ranges]
    for dtype in (torch.float32, torch.bfloat16):
        for bits in (32, 8):
            gen = torch.Generator().manual_seed(5)
            whole = torch.randn(rows * cols, generator=gen).to(dtype)
            shards = [whole[o : o + c] for o, c in ranges]
            states: list[dict] = [{} for _ in ranges]
            for st, m in zip(states, masks):
                moments.init_compact_moments(whole, st, int(m.sum()), bits == 8)
            counters = torch.zeros(2, dtype=torch.int64)
            for step in range(5):
                g = (torch.randn(rows * cols, generator=gen) * 1e-3).to(dtype)
                g[:: 301 + step] *= 1e4
                F.sparse_spam_step(
                    shards,
                    [g[o : o + c] for o, c in ranges],
                    **moments.moment_args(states, whole.device),
                    block_starts=[S.block_starts(m) for m in masks],
                    subsets=[rule, rule],
                    update_scales=[1e-2, 1e-2],
                    counters=counters,
                    beta1=0.9,
                    beta2=0.999,
                    eps=1e-6,
                    clip_threshold=5.0 if step > 0 else 0.0,
                    weight_decay_scale=1e-3,
                    reset=F.MomentReset.BEFORE_UPDATE if step == 3 else F.MomentReset.NONE,
                    skip_nonfinite=True,
                    offsets=[o for o, _ in ranges],
                )
            name = f"sharded.{dtype}.{bits}"
            out[f"{name}.param"] = whole.clone()
            out[f"{name}.counters"] = counters
            for i, st in enumerate(states):
                for key, value in st.items():
                    out[f"{name}.shard{i}.{key}"] = value.clone()
    return out


def main(path: str) -> None:
    x = awkward_values()
    result: dict[str, object] = {"isa": _C.isa()}
    for signed in (True, False):
        src = x if signed else x.abs()
        if not signed:
            src[-356::5] = -0.0  # negative zeros in the unsigned map's input
        codes, absmax = F.quantize_blockwise(src, signed=signed)
        result[f"codes.{signed}"] = codes
        result[f"absmax.{signed}"] = absmax
        result[f"dequant.{signed}"] = F.dequantize_blockwise(codes, absmax, signed=signed)
        # values near decisions, where the VBMI build multiplies by 1 / absmax and must still
        # write the quotient's codes (the other builds divide)
        near = torch.cat([near_midpoint_blocks(signed), straddling_blocks(signed)])
        near_codes, _ = F.quantize_blockwise(near, signed=signed)
        result[f"near_codes.{signed}"] = near_codes
    result.update(optimizer_states())
    result.update(sharded_states())
    torch.save(result, path)


if __name__ == "__main__":
    main(sys.argv[1])
