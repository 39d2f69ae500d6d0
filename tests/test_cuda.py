"""The CUDA core (spam_lowmem._C_cuda) against the CPU core (spam_lowmem._C).

Both modules are called with identical arguments on identical inputs (the CUDA inputs are
copies of the CPU ones). Both run the element math of cpp/spam/math.h without FMA
contraction, so SPAM and AdamW agree bit for bit and Stable-SPAM differs only through how its
reductions are ordered and accumulated. Tolerances: fp32 rtol 1e-5 / atol 1e-6; bf16 and fp16
within one ulp of the storage dtype, except next to zero: a moment that cancels to ~1e-9
can sit many (tiny) ulps apart after a 1e-7 relative change of ||g||, so there the fp32 atol
(1e-6) applies instead. Telemetry counters must be equal.

8-bit moments (uint8 codes + one float32 absmax per 256 elements): absmax within rtol 1e-6,
codes equal for >= 99.9% of the elements of a call and never more than one code apart, in
blocks whose absmax is finite. A NaN block (the "propagate" policy) must be NaN on both
sides; its codes are not compared, as they depend on the sign bit of the NaN the hardware
produced, and every one of them dequantises to NaN.

Every test needs a CUDA GPU and the compiled CUDA module; otherwise the module is skipped.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from spam_lowmem import functional as F
from spam_lowmem.qmap import BLOCK_SIZE, quant_map


def _load_modules():
    if not torch.cuda.is_available():
        return None, None, "torch.cuda.is_available() is False"
    try:
        from spam_lowmem import _C, _C_cuda
    except ImportError as exc:  # built without nvcc, or the CPU-only wheel
        return None, None, f"spam_lowmem._C_cuda cannot be imported: {exc}"
    return _C, _C_cuda, ""


_C, _C_cuda, _SKIP_REASON = _load_modules()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_C_cuda is None, reason=_SKIP_REASON)]

DEVICE = "cuda"
SIZES = (1, 7, 255, 4097, 65537)  # 65537 spans two 64Ki-element chunks
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SPAM_KW = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay_scale=1e-4)
GAMMA1, GAMMA2, GAMMA3, SC = 0.7, 0.9, 0.999, 0.8
ADAM_KW = dict(beta1=0.9 * SC, beta2=0.999, eps=1e-8, weight_keep=1 - 1e-3 * 0.01)
STAT_KW = dict(gamma1=GAMMA1 * SC, gamma2=GAMMA2, gamma3=GAMMA3)
STATS_CLIPPING = (0.05, 0.5, 0.3)  # M small: M_hat ~ 0.08 < max|g| of the larger tensors
STATS_QUIET = (10.0, 0.5, 0.3)  # M_hat ~ 16: AdaClip does not fire
ALGOS = ("spam", "stable", "adamw")
# Stable-SPAM's m and v scale with 1/||g|| and 1/||g||^2. The CPU sums g^2 in fp32 blocks of
# 1024 folded into a double, the GPU in double throughout, so ||g|| agrees to ~1e-6 relative and
# the 8-bit v absmax to ~2e-6: the fp32 rtol of the dense moments (1e-5) applies there.
STABLE_ABSMAX_RTOL = 1e-5


# ---------------------------------------------------------------------------- inputs
def _per_tensor(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _make_group(sizes, dtypes, seed, *, spikes=False, nonfinite=False, q8=False):
    """Per tensor [p, g, m, v, absmax_m, absmax_v] on the CPU. dtypes and q8 (8-bit moments)
    are one value or one per tensor. Dense tensors get empty absmax; 8-bit ones get codes in
    m and v (the quantised moments, with an all-zero "fresh" first block when n >= 512)."""
    dtypes, q8 = _per_tensor(dtypes, len(sizes)), _per_tensor(q8, len(sizes))
    gen = torch.Generator().manual_seed(seed)
    group = []
    for n, dtype, bits8 in zip(sizes, dtypes, q8):
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 0.1
        m = torch.randn(n, generator=gen) * 0.01
        v = torch.rand(n, generator=gen) * 1e-3 + 1e-4
        if spikes and n > 0:
            g[:: max(1, n // 5)] *= 100.0
        if nonfinite and n >= 3:
            g[n // 2] = float("nan")
            g[n - 1] = float("inf") if n % 2 else -float("inf")
        p, g = p.to(dtype), g.to(dtype)
        if bits8:
            if n >= 512:
                m[:BLOCK_SIZE], v[:BLOCK_SIZE] = 0.0, 0.0
            (mc, am), (vc, av) = F.quantize_blockwise(m, signed=True), F.quantize_blockwise(v, signed=False)
            group.append([p, g, mc, vc, am, av])
        else:
            empty = torch.empty(0, dtype=torch.float32)
            group.append([p, g, m.to(dtype), v.to(dtype), empty, empty.clone()])
    return group


def _to_device(group):
    return [[t.to(DEVICE, copy=True) for t in tensors] for tensors in group]


def _columns(group):
    """params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v as lists of tensors."""
    return [[tensors[k].detach() for tensors in group] for k in range(6)]


def _maps(device):
    return [[q.values, q.midpoints, q.buckets, q.simd] for q in (quant_map(True, device), quant_map(False, device))]


def _batch(module, cols, cnt, maps, stream=0):
    """The core's StepBatch of `module` (_C or _C_cuda) for these columns."""
    return module.StepBatch(*cols, cnt, *maps, stream=stream)


def _stats(module, stats, bcs):
    return module.StableStats(stats, bcs[0::3], bcs[1::3], bcs[2::3])


def _stream():
    return torch.cuda.current_stream().cuda_stream


# ------------------------------------------------------------------------- comparison
def _ordinal16(t):
    """Position of each 16-bit float on the number line (adjacent values differ by 1)."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _assert_close(actual, expected, what):
    actual = actual.detach().cpu()
    assert actual.dtype == expected.dtype, what
    if expected.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN positions differ"
    ulps = (_ordinal16(actual) - _ordinal16(expected)).abs()
    near_zero = (actual.float() - expected.float()).abs() <= 1e-6
    bad = (ulps > 1) & ~near_zero & ~nan
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} entries more than 1 ulp apart, e.g. "
            f"[{i}] {float(actual[i])} vs {float(expected[i])}"
        )


def _code_diffs(codes, expected_codes, absmax, expected_absmax, what, rtol=1e-6):
    """Checks absmax; returns |code difference| over the elements of finite blocks."""
    absmax = absmax.detach().cpu()
    torch.testing.assert_close(
        absmax, expected_absmax, rtol=rtol, atol=1e-30, equal_nan=True, msg=lambda m: f"{what} absmax: {m}"
    )
    finite = expected_absmax.isfinite().repeat_interleave(BLOCK_SIZE)[: expected_codes.numel()]
    diff = (codes.detach().cpu().int() - expected_codes.int()).abs()[finite]
    assert diff.numel() == 0 or int(diff.max()) <= 1, f"{what}: codes more than one apart"
    return diff


def _assert_codes_close(diffs, what):
    diff = torch.cat([d.flatten() for d in diffs]) if diffs else torch.zeros(0)
    frac = float((diff != 0).float().mean()) if diff.numel() else 0.0
    assert frac <= 1e-3, f"{what}: {frac:.2%} of the codes differ (allowed 0.1%)"


def _assert_group_close(dev_group, cpu_group, label, absmax_rtol=1e-6):
    diffs = []
    for i, (dev, cpu) in enumerate(zip(dev_group, cpu_group)):
        what = f"{label}: tensor {i} (numel {cpu[0].numel()})"
        _assert_close(dev[0], cpu[0], f"{what} param")
        _assert_close(dev[1], cpu[1], f"{what} grad")
        if cpu[2].dtype == torch.uint8:
            diffs.append(_code_diffs(dev[2], cpu[2], dev[4], cpu[4], f"{what} m", absmax_rtol))
            diffs.append(_code_diffs(dev[3], cpu[3], dev[5], cpu[5], f"{what} v", absmax_rtol))
        else:
            _assert_close(dev[2], cpu[2], f"{what} exp_avg")
            _assert_close(dev[3], cpu[3], f"{what} exp_avg_sq")
    _assert_codes_close(diffs, label)


# ---------------------------------------------------------------------------- runners
def _stable_lists(n):
    ks = [1000 + 37 * i for i in range(n)]  # per-tensor step counts -> per-tensor corrections
    bcs = []
    for k in ks:
        bcs += [1 - (GAMMA1 * SC) ** k, 1 - GAMMA2**k, 1 - GAMMA3**k]
    step_sizes = [1e-3 / (1 - (0.9 * SC) ** k) for k in ks]
    sqrt_bc2s = [math.sqrt(1 - 0.999**k) for k in ks]
    return bcs, step_sizes, sqrt_bc2s


def _call(module, algo, group, stats, cnt, opts, stream=0):
    """One step of `algo` through `module` (_C or _C_cuda) with the arguments of the test."""
    n = len(group)
    batch = _batch(module, _columns(group), cnt.detach(), _maps(cnt.device), stream)
    bcs, step_sizes, sqrt_bc2s = _stable_lists(n)
    if algo == "spam":
        hyper = module.SpamHyper(
            **SPAM_KW,
            clip_threshold=opts.get("clip", 50.0),
            reset=opts.get("reset", 0),
            skip_nonfinite=opts.get("skip", True),
        )
        module.step(batch, hyper, [1e-3 * (1.0 + 0.1 * i) for i in range(n)])
    elif algo == "stable":
        hyper = module.AdamHyper(**ADAM_KW, reset=opts.get("reset", 0), skip_nonfinite=opts.get("skip", True))
        scratch = None
        if module is _C_cuda:
            nbytes = _C_cuda.stable_spam_scratch_bytes([ts[0].numel() for ts in group])
            scratch = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
        module.step(
            batch,
            hyper,
            module.StatHyper(**STAT_KW),
            _stats(module, [s.detach() for s in stats], bcs),
            step_sizes,
            sqrt_bc2s,
            scratch,
        )
    else:
        scalars = {"step_sizes": step_sizes, "sqrt_bc2s": sqrt_bc2s}
        module.step(batch, "adamw", ADAM_KW, scalars, opts.get("skip", True))


def _run(algo, group, *, stream=None, before_launch=None, stats_init=STATS_CLIPPING, **opts):
    """Steps copies of `group` on the CPU and the device; asserts they agree. Returns the
    counts the step added ([clipped, nonfinite])."""
    cpu, dev = [[t.clone() for t in ts] for ts in group], _to_device(group)
    stats_cpu = [torch.tensor(stats_init, dtype=torch.float32) for _ in group]
    stats_dev = [s.to(DEVICE, copy=True) for s in stats_cpu]
    # Both start from nonzero counts: the kernels must add, not overwrite.
    cnt_cpu = torch.tensor([5, 7], dtype=torch.int64)
    cnt_dev = cnt_cpu.to(DEVICE, copy=True)
    _call(_C, algo, cpu, stats_cpu, cnt_cpu, opts)
    if before_launch is not None:
        before_launch(dev)
    _call(_C_cuda, algo, dev, stats_dev, cnt_dev, opts, stream=_stream() if stream is None else stream.cuda_stream)
    torch.cuda.synchronize()
    _assert_group_close(dev, cpu, f"{algo} {opts}", STABLE_ABSMAX_RTOL if algo == "stable" else 1e-6)
    if algo == "stable":
        for i, (a, e) in enumerate(zip(stats_dev, stats_cpu)):
            _assert_close(a, e, f"stable: grad_stats of tensor {i}")
    assert cnt_dev.cpu().tolist() == cnt_cpu.tolist()
    return [c - c0 for c, c0 in zip(cnt_cpu.tolist(), (5, 7))]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("q8", [False, True], ids=["dense", "8bit"])
@pytest.mark.parametrize("reset", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spam_matches_cpu(dtype, reset, q8):
    counts = _run("spam", _make_group(SIZES, dtype, seed=1, spikes=True, q8=q8), reset=reset)
    if reset != 1:
        assert counts[0] > 0, "the spike clip should fire"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spam_without_clipping(dtype):
    counts = _run("spam", _make_group(SIZES, dtype, seed=2, q8=[False, True] * 3), clip=0.0)
    assert counts == [0, 0]


@pytest.mark.parametrize("q8", [False, True], ids=["dense", "8bit"])
@pytest.mark.parametrize("reset", [0, 1, 2])
@pytest.mark.parametrize("stats_init", [STATS_CLIPPING, STATS_QUIET], ids=["clips", "quiet"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stable_spam_matches_cpu(dtype, stats_init, reset, q8):
    group = _make_group(SIZES, dtype, seed=3, q8=q8)
    counts = _run("stable", group, reset=reset, stats_init=stats_init)
    assert (counts[0] > 0) == (stats_init is STATS_CLIPPING), "AdaClip fires iff M is small"


@pytest.mark.parametrize("q8", [False, True], ids=["dense", "8bit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adamw_matches_cpu(dtype, q8):
    assert _run("adamw", _make_group(SIZES, dtype, seed=13, spikes=True, q8=q8)) == [0, 0]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("q8", [False, True], ids=["dense", "8bit"])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_entries(dtype, skip, q8, algo):
    group = _make_group(SIZES, dtype, seed=4, nonfinite=True, q8=q8)
    counts = _run(algo, group, skip=skip)
    assert counts[1] == sum(2 for n in SIZES if n >= 3)


@pytest.mark.parametrize("algo", ALGOS)
def test_mixed_dtypes_and_moment_kinds_in_one_call(algo):
    sizes = [65537, 0, 4097, 255, 7, 1, 3000, 70000, 513, 256, 9000, 512]
    dtypes = [DTYPES[i % 3] for i in range(len(sizes))]
    q8 = [i % 4 in (1, 2) for i in range(len(sizes))]  # every dtype with both kinds
    _run(algo, _make_group(sizes, dtypes, seed=5, spikes=(algo == "spam"), q8=q8))


@pytest.mark.parametrize("algo", ALGOS)
def test_more_than_200_tensors(algo):
    # Far more tensors than fit one launch's argument table: several launches per phase.
    gen = torch.Generator().manual_seed(6)
    sizes = [int(x) for x in torch.randint(1, 3000, (230,), generator=gen)]
    sizes[17] = 70000  # one multi-chunk tensor in the middle
    dtypes = [DTYPES[i % 3] for i in range(len(sizes))]
    q8 = [i % 2 == 1 for i in range(len(sizes))]
    _run(algo, _make_group(sizes, dtypes, seed=7, spikes=(algo == "spam"), q8=q8))


@pytest.mark.parametrize("q8", [False, True], ids=["dense", "8bit"])
@pytest.mark.parametrize("algo", ["spam", "stable"])
def test_tensor_split_across_launches(algo, q8):
    # 336 chunks of 64Ki elements > 320 table rows: the second tensor continues in a new launch.
    _run(algo, _make_group([11_000_000, 11_000_000, 5], torch.float32, seed=8, q8=q8))


def _restore_after_sleep(dev):
    """On the current stream: snapshot the inputs, sleep, write the snapshot back. A step
    enqueued on any other stream runs during the sleep and is then overwritten, so the result
    matches the CPU only if the step really runs on the stream it was given."""
    staged = [[t.clone() for t in ts] for ts in dev]
    torch.cuda._sleep(50_000_000)  # some tens of milliseconds of GPU time
    for ts, ss in zip(dev, staged):
        for t, s in zip(ts, ss):
            t.copy_(s)


@pytest.mark.skipif(not hasattr(torch.cuda, "_sleep"), reason="needs torch.cuda._sleep")
@pytest.mark.parametrize("algo", ALGOS)
def test_non_default_stream(algo):
    group = _make_group(SIZES, torch.bfloat16, seed=9, spikes=True, q8=[True, False] * 3)
    side = torch.cuda.Stream()  # torch's pool streams do not synchronise with the default one
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _run(algo, group, stream=side, before_launch=_restore_after_sleep)


def test_stable_spam_is_deterministic():
    group = _make_group(SIZES, torch.float32, seed=10, q8=[False, True] * 3)
    outs = []
    for _ in range(2):
        dev = _to_device(group)
        stats = [torch.tensor(STATS_CLIPPING, device=DEVICE) for _ in group]
        cnt = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        _call(_C_cuda, "stable", dev, stats, cnt, {}, stream=_stream())
        torch.cuda.synchronize()
        outs.append([t.cpu() for ts in dev for t in ts] + [s.cpu() for s in stats])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_dequantize_match_cpu(dtype, signed):
    gen = torch.Generator().manual_seed(14)
    for n in (0, 1, 255, 256, 257, 70_000, 1_500_001):  # 1.5M: more blocks than the capped grid
        x = torch.randn(n, generator=gen) * torch.logspace(-9, 1, n)
        x = (x if signed else x.abs()).to(dtype)
        x[BLOCK_SIZE : 2 * BLOCK_SIZE] = 0.0  # an all-zero block
        codes, absmax = F.quantize_blockwise(x, signed=signed)
        dev_codes, dev_absmax = F.quantize_blockwise(x.to(DEVICE), signed=signed)
        assert torch.equal(dev_codes.cpu(), codes) and torch.equal(dev_absmax.cpu(), absmax)
        for out_dtype in DTYPES:
            expected = F.dequantize_blockwise(codes, absmax, signed=signed, dtype=out_dtype)
            actual = F.dequantize_blockwise(dev_codes, dev_absmax, signed=signed, dtype=out_dtype)
            assert torch.equal(actual.cpu(), expected)


def test_quantize_nonfinite_block():
    x = torch.randn(1000)
    x[300], x[700] = float("nan"), float("inf")
    codes, absmax = F.quantize_blockwise(x)
    dev_codes, dev_absmax = F.quantize_blockwise(x.to(DEVICE))
    assert dev_absmax.cpu().isnan().tolist() == absmax.isnan().tolist() == [False, True, False, False]
    assert dev_absmax.cpu()[2] == absmax[2] == math.inf
    keep = torch.ones(1000, dtype=torch.bool)
    keep[256:768] = False  # NaN and inf blocks: codes depend on NaN sign bits and x / inf
    assert torch.equal(dev_codes.cpu()[keep], codes[keep])
    assert bool(F.dequantize_blockwise(dev_codes, dev_absmax)[256:512].isnan().all())


def _grads(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * 0.1 for s in shapes] for _ in range(steps)]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.device)
    opt.step()


@pytest.mark.parametrize("name", ["SPAM", "StableSPAM", "AdamW"])
def test_8bit_state_dict_moves_from_cpu_to_cuda(name):
    import spam_lowmem as sl

    cls = getattr(sl, name)
    shapes = [(64, 96), (4097,), (10,)]  # the last one stays dense (under min_8bit_size)
    kw = dict(lr=1e-3, state_bits=8, min_8bit_size=256)
    cpu_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    cpu_opt = cls(cpu_params, **kw)
    grads = _grads(shapes, 6, seed=15)
    for gs in grads[:3]:
        _step(cpu_opt, cpu_params, gs)
    dev_params = [torch.nn.Parameter(p.detach().to(DEVICE)) for p in cpu_params]
    dev_opt = cls(dev_params, **kw)
    dev_opt.load_state_dict(copy.deepcopy(cpu_opt.state_dict()))
    for gs in grads[3:]:
        _step(cpu_opt, cpu_params, gs)
        _step(dev_opt, dev_params, gs)
    diffs = []
    for i, (pc, pd) in enumerate(zip(cpu_params, dev_params)):
        _assert_close(pd.detach(), pc.detach(), f"{name} param {i}")
        sc, sd = cpu_opt.state[pc], dev_opt.state[pd]
        assert ("exp_avg_codes" in sd) == ("exp_avg_codes" in sc) == (i < 2)
        for key in ("exp_avg", "exp_avg_sq"):
            if i < 2:
                assert sd[f"{key}_codes"].is_cuda == (DEVICE == "cuda")
                diffs.append(
                    _code_diffs(
                        sd[f"{key}_codes"],
                        sc[f"{key}_codes"],
                        sd[f"{key}_absmax"],
                        sc[f"{key}_absmax"],
                        f"{name} {key}",
                        STABLE_ABSMAX_RTOL if name == "StableSPAM" else 1e-6,
                    )
                )
            else:
                _assert_close(sd[key], sc[key], f"{name} {key}")
    _assert_codes_close(diffs, name)


def test_scratch_bytes_and_argument_checks():
    assert _C_cuda.stable_spam_scratch_bytes([]) == 0
    small, big = (_C_cuda.stable_spam_scratch_bytes(s) for s in ([10], [10, 100000]))
    assert 0 < small < big
    group = _to_device(_make_group([100], torch.float32, seed=11))
    stats = [torch.zeros(3, device=DEVICE)]
    cnt = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    maps = _maps(DEVICE)
    too_small = torch.empty(small - 1, dtype=torch.uint8, device=DEVICE)
    bcs, step_sizes, sqrt_bc2s = _stable_lists(1)
    with pytest.raises(ValueError):
        _C_cuda.step(
            _batch(_C_cuda, _columns(group), cnt, maps, _stream()),
            _C_cuda.AdamHyper(**ADAM_KW, reset=0, skip_nonfinite=True),
            _C_cuda.StatHyper(**STAT_KW),
            _stats(_C_cuda, stats, bcs),
            step_sizes,
            sqrt_bc2s,
            too_small,
        )
    cpu_params = [group[0][0].cpu()]
    with pytest.raises(TypeError):  # a CPU tensor handed to the CUDA module
        _batch(_C_cuda, [cpu_params, *_columns(group)[1:]], cnt, maps)
    with pytest.raises(TypeError):  # counters must be int64
        _batch(_C_cuda, _columns(group), cnt.float(), maps)
    group8 = _to_device(_make_group([1000], torch.float32, seed=11, q8=True))
    with pytest.raises(TypeError):  # 8-bit moments need the maps on the device
        _batch(_C_cuda, _columns(group8), cnt, _maps("cpu"))
    cols = _columns(group8)
    cols[4] = [cols[4][0][:-1]]
    with pytest.raises(ValueError):  # one absmax per 256 elements
        _batch(_C_cuda, cols, cnt, maps)


# ------------------------------------------------------------------- sparse momentum (§3)
# The CUDA sparse step runs the CPU kernel's arithmetic on the same state (same hash subset,
# same compact order and 8-bit block format, no FMA contraction, exact max reductions), so
# parameters, compact moments, codes, absmax and counters must be identical, not just close.
SPARSE_SHAPES = [(64, 96), (33, 129), (300, 700), (5, 3)]  # (300, 700): ~200 compact blocks
SPARSE_KW = dict(
    lr=1e-2, threshold=20.0, reset_interval=10, warmup_steps=4, clip_delay=3, weight_decay=0.01, min_8bit_size=0
)
SPARSE_STATE_KEYS = (
    "exp_avg",
    "exp_avg_sq",
    "exp_avg_codes",
    "exp_avg_sq_codes",
    "exp_avg_absmax",
    "exp_avg_sq_absmax",
    "subset",
    "compact_block_starts",
)


def _sparse_pair(shapes, dtype, bits, decay, seed=5):
    import spam_lowmem as sl

    gen = torch.Generator().manual_seed(seed)
    cpu_params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    dev_params = [torch.nn.Parameter(p.detach().to(DEVICE, copy=True)) for p in cpu_params]
    kw = dict(SPARSE_KW, state_bits=bits, sparse_weight_decay=decay, subset_seed=seed)
    cpu_opt = sl.SPAM([{"params": cpu_params, "density": 0.25}], **kw)
    dev_opt = sl.SPAM([{"params": dev_params, "density": 0.25}], **kw)
    return cpu_params, cpu_opt, dev_params, dev_opt


def _assert_sparse_identical(cpu_params, cpu_opt, dev_params, dev_opt, what):
    for i, (pc, pd) in enumerate(zip(cpu_params, dev_params)):
        assert torch.equal(pd.detach().cpu(), pc.detach()), f"{what}: param {i} differs"
        sc, sd = cpu_opt.state[pc], dev_opt.state[pd]
        assert sd["step"] == sc["step"]
        for key in SPARSE_STATE_KEYS:
            assert (key in sd) == (key in sc), f"{what}: {key}"
            if key in sc:
                assert sd[key].is_cuda, f"{what}: {key} left the GPU"
                assert torch.equal(sd[key].cpu(), sc[key]), f"{what}: param {i} {key} differs"
    assert dev_opt.spike_stats() == cpu_opt.spike_stats(), what


@pytest.mark.parametrize(
    ("dtype", "bits", "decay"),
    [(torch.float32, 32, False), (torch.float32, 8, True), (torch.bfloat16, 32, True), (torch.float16, 8, False)],
    ids=["fp32-32", "fp32-8-wd", "bf16-32-wd", "fp16-8"],
)
def test_sparse_spam_matches_cpu_over_resets(dtype, bits, decay):
    from spam_lowmem.testing import gradient_stream

    cpu_params, cpu_opt, dev_params, dev_opt = _sparse_pair(SPARSE_SHAPES, dtype, bits, decay)
    grads = list(gradient_stream(SPARSE_SHAPES, 25, dtype=dtype, spike_every=4, seed=7))
    grads[12][1].view(-1)[:40] = float("nan")  # nonfinite entries: skipped and counted
    for step, gs in enumerate(grads):  # momentum resets (and new subsets) at calls 10 and 20
        _step(cpu_opt, cpu_params, gs)
        _step(dev_opt, dev_params, gs)
        _assert_sparse_identical(cpu_params, cpu_opt, dev_params, dev_opt, f"step {step + 1}")
    assert cpu_opt.spike_stats()["clipped"] > 0
    assert cpu_opt.spike_stats()["nonfinite"] > 0


@pytest.mark.parametrize("bits", [32, 8])
def test_sparse_state_dict_moves_from_cpu_to_cuda(bits):
    cpu_params, cpu_opt, dev_params, dev_opt = _sparse_pair(SPARSE_SHAPES, torch.float32, bits, False)
    grads = _grads(SPARSE_SHAPES, 16, seed=21)
    for gs in grads[:6]:
        _step(cpu_opt, cpu_params, gs)
    for pc, pd in zip(cpu_params, dev_params):
        pd.data.copy_(pc.detach())
    dev_opt.load_state_dict(copy.deepcopy(cpu_opt.state_dict()))
    for step, gs in enumerate(grads[6:]):  # crosses the reset at call 10
        _step(cpu_opt, cpu_params, gs)
        _step(dev_opt, dev_params, gs)
        _assert_sparse_identical(cpu_params, cpu_opt, dev_params, dev_opt, f"resumed step {step + 7}")


def test_sparse_many_tensors_and_kinds_in_one_group():
    # 40 tensors > 32 slots of one launch; fp32 and bf16, 8-bit and 32-bit values
    # (min_8bit_size) mixed, so every (dtype, value kind) launch path runs.
    import spam_lowmem as sl

    shapes = [(16 + i, 24 + (i % 5)) if i % 3 else (40, 40) for i in range(40)]
    gen = torch.Generator().manual_seed(4)
    cpu_params = [
        torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.bfloat16 if i % 4 == 1 else torch.float32))
        for i, s in enumerate(shapes)
    ]
    dev_params = [torch.nn.Parameter(p.detach().to(DEVICE, copy=True)) for p in cpu_params]
    kw = dict(SPARSE_KW, state_bits=8, min_8bit_size=1200, subset_seed=4)
    cpu_opt = sl.SPAM([{"params": cpu_params, "density": 0.3}], **kw)
    dev_opt = sl.SPAM([{"params": dev_params, "density": 0.3}], **kw)
    for _ in range(12):
        gs = [torch.randn(s, generator=gen).to(p.dtype) for s, p in zip(shapes, cpu_params)]
        _step(cpu_opt, cpu_params, gs)
        _step(dev_opt, dev_params, gs)
    _assert_sparse_identical(cpu_params, cpu_opt, dev_params, dev_opt, "40 tensors")
    kinds = {(p.dtype, "exp_avg_codes" in cpu_opt.state[p]) for p in cpu_params}
    assert len(kinds) == 4


@pytest.mark.skipif(not hasattr(torch.cuda, "_sleep"), reason="needs torch.cuda._sleep")
def test_sparse_step_runs_on_the_current_stream():
    # As _restore_after_sleep: on the side stream, snapshot params and state, sleep, write the
    # snapshot back, then step. A step enqueued on another stream would run during the sleep
    # and be overwritten, so the results match the CPU only if it ran on the current stream.
    cpu_params, cpu_opt, dev_params, dev_opt = _sparse_pair(SPARSE_SHAPES, torch.float32, 8, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for gs in _grads(SPARSE_SHAPES, 3, seed=2):
            _step(cpu_opt, cpu_params, gs)
            for p, g in zip(dev_params, gs):
                p.grad = g.to(DEVICE)
            live = [p.data for p in dev_params] + [
                t for p in dev_params for t in dev_opt.state[p].values() if torch.is_tensor(t)
            ]
            staged = [t.clone() for t in live]
            torch.cuda._sleep(50_000_000)
            for t, s in zip(live, staged):
                t.copy_(s)
            dev_opt.step()
    torch.cuda.synchronize()
    _assert_sparse_identical(cpu_params, cpu_opt, dev_params, dev_opt, "side stream")
