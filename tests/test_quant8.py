"""8-bit blockwise state: code maps, the quantiser against brute force, round-trip bounds,
the fused 8-bit steps against the reference, memory accounting and the state dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import spam_lowmem as sl
from spam_lowmem import functional as F
from spam_lowmem.qmap import (
    BLOCK_SIZE,
    SIMD_BASE,
    SIMD_BINADE_LOW,
    SIMD_MIDS,
    SIMD_VALUES,
    V_FLOOR,
    QuantMap,
    dynamic_map,
    quant_map,
)
from spam_lowmem.reference import ReferenceSPAM, ReferenceStableSPAM
from spam_lowmem.reference.moments import dequantize_blocks, quantize_blocks
from spam_lowmem.testing import gradient_stream, near_midpoint_blocks, straddling_blocks


def brute_force_codes(normalized: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """argmin |x - map| in float64; on an exact tie the larger code wins."""
    d = (normalized.double()[:, None] - values.double()[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    idx = torch.arange(values.numel()).expand_as(d)
    return torch.where(d == best, idx, -1).amax(dim=1).to(torch.uint8)


@pytest.mark.parametrize("signed", [True, False])
def test_maps_shape_and_bitsandbytes_numerics(signed: bool) -> None:
    values = dynamic_map(signed)
    assert values.numel() == 256 and torch.all(values[1:] > values[:-1])  # distinct, sorted
    assert values.max() == 1.0
    # the signed (m) map holds 0; the unsigned (v) map has the floor V_FLOOR in its place
    assert int((values == 0).sum()) == (1 if signed else 0)
    if not signed:
        assert float(values.min()) == pytest.approx(V_FLOOR, rel=1e-6)
    assert int((values < 0).sum()) == (127 if signed else 0)
    # golden entries: the smallest magnitude above the floor and the top of the first decade
    above = values[values > (0.0 if signed else V_FLOOR)]
    assert float(above.min()) == pytest.approx(5.5e-7 if signed else 3.25e-7, rel=1e-6)
    bnb = pytest.importorskip("bitsandbytes.functional")
    expected = bnb.create_dynamic_map(signed=signed).float()
    if not signed:
        expected[0] = V_FLOOR  # bitsandbytes' v map holds 0 there
    assert torch.equal(values, expected)


def test_second_moment_never_reads_back_as_zero() -> None:
    """The blocker of issue 14: a v far below its block's absmax must not quantise to 0 (the
    step would become lr * m / eps). Brute force: every positive v of a block whose range spans
    1e-30 .. 1 reads back positive and at least V_FLOOR * absmax."""
    x = torch.logspace(-30, 0, 256)
    codes, absmax = quantize_blocks(x, signed=False)
    back = dequantize_blocks(codes, absmax, signed=False)
    assert bool((back > 0).all())
    assert float(back.min()) == pytest.approx(V_FLOOR * float(absmax[0]), rel=1e-6)
    # the core agrees with the reference
    core_codes, core_absmax = F.quantize_blockwise(x, signed=False)
    assert torch.equal(core_codes, codes) and torch.equal(core_absmax, absmax)
    # a fresh block (absmax 0) still reads back as exact zeros
    zero = dequantize_blocks(torch.zeros(256, dtype=torch.uint8), torch.zeros(1), signed=False)
    assert bool((zero == 0).all())


@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_matches_brute_force(signed: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=gen) * torch.logspace(-8, 0, 20_000)
    if not signed:
        x = x.abs()
    x[::97] = 0.0
    codes, absmax = F.quantize_blockwise(x, signed=signed)
    normalized = x / absmax.repeat_interleave(BLOCK_SIZE)[: x.numel()]
    assert torch.equal(codes, brute_force_codes(normalized, quant_map(signed).values))


@pytest.mark.parametrize("signed", [True, False])
def test_ties_go_to_the_larger_code_and_every_bucket_edge(signed: bool) -> None:
    q = quant_map(signed)
    mids = q.midpoints[:-1]
    # exact midpoints (ties) and their float neighbours, bucket edges, and the extremes
    edges = torch.arange(0, 24 * 256 + 1, dtype=torch.int64) + ((127 - 24) << 8)
    edge_vals = (edges << 15).to(torch.int32).view(torch.float32)
    # powers of two 2^-40 .. 1 and their neighbours: the binade edges of the SIMD buckets
    powers = torch.tensor([2.0**-k for k in range(41)])
    powers = torch.cat([powers, torch.nextafter(powers, torch.tensor(2.0)), torch.nextafter(powers, torch.tensor(0.0))])
    probes = torch.cat(
        [
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-2.0)),
            edge_vals,
            -edge_vals,
            powers,
            -powers,
            torch.tensor([0.0, -0.0, 1.0, -1.0]),
        ]
    )
    probes = probes[(probes >= (-1.0 if signed else 0.0)) & (probes <= 1.0)]
    # put each probe in its own block next to a 1.0 so that absmax = 1 and x/absmax = x
    blocks = torch.zeros(probes.numel(), BLOCK_SIZE)
    blocks[:, 0], blocks[:, 1] = 1.0, probes
    codes, _ = F.quantize_blockwise(blocks.flatten(), signed=signed)
    got = codes.view(-1, BLOCK_SIZE)[:, 1]
    assert torch.equal(got, q.quantize_reference(probes))
    on_mid = torch.isin(probes, mids)
    assert torch.equal(got[on_mid].long(), torch.searchsorted(mids, probes[on_mid], right=True))


def _simd_codes(q: QuantMap, x: torch.Tensor) -> torch.Tensor:
    """The AVX-512 VBMI kernels' lookup (cpp/spam/isa/quant8_vbmi.h) written in torch over
    the same tables: bucket from the top 16 bits of |x| and the binade tables, code = base +
    (midpoints[base] <= x)."""
    t = q.simd
    shifts, deltas = t[:64].view(torch.int16).long(), t[64:128].view(torch.int16).long()
    negative_or = int(t[128:130].view(torch.int16))
    base = t[SIMD_BASE : SIMD_BASE + 512].long()
    planes = t[SIMD_MIDS : SIMD_MIDS + 1024].view(4, 256).t().contiguous()
    mids = planes.view(torch.float32).flatten()
    bits = x.view(torch.int32).long() & 0xFFFFFFFF
    top16 = (bits & 0x7FFFFFFF) >> 16
    e = (top16 >> 7).clamp(SIMD_BINADE_LOW, 127) & 31
    bucket = (top16 >> shifts[e]) + deltas[e]
    negative = (bits >> 31) == 1
    bucket = torch.where(negative, bucket | negative_or, bucket)
    b = base[bucket]
    return (b + (mids[b] <= x).long()).to(torch.uint8)


@pytest.mark.parametrize("signed", [True, False])
def test_simd_tables_give_the_nearest_code(signed: bool) -> None:
    """The byte tables qmap builds for the VBMI kernels, checked on every CPU (the kernels
    themselves only run where VBMI exists; test_cpu_isa.py compares them with the others)."""
    q = quant_map(signed)
    mids = q.midpoints[:-1]
    gen = torch.Generator().manual_seed(1)
    powers = torch.tensor([2.0**-k for k in range(150)])
    bits = torch.randint(0, 2**31, (100_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    probes = torch.cat(
        [
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-2.0)),
            q.values,
            powers,
            torch.nextafter(powers, torch.tensor(2.0)),
            torch.nextafter(powers, torch.tensor(0.0)),
            torch.rand(100_000, generator=gen),
            torch.rand(100_000, generator=gen) ** 12,
            bits.view(torch.float32).abs(),
        ]
    )
    # |x| > 1 too: a block whose absmax is NaN is divided by 1 (quant_divisor)
    probes = torch.cat([probes[probes <= 1.0], torch.tensor([2.5, 1e30, float("inf")])])
    probes = torch.cat([probes, -probes, torch.tensor([0.0, -0.0])])
    assert torch.equal(_simd_codes(q, probes), q.quantize_reference(probes))
    # NaN, as quantize_code: +NaN in the bucket of 1.0, -NaN in that of -1.0
    nan = torch.tensor([float("nan")])
    got = _simd_codes(q, torch.cat([nan, -nan]))
    assert got.tolist() == [255, 0]
    # the dequantisation planes hold the map itself
    value_planes = q.simd[SIMD_VALUES : SIMD_VALUES + 1024].view(4, 256).t().contiguous()
    assert torch.equal(value_planes.view(torch.float32).flatten(), q.values)


@pytest.mark.parametrize("signed", [True, False])
def test_codes_near_midpoints_for_any_absmax_are_those_of_the_quotient(signed: bool) -> None:
    """The VBMI kernels multiply by 1 / absmax and divide only near a decision: blocks with
    awkward absmax and values within 8 float steps of absmax * every midpoint, and values whose
    product and quotient straddle a midpoint, must get the codes of x / absmax (here on the
    best build; test_cpu_isa.py compares every build with the scalar one on the same blocks)."""
    x = torch.cat([near_midpoint_blocks(signed), straddling_blocks(signed)])
    absmax = x.view(-1, BLOCK_SIZE).abs().amax(dim=1)
    codes, got_absmax = F.quantize_blockwise(x, signed=signed)
    assert torch.equal(got_absmax, absmax)
    assert torch.equal(codes, quant_map(signed).quantize_reference(x / absmax.repeat_interleave(BLOCK_SIZE)))


def test_simd_edge_margins_are_checked() -> None:
    """The assertion the multiply-then-verify quantiser relies on fires on bad buckets."""
    from spam_lowmem.qmap import _check_edge_margins

    mids = quant_map(False).midpoints[199:202]
    b = mids.view(torch.int32).to(torch.int64)
    lower, m = int(b[0]), int(b[1])
    _check_edge_margins(mids, torch.tensor([0, lower - 5, m - 30, m + 100_000]))  # clear: fine
    with pytest.raises(AssertionError, match="close above"):  # m 3 steps above an edge, b[0] below
        _check_edge_margins(mids, torch.tensor([0, lower - 5, m - 3, m + 100_000]))
    with pytest.raises(AssertionError, match="below the upper edge"):
        _check_edge_margins(mids, torch.tensor([0, lower - 5, m + 5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_bound(dtype: torch.dtype) -> None:
    x = (torch.randn(10_000) * 3).to(dtype)
    codes, absmax = F.quantize_blockwise(x, signed=True)
    back = F.dequantize_blockwise(codes, absmax, signed=True)
    scale = absmax.repeat_interleave(BLOCK_SIZE)[: x.numel()]
    values = quant_map(True).values
    # the error is at most half the widest gap, or the distance from -1 to the most negative
    # code (the signed map has no -1.0), relative to the block's absmax
    bound = max(0.5 * float(torch.diff(values).max()), 1.0 + float(values.min()))
    err = (back - x.float()).abs()
    assert torch.all(err <= bound * scale * 1.001 + 1e-12)
    # and the reference quantiser agrees code for code
    ref_codes, ref_absmax = quantize_blocks(x.float(), True)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


def test_quantize_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="float32"):
        F.quantize_blockwise(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="absmax"):
        F.dequantize_blockwise(torch.zeros(300, dtype=torch.uint8), torch.zeros(1))


PAIRS = {
    "spam": (sl.SPAM, ReferenceSPAM, dict(lr=1e-2, threshold=20.0, reset_interval=40, warmup_steps=6, clip_delay=4)),
    "stable": (sl.StableSPAM, ReferenceStableSPAM, dict(lr=1e-2, reset_interval=40, total_steps=100)),
}
SHAPES = [(4096,), (5000,), (65, 257), (300,)]  # 300 < min_8bit_size: a dense fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_lockstep_against_reference(name: str, dtype: torch.dtype) -> None:
    """100 steps; before each step the reference takes the kernel's state and parameters, so
    each comparison measures one step's error (no drift)."""
    cls, ref_cls, kw = PAIRS[name]
    gen = torch.Generator().manual_seed(3)
    ours_p = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours, ref = cls(ours_p, state_bits=8, **kw), ref_cls(ref_p, state_bits=8, **kw)
    total = mismatched = far = 0
    for grads in gradient_stream(SHAPES, 100, dtype=dtype):
        for a, b, g in zip(ours_p, ref_p, grads):
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p):
            so, sr = ours.state[a], ref.state[b]
            if "exp_avg_codes" not in so:
                continue
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                d = (so[key].int() - sr[key].int()).abs()
                total += d.numel()
                mismatched += int((d > 0).sum())
                far += int((d > 1).sum())
            # rows of 257 end in a 1-element block, whose absmax is one |m|: where m cancels, fp32
            # rounding of its terms (FMA contraction in the kernel) is relative to the tensor's
            # moment scale, not to that small |m|
            scale = float(sr["exp_avg_absmax"].max())
            torch.testing.assert_close(so["exp_avg_absmax"], sr["exp_avg_absmax"], rtol=1e-5, atol=1e-6 * scale)
            for key in sr:  # re-sync the reference to the kernel
                if isinstance(sr[key], torch.Tensor):
                    sr[key].copy_(so[key])
            b.data.copy_(a.data)
    assert far == 0 and mismatched <= 1e-3 * total, (mismatched, far, total)
    assert ours.memory_report()["fallbacks"] == [3]


def train_tiny(state_bits: int, cls: type = sl.SPAM, steps: int = 150) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    teacher = torch.nn.Linear(64, 64)
    opt = cls(model.parameters(), lr=3e-3, state_bits=state_bits, min_8bit_size=1024)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 64, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), teacher(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


@pytest.mark.parametrize("cls", [sl.SPAM, sl.StableSPAM, sl.AdamW], ids=["spam", "stable", "adamw"])
def test_tiny_model_8bit_within_2_percent_of_32bit(cls: type) -> None:
    full, low = train_tiny(32, cls), train_tiny(8, cls)
    first = train_tiny(32, cls, steps=1)
    assert full < 0.5 * first  # it learned
    assert abs(low - full) <= 0.02 * full, (low, full)


def test_state_bytes_are_exact() -> None:
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(512, 1376), (4097,), (100,)]]
    opt = sl.SPAM(params, state_bits=8)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    report = opt.memory_report()
    blocks = lambda n: (n + 255) // 256  # noqa: E731
    # the matrix's blocks restart at each of its 512 rows: 6 a row (5 of 256 and one of 96)
    expected = 2 * 512 * 1376 + 2 * 4 * 512 * blocks(1376) + 2 * 4097 + 2 * 4 * blocks(4097) + 2 * 4 * 100
    assert report["total_bytes"] == expected
    assert report["fallbacks"] == [2]
    assert [e["state_bits"] for e in report["params"]] == [8, 8, 32]
    assert (
        sum(
            v.numel() * v.element_size()
            for st in opt.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )
        == expected
    )


@pytest.mark.parametrize("cls", [sl.SPAM, sl.StableSPAM, sl.AdamW], ids=["spam", "stable", "adamw"])
def test_8bit_state_dict_resume_bit_identical_and_fp32_absmax(cls: type) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 80).bfloat16())
    opt = cls([p], state_bits=8)
    stream = list(gradient_stream([p.shape], 12, dtype=torch.bfloat16))
    for g in stream[:6]:
        p.grad = g[0]
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = cls([q], state_bits=8)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[q]["exp_avg_absmax"].dtype == torch.float32
    assert torch.equal(opt2.state[q]["exp_avg_absmax"], opt.state[p]["exp_avg_absmax"])
    for g in stream[6:]:
        p.grad, q.grad = g[0].clone(), g[0].clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q)


def test_bad_8bit_state_dicts_are_rejected() -> None:
    p = torch.nn.Parameter(torch.randn(5000))
    opt = sl.SPAM([p], state_bits=8)
    p.grad = torch.randn(5000)
    opt.step()
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    bad["state"][0]["exp_avg_absmax"] = torch.zeros(3)
    with pytest.raises(ValueError, match="blocks"):
        sl.SPAM([p], state_bits=8).load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["layout_version"] = 99
    with pytest.raises(ValueError, match="layout version"):
        sl.SPAM([p], state_bits=8).load_state_dict(bad)
    with pytest.raises(ValueError, match="state_bits"):
        sl.SPAM([p], state_bits=4)


def test_nonfinite_gradient_does_not_poison_the_block() -> None:
    p = torch.nn.Parameter(torch.randn(4096))
    opt = sl.StableSPAM([p], state_bits=8)
    for _ in range(3):
        p.grad = torch.randn(4096)
        opt.step()
    g = torch.randn(4096)
    g[10] = float("nan")
    p.grad = g
    opt.step()
    st = opt.state[p]
    assert torch.isfinite(st["exp_avg_absmax"]).all() and torch.isfinite(p).all()
    assert opt.spike_stats()["nonfinite"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_nan_code_does_not_depend_on_its_sign(dtype: torch.dtype) -> None:
    """A NaN of either sign gets code 255, where the reference's searchsorted puts NaN (a NaN's
    sign bit is not portable: x86 makes inf / inf a negative NaN, CUDA a positive one). A block
    with an infinite absmax quantises as in the reference: its infinities as +-1 (codes 255 and
    0: they keep their sign), its finite entries to the zero code."""
    x = torch.randn(4 * BLOCK_SIZE)
    x[3], x[4] = float("nan"), -float("nan")  # block 0: NaN absmax
    x[BLOCK_SIZE + 5], x[BLOCK_SIZE + 6] = float("inf"), -float("inf")  # block 1: inf absmax
    x[2 * BLOCK_SIZE + 7] = -float("inf")  # block 2: inf absmax from -inf alone
    x = x.to(dtype)
    assert x[4].view(torch.int16 if dtype == torch.float16 else torch.int32) < 0  # a negative NaN
    for signed in (True, False):
        codes, absmax = F.quantize_blockwise(x, signed=signed)
        ref_codes, ref_absmax = quantize_blocks(x.float(), signed)
        assert codes[3] == codes[4] == 255
        assert absmax[0].isnan()
        # Block 0's other codes are moot (every value dequantises to NaN); the reference zeroes them.
        assert torch.equal(codes[BLOCK_SIZE:], ref_codes[BLOCK_SIZE:])
        assert torch.equal(absmax[1:], ref_absmax[1:])
        back = F.dequantize_blockwise(codes, absmax, signed=signed)
        assert back[BLOCK_SIZE + 5] == float("inf")
        # a finite neighbour: 0 * inf = NaN on the signed map; V_FLOOR * inf = inf on the v map
        assert back[BLOCK_SIZE + 1].isnan() if signed else back[BLOCK_SIZE + 1] == float("inf")
        if signed:  # the unsigned map holds no negative value: there -inf reads back as NaN
            assert back[BLOCK_SIZE + 6] == -float("inf")


def test_infinite_moments_under_propagate_match_the_reference() -> None:
    """An infinite gradient under nonfinite="propagate" makes its blocks' absmax inf; the kernel
    must store the codes the reference stores, and the infinite moments keep their sign (the
    kernel once stored code 0 for +inf, which reads back as -inf)."""
    shape = (4096,)
    gen = torch.Generator().manual_seed(11)
    ours_p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    ref_p = torch.nn.Parameter(ours_p.detach().clone())
    kw = dict(lr=1e-3, state_bits=8, nonfinite="propagate", spike_clipping=False)
    ours, ref = sl.SPAM([ours_p], **kw), ReferenceSPAM([ref_p], **kw)
    for step in range(3):
        g = torch.randn(shape, generator=gen)
        if step == 2:
            g[5], g[9], g[300] = float("inf"), -float("inf"), float("inf")
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        so, sr = ours.state[ours_p], ref.state[ref_p]
        for key in ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax"):
            if step == 2:  # the two infinite blocks, exactly (finite ones may differ by a rounding)
                n = 2 * BLOCK_SIZE if key.endswith("codes") else 2
                assert torch.equal(so[key][:n], sr[key][:n]), key
            sr[key].copy_(so[key])  # re-sync to the kernel
        ref_p.data.copy_(ours_p.data)
    assert so["exp_avg_absmax"][0] == float("inf") and so["exp_avg_codes"][[5, 9, 300]].tolist() == [255, 0, 255]
    assert so["exp_avg_sq_codes"][[5, 9, 300]].tolist() == [255] * 3
    stats = ours.spike_stats()
    assert stats["nonfinite"] == 3
    assert stats["nonfinite_state_blocks"] == 4  # m and v of blocks 0 and 1


def test_an_overflowing_moment_is_announced() -> None:
    """A finite gradient whose square overflows makes v inf: its block's other entries then read
    back as NaN (0 * inf). nonfinite counts only non-finite gradients; the state snapshot
    nonfinite_state_blocks reports the block."""
    p = torch.nn.Parameter(torch.randn(3 * BLOCK_SIZE * 16))
    opt = sl.AdamW([p], lr=1e-3, state_bits=8)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.spike_stats()["nonfinite_state_blocks"] == 0
    g = torch.randn_like(p)
    g[BLOCK_SIZE + 3] = 3e19  # finite; g * g = inf in fp32
    p.grad = g
    opt.step()
    stats = opt.spike_stats()
    assert stats["nonfinite"] == 0 and stats["nonfinite_state_blocks"] == 1
    assert stats["groups"][0]["nonfinite_state_blocks"] == 1
    absmax = opt.state[p]["exp_avg_sq_absmax"]
    assert absmax[1] == float("inf") and torch.isfinite(torch.cat([absmax[:1], absmax[2:]])).all()


def test_adamw_32bit_matches_torch() -> None:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in [(300, 7), (5000,)]]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    ours = sl.AdamW(a, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    for grads in gradient_stream([x.shape for x in a], 30):
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
