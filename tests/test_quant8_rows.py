"""8-bit blocks that restart at each row (docs/algorithms.md §13.2): the kernels against the
reference and a brute-force per-row quantiser, invariance under a split of the rows (what FSDP2's
Shard(0) resharding needs), loading state dicts of the earlier flat layout, and empty shards."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch

import spam_lowmem as sl
from spam_lowmem import functional as F
from spam_lowmem.qmap import BLOCK_SIZE, absmax_shape, block_layout, num_blocks, quant_map
from spam_lowmem.reference import ReferenceSPAM, ReferenceStableSPAM
from spam_lowmem.reference.moments import init_moments, load_moments, quantize_blocks, store_moments
from spam_lowmem.testing import assert_close, gradient_stream

# Rows of 72 (one partial block a row), 300 (256 + 44), 1376 (5 x 256 + 96: a down_proj) and
# 4096 (whole blocks: the flat layout reshaped).
SHAPES = [(130, 72), (129, 300), (64, 1376), (3, 4096)]
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
CODE_KEYS = ("exp_avg_codes", "exp_avg_sq_codes")
ABSMAX_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")
QUANT_KEYS = (*CODE_KEYS, *ABSMAX_KEYS)


def brute_force_codes(normalized: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """argmin |x - map| in float64; on an exact tie the larger code wins."""
    d = (normalized.double().reshape(-1)[:, None] - values.double()[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    idx = torch.arange(values.numel()).expand_as(d)
    return torch.where(d == best, idx, -1).amax(dim=1).to(torch.uint8)


def per_row_oracle(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and absmax of x (dim >= 2) block by block, each row cut into 256-element pieces from
    its own start, written out with loops: the layout by its definition."""
    rows = x.float().reshape(x.shape[0], -1)
    length = rows.shape[1]
    values = quant_map(signed).values
    codes = torch.empty(rows.shape, dtype=torch.uint8)
    absmax = torch.empty(rows.shape[0], num_blocks(length))
    for r in range(rows.shape[0]):
        for j in range(num_blocks(length)):
            piece = rows[r, j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE]
            a = piece.abs().max()
            absmax[r, j] = a
            codes[r, j * BLOCK_SIZE : j * BLOCK_SIZE + piece.numel()] = brute_force_codes(
                piece / a if a > 0 else piece, values
            )
    return codes.reshape(x.shape), absmax


# ------------------------------------------------------------------------- layout helpers
def test_layout_of_shapes() -> None:
    assert block_layout((3, 600)) == (3, 3) and absmax_shape((3, 600)) == (3, 3)  # 256 | 256 | 88
    assert absmax_shape((512, 1376)) == (512, 6)
    assert absmax_shape((7, 3, 100)) == (7, 2)  # rows are dim 0; L = 300
    assert absmax_shape((4, 512)) == (4, 2)
    assert absmax_shape((1000,)) == (4,) and absmax_shape(()) == (1,)
    assert absmax_shape((0, 300)) == (0, 2) and absmax_shape((5, 0)) == (5, 0)


# ------------------------------------------------------------ (c) quantise / dequantise
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(130, 72), (129, 300), (3, 600), (2, 5, 77), (4, 512)])
def test_blockwise_round_trip_matches_per_row_brute_force(shape: tuple[int, ...], signed: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen) * torch.logspace(-6, 0, math.prod(shape)).reshape(shape)
    if not signed:
        x = x.abs()
    x.view(-1)[::97] = 0.0
    codes, absmax = F.quantize_blockwise(x, signed=signed)
    want_codes, want_absmax = per_row_oracle(x, signed)
    assert codes.shape == x.shape and absmax.shape == absmax_shape(shape)
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(codes, want_codes)
    back = F.dequantize_blockwise(codes, absmax, signed=signed)
    scale = want_absmax.repeat_interleave(BLOCK_SIZE, dim=1)[:, : x[0].numel()].reshape(shape)
    assert back.shape == x.shape
    assert torch.equal(back, quant_map(signed).values[codes.long()] * scale)
    # the reference's padded-rows quantiser agrees
    ref_codes, ref_absmax = quantize_blocks(x, signed, rows=shape[0])
    assert torch.equal(ref_codes.reshape(shape), codes) and torch.equal(ref_absmax, absmax)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blockwise_rows_are_split_invariant_and_flat_stays_available(dtype: torch.dtype) -> None:
    x = torch.randn(129, 300).to(dtype)
    codes, absmax = F.quantize_blockwise(x)
    for part in (slice(0, 65), slice(65, 129), slice(10, 11)):
        c, a = F.quantize_blockwise(x[part])
        assert torch.equal(c, codes[part]) and torch.equal(a, absmax[part])
    flat_codes, flat_absmax = F.quantize_blockwise(x, flat=True)
    ref_codes, ref_absmax = quantize_blocks(x.float().reshape(-1), True)
    assert flat_codes.shape == (x.numel(),) and flat_absmax.shape == (num_blocks(x.numel()),)
    assert torch.equal(flat_codes, ref_codes) and torch.equal(flat_absmax, ref_absmax)
    assert torch.equal(F.dequantize_blockwise(flat_codes, flat_absmax), F.dequantize_blockwise(flat_codes, ref_absmax))


def test_blockwise_layout_checks() -> None:
    x = torch.randn(130, 72)
    codes, _ = F.quantize_blockwise(x)
    with pytest.raises(ValueError, match="absmax"):  # 130 rows of 72 need 1 block a row
        F.dequantize_blockwise(codes, torch.zeros(130, 2))
    with pytest.raises(ValueError, match="rows"):  # 7 rows do not divide 9360 elements
        F.dequantize_blockwise(codes, torch.zeros(7, 1))
    with pytest.raises(ValueError, match="absmax"):
        F.dequantize_blockwise(codes, torch.zeros(2, 65, 1))


# --------------------------------------------------------- (a) the steps vs the reference
def _adamw_oracle(kw: dict[str, Any]):
    """AdamW over the reference's 8-bit storage (spam_lowmem.reference.moments: padded rows),
    in fp32 with the kernel's operation order (math.h stable_spam_element without clipping)."""
    lr, (beta1, beta2), eps, wd = kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"]

    def step(p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], k: int) -> None:
        m_old, v_old = load_moments(p, state)
        gf = g.float()
        m = beta1 * m_old + (1.0 - beta1) * gf
        v = beta2 * v_old + (1.0 - beta2) * (gf * gf)
        denom = v.sqrt() / math.sqrt(1.0 - beta2**k) + eps
        p_new = p.float() * (1.0 - lr * wd) - (lr / (1.0 - beta1**k)) * (m / denom)
        p.copy_(p_new.to(p.dtype))
        store_moments(state, m, v)

    return step


STEP_KW = {
    "spam": dict(lr=1e-2, threshold=20.0, reset_interval=6, warmup_steps=3, clip_delay=2),
    "stable": dict(lr=1e-2, reset_interval=6, total_steps=20),
    "adamw": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
}
CLASSES = {"spam": (sl.SPAM, ReferenceSPAM), "stable": (sl.StableSPAM, ReferenceStableSPAM), "adamw": (sl.AdamW, None)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CLASSES))
def test_row_blocks_lockstep_against_reference(name: str, dtype: torch.dtype) -> None:
    """10 steps across a momentum reset; before each step the reference takes the kernel's
    state and parameters, so each comparison measures one step (tolerances of test_quant8.py)."""
    cls, ref_cls = CLASSES[name]
    kw = STEP_KW[name]
    gen = torch.Generator().manual_seed(3)
    ours_p = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = cls(ours_p, state_bits=8, **kw)
    if ref_cls is not None:
        ref = ref_cls(ref_p, state_bits=8, **kw)
        ref_states = lambda: [ref.state[b] for b in ref_p]  # noqa: E731
    else:  # AdamW: the oracle over the reference's storage
        oracle = _adamw_oracle(kw)
        states: list[dict[str, Any]] = [{} for _ in ref_p]
        ref_states = lambda: states  # noqa: E731
    total = mismatched = far = 0
    for k, grads in enumerate(gradient_stream(SHAPES, 10, dtype=dtype), start=1):
        for a, b, g in zip(ours_p, ref_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        if ref_cls is not None:
            ref.step()
        else:
            with torch.no_grad():
                for b, st in zip(ref_p, states):
                    if not st:  # first step: fresh 8-bit moments, made by the reference
                        init_moments(b, st, {"state_bits": 8})
                    oracle(b, b.grad, st, k)
        for a, b, sr in zip(ours_p, ref_p, ref_states()):
            so = ours.state[a]
            assert so["exp_avg_codes"].shape == a.shape
            assert so["exp_avg_absmax"].shape == absmax_shape(a.shape)
            assert_close(a.detach(), b.detach(), msg=f"{name} {tuple(a.shape)} step {k}")
            for key in CODE_KEYS:
                d = (so[key].int() - sr[key].int()).abs()
                total += d.numel()
                mismatched += int((d > 0).sum())
                far += int((d > 1).sum())
            for key in ABSMAX_KEYS:
                # a short block's absmax is one or a few |m|: where m cancels, the fp32 rounding
                # of its terms is relative to the tensor's moment scale, not to that small |m|
                scale = float(sr[key].max())
                torch.testing.assert_close(so[key], sr[key], rtol=1e-5, atol=1e-6 * scale, msg=key)
            for key in QUANT_KEYS:  # re-sync the reference to the kernel
                sr[key].copy_(so[key])
            b.data.copy_(a.data)
    assert far == 0 and mismatched <= 1e-3 * total, (mismatched, far, total)


# ------------------------------------------------------------------ (b) row-split invariance
@pytest.mark.parametrize("shape", [(129, 300), (129, 600)])  # (129, 600): parallel CPU chunks
@pytest.mark.parametrize("name", ["adamw", "spam"])
def test_stepping_row_halves_equals_stepping_the_whole(name: str, shape: tuple[int, int]) -> None:
    """FSDP2 shards dim 0 at any row (129 = 65 + 64): stepping the two halves as two parameters
    must give exactly the whole's parameters, codes and absmax, row for row."""
    cls = CLASSES[name][0]
    kw = dict(STEP_KW[name], state_bits=8)
    whole = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(9)).bfloat16())
    halves = [torch.nn.Parameter(whole.detach()[:65].clone()), torch.nn.Parameter(whole.detach()[65:].clone())]
    opt_whole, opt_halves = cls([whole], **kw), cls(halves, **kw)
    for (g,) in gradient_stream([shape], 8, dtype=torch.bfloat16):
        whole.grad = g.clone()
        halves[0].grad, halves[1].grad = g[:65].clone(), g[65:].clone()
        opt_whole.step()
        opt_halves.step()
    rows = (slice(0, 65), slice(65, shape[0]))
    for part, half in zip(rows, halves):
        assert torch.equal(whole.detach()[part], half.detach())
        for key in QUANT_KEYS:
            assert torch.equal(opt_whole.state[whole][key][part], opt_halves.state[half][key]), key
    assert opt_whole.spike_stats()["clipped"] == opt_halves.spike_stats()["clipped"]


# ------------------------------------------------------------ (d) old flat state dicts
def _flatten_8bit_state(sd: dict[str, Any]) -> dict[str, Any]:
    """A state dict as the flat layout saved it, where the rows hold whole blocks: the same
    codes and absmax, flattened."""
    old = copy.deepcopy(sd)
    for st in old["state"].values():
        for key in QUANT_KEYS:
            st[key] = st[key].reshape(-1)
    return old


def _requantize_flat(sd: dict[str, Any]) -> dict[str, Any]:
    """A state dict as the flat layout saved it for any shape: the moments requantised in
    blocks over the flattened tensor (codes [numel], absmax [ceil(numel/256)])."""
    old = copy.deepcopy(sd)
    for st in old["state"].values():
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            values = F.dequantize_blockwise(st[f"{key}_codes"], st[f"{key}_absmax"], signed=signed)
            st[f"{key}_codes"], st[f"{key}_absmax"] = F.quantize_blockwise(values, signed=signed, flat=True)
    return old


def _round_trip(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", [sl.SPAM, sl.StableSPAM, sl.AdamW], ids=["spam", "stable", "adamw"])
def test_old_flat_state_loads_where_rows_hold_whole_blocks(cls: type) -> None:
    p = torch.nn.Parameter(torch.randn(64, 512).bfloat16())
    opt = cls([p], state_bits=8)
    stream = list(gradient_stream([p.shape], 8, dtype=torch.bfloat16))
    for (g,) in stream[:4]:
        p.grad = g
        opt.step()
    old = _round_trip(_flatten_8bit_state(opt.state_dict()))
    assert old["state"][0]["exp_avg_absmax"].shape == (num_blocks(p.numel()),)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = cls([q], state_bits=8)
    opt2.load_state_dict(old)
    for key in QUANT_KEYS:
        loaded = opt2.state[q][key]
        assert loaded.shape == opt.state[p][key].shape and loaded.is_contiguous(), key
        assert loaded.dtype == opt.state[p][key].dtype and torch.equal(loaded, opt.state[p][key]), key
    for (g,) in stream[4:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("shape", [(129, 300), (512, 1376)])
def test_old_flat_state_is_refused_where_rows_have_partial_blocks(shape: tuple[int, int]) -> None:
    p = torch.nn.Parameter(torch.randn(shape))
    opt = sl.AdamW([p], state_bits=8)
    p.grad = torch.randn(shape)
    opt.step()
    old = _requantize_flat(opt.state_dict())
    assert old["state"][0]["exp_avg_absmax"].shape == (num_blocks(p.numel()),)
    fresh = sl.AdamW([p], state_bits=8)
    with pytest.raises(
        ValueError, match=r"flat 8-bit block layout of an earlier.*shape \(" + f"{shape[0]}, {shape[1]}"
    ):
        fresh.load_state_dict(old)
    assert not fresh.state  # nothing was loaded
    fresh.load_state_dict(_round_trip(opt.state_dict()))  # the row layout itself loads
    assert torch.equal(fresh.state[p]["exp_avg_absmax"], opt.state[p]["exp_avg_absmax"])


def test_wrongly_shaped_absmax_is_refused() -> None:
    p = torch.nn.Parameter(torch.randn(130, 72))
    opt = sl.SPAM([p], state_bits=8)
    p.grad = torch.randn(130, 72)
    opt.step()
    bad = copy.deepcopy(opt.state_dict())
    bad["state"][0]["exp_avg_sq_absmax"] = torch.zeros(65, 2)
    with pytest.raises(ValueError, match=r"exp_avg_sq_absmax.*\[130, 1\]"):
        sl.SPAM([p], state_bits=8).load_state_dict(bad)


# --------------------------------------------------------------------- (e) empty shards
@pytest.mark.parametrize("cls", [sl.SPAM, sl.StableSPAM, sl.AdamW], ids=["spam", "stable", "adamw"])
def test_empty_row_shard_steps(cls: type) -> None:
    """An FSDP2 rank may hold 0 rows of a parameter: numel 0, absmax [0, blocks per row]."""
    empty = torch.nn.Parameter(torch.zeros(0, 300))
    other = torch.nn.Parameter(torch.randn(20, 300))
    opt = cls([empty, other], state_bits=8, min_8bit_size=0)
    for g0, g1 in gradient_stream([empty.shape, other.shape], 3):
        empty.grad, other.grad = g0, g1
        opt.step()
    st = opt.state[empty]
    assert st["exp_avg_codes"].shape == (0, 300) and st["exp_avg_absmax"].shape == (0, 2)
    assert torch.isfinite(other).all()
    q = [torch.nn.Parameter(empty.detach().clone()), torch.nn.Parameter(other.detach().clone())]
    opt2 = cls(q, state_bits=8, min_8bit_size=0)
    opt2.load_state_dict(_round_trip(opt.state_dict()))
    assert opt2.state[q[0]]["exp_avg_absmax"].shape == (0, 2)
    codes, absmax = F.quantize_blockwise(torch.zeros(0, 300))
    assert codes.shape == (0, 300) and absmax.shape == (0, 2)
    assert F.dequantize_blockwise(codes, absmax).shape == (0, 300)


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["adamw", "spam"])
def test_cuda_row_blocks_match_cpu(name: str) -> None:
    """The CUDA 8-bit shell takes the blocks whose start lies in its 64Ki chunk, as the CPU:
    (300, 700) rows cross chunk edges. Same element code on both, so codes agree within one."""
    cls = CLASSES[name][0]
    shapes = [(130, 72), (300, 700), (3, 4096), (0, 300)]
    results = []
    for device in ("cpu", "cuda"):
        params = [
            torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(2)).to(device)) for s in shapes
        ]
        opt = cls(params, state_bits=8, min_8bit_size=0, **STEP_KW[name])
        for grads in gradient_stream(shapes, 5):
            for p, g in zip(params, grads):
                p.grad = g.to(device)
            opt.step()
        results.append([(p.detach().cpu(), {k: opt.state[p][k].cpu() for k in QUANT_KEYS}) for p in params])
        x = torch.randn(300, 700, generator=torch.Generator().manual_seed(4)).to(device)
        results[-1].append((x.cpu(), dict(zip(("codes", "absmax"), (t.cpu() for t in F.quantize_blockwise(x))))))
    for (pc, sc), (pd, sd) in zip(*results):
        torch.testing.assert_close(pd, pc, rtol=1e-5, atol=1e-6)
        for key in sc:
            if key.endswith("codes"):
                assert (sd[key].int() - sc[key].int()).abs().max() <= 1 if sc[key].numel() else True, key
            else:
                torch.testing.assert_close(sd[key], sc[key], rtol=1e-6, atol=0)
