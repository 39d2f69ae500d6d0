"""The CUDA core (spam_lowmem._C_cuda) against the CPU core (spam_lowmem._C).

Both modules are called with identical arguments on identical inputs (the CUDA inputs are
copies of the CPU ones). Both run the element math of cpp/spam/math.h without FMA
contraction, so SPAM agrees bit for bit and Stable-SPAM differs only through how its
reductions are ordered and accumulated. Tolerances: fp32 rtol 1e-5 / atol 1e-6; bf16 and fp16
within one ulp of the storage dtype, except next to zero: a moment that cancels to ~1e-9
can sit many (tiny) ulps apart after a 1e-7 relative change of ||g||, so there the fp32 atol
(1e-6) applies instead. Telemetry counters must be equal.

Every test needs a CUDA GPU and the compiled CUDA module; otherwise the module is skipped.
"""

from __future__ import annotations

import math

import pytest
import torch


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
SPAM_KW = dict(beta1=0.9, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001, eps=1e-6,
               weight_decay_scale=1e-4)
GAMMA1, GAMMA2, GAMMA3, SC = 0.7, 0.9, 0.999, 0.8
STABLE_KW = dict(gamma1=GAMMA1 * SC, one_minus_gamma1=1 - GAMMA1 * SC, gamma2=GAMMA2,
                 one_minus_gamma2=1 - GAMMA2, gamma3=GAMMA3, one_minus_gamma3=1 - GAMMA3,
                 beta1=0.9 * SC, one_minus_beta1=1 - 0.9 * SC, beta2=0.999, one_minus_beta2=0.001,
                 eps=1e-8, weight_keep=1 - 1e-3 * 0.01)
STATS_CLIPPING = (0.05, 0.5, 0.3)  # M small: M_hat ~ 0.08 < max|g| of the larger tensors
STATS_QUIET = (10.0, 0.5, 0.3)  # M_hat ~ 16: AdaClip does not fire


# ---------------------------------------------------------------------------- inputs
def _make_group(sizes, dtypes, seed, *, spikes=False, nonfinite=False):
    """Per tensor [p, g, m, v] on the CPU; dtypes is one dtype or one per tensor."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(sizes)
    gen = torch.Generator().manual_seed(seed)
    group = []
    for n, dtype in zip(sizes, dtypes):
        p = torch.randn(n, generator=gen)
        g = torch.randn(n, generator=gen) * 0.1
        m = torch.randn(n, generator=gen) * 0.01
        v = torch.rand(n, generator=gen) * 1e-3 + 1e-4
        if spikes and n > 0:
            g[:: max(1, n // 5)] *= 100.0
        if nonfinite and n >= 3:
            g[n // 2] = float("nan")
            g[n - 1] = float("inf") if n % 2 else -float("inf")
        group.append([t.to(dtype) for t in (p, g, m, v)])
    return group


def _to_device(group):
    return [[t.to(DEVICE) for t in tensors] for tensors in group]


def _columns(group):
    """params, grads, exp_avgs, exp_avg_sqs as lists of detached tensors."""
    return [[tensors[k].detach() for tensors in group] for k in range(4)]


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
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")
        return
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN positions differ"
    ulps = (_ordinal16(actual) - _ordinal16(expected)).abs()
    near_zero = (actual.float() - expected.float()).abs() <= 1e-6
    bad = (ulps > 1) & ~near_zero & ~nan
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} entries more than 1 ulp apart, e.g. "
                             f"[{i}] {float(actual[i])} vs {float(expected[i])}")


def _assert_group_close(dev_group, cpu_group, label):
    for i, (dev, cpu) in enumerate(zip(dev_group, cpu_group)):
        for name, a, e in zip(("param", "grad", "exp_avg", "exp_avg_sq"), dev, cpu):
            _assert_close(a, e, f"{label}: tensor {i} (numel {e.numel()}) {name}")


# ---------------------------------------------------------------------------- runners
def _run_spam(group, *, reset=0, skip=True, clip=50.0, stream=None, before_launch=None):
    cpu, dev = [[t.clone() for t in ts] for ts in group], _to_device(group)
    scales = [1e-3 * (1.0 + 0.1 * i) for i in range(len(group))]
    kw = dict(SPAM_KW, clip_threshold=clip, reset=reset, skip_nonfinite=skip)
    # Both start from nonzero counts: the kernels must add, not overwrite.
    cnt_cpu = torch.tensor([5, 7], dtype=torch.int64)
    cnt_dev = cnt_cpu.to(DEVICE)
    _C.spam_step(*_columns(cpu), scales, cnt_cpu, **kw)
    if before_launch is not None:
        before_launch(dev)
    _C_cuda.spam_step(*_columns(dev), scales, cnt_dev.detach(), **kw,
                      stream=_stream() if stream is None else stream.cuda_stream)
    torch.cuda.synchronize()
    _assert_group_close(dev, cpu, f"spam reset={reset}")
    assert cnt_dev.cpu().tolist() == cnt_cpu.tolist()
    return cnt_cpu.tolist()


def _stable_lists(n):
    ks = [1000 + 37 * i for i in range(n)]  # per-tensor step counts -> per-tensor corrections
    bcs = []
    for k in ks:
        bcs += [1 - (GAMMA1 * SC) ** k, 1 - GAMMA2**k, 1 - GAMMA3**k]
    step_sizes = [1e-3 / (1 - (0.9 * SC) ** k) for k in ks]
    sqrt_bc2s = [math.sqrt(1 - 0.999**k) for k in ks]
    return bcs, step_sizes, sqrt_bc2s


def _stable_call_cuda(dev, stats, lists, cnt, kw, stream):
    numels = [ts[0].numel() for ts in dev]
    scratch = torch.empty(_C_cuda.stable_spam_scratch_bytes(numels), dtype=torch.uint8,
                          device=DEVICE)
    _C_cuda.stable_spam_step(*_columns(dev), [s.detach() for s in stats], *lists, cnt.detach(),
                             **kw, scratch=scratch, stream=stream)


def _run_stable(group, *, reset=0, skip=True, stats_init=STATS_CLIPPING, stream=None,
                before_launch=None):
    cpu, dev = [[t.clone() for t in ts] for ts in group], _to_device(group)
    stats_cpu = [torch.tensor(stats_init, dtype=torch.float32) for _ in group]
    stats_dev = [s.to(DEVICE) for s in stats_cpu]
    lists = _stable_lists(len(group))
    kw = dict(STABLE_KW, reset=reset, skip_nonfinite=skip)
    cnt_cpu = torch.tensor([3, 1], dtype=torch.int64)
    cnt_dev = cnt_cpu.to(DEVICE)
    _C.stable_spam_step(*_columns(cpu), stats_cpu, *lists, cnt_cpu, **kw)
    if before_launch is not None:
        before_launch(dev)
    _stable_call_cuda(dev, stats_dev, lists, cnt_dev, kw,
                      _stream() if stream is None else stream.cuda_stream)
    torch.cuda.synchronize()
    _assert_group_close(dev, cpu, f"stable reset={reset}")
    for i, (a, e) in enumerate(zip(stats_dev, stats_cpu)):
        _assert_close(a, e, f"stable: grad_stats of tensor {i}")
    assert cnt_dev.cpu().tolist() == cnt_cpu.tolist()
    return [c - c0 for c, c0 in zip(cnt_cpu.tolist(), (3, 1))]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("reset", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spam_matches_cpu(dtype, reset):
    counts = _run_spam(_make_group(SIZES, dtype, seed=1, spikes=True), reset=reset)
    if reset != 1:
        assert counts[0] > 5, "the spike clip should fire"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spam_without_clipping(dtype):
    counts = _run_spam(_make_group(SIZES, dtype, seed=2), clip=0.0)
    assert counts == [5, 7]


@pytest.mark.parametrize("reset", [0, 1, 2])
@pytest.mark.parametrize("stats_init", [STATS_CLIPPING, STATS_QUIET], ids=["clips", "quiet"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stable_spam_matches_cpu(dtype, stats_init, reset):
    counts = _run_stable(_make_group(SIZES, dtype, seed=3), reset=reset, stats_init=stats_init)
    if stats_init is STATS_CLIPPING:
        assert counts[0] > 0, "AdaClip should fire"
    else:
        assert counts[0] == 0


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_entries(dtype, skip):
    group = _make_group(SIZES, dtype, seed=4, nonfinite=True)
    expected_bad = sum(2 for n in SIZES if n >= 3)
    spam_counts = _run_spam(group, skip=skip)
    assert spam_counts[1] - 7 == expected_bad
    stable_counts = _run_stable(group, skip=skip)
    assert stable_counts[1] == expected_bad


@pytest.mark.parametrize("algo", ["spam", "stable"])
def test_mixed_dtypes_in_one_call(algo):
    sizes = [65537, 0, 4097, 255, 7, 1, 3000, 70000, 513]
    dtypes = [DTYPES[i % 3] for i in range(len(sizes))]
    group = _make_group(sizes, dtypes, seed=5, spikes=(algo == "spam"))
    (_run_spam if algo == "spam" else _run_stable)(group)


@pytest.mark.parametrize("algo", ["spam", "stable"])
def test_more_than_200_tensors(algo):
    # Far more tensors than fit one launch's argument table: several launches per phase.
    gen = torch.Generator().manual_seed(6)
    sizes = [int(x) for x in torch.randint(1, 3000, (230,), generator=gen)]
    sizes[17] = 70000  # one multi-chunk tensor in the middle
    dtypes = [DTYPES[i % 3] for i in range(len(sizes))]
    group = _make_group(sizes, dtypes, seed=7, spikes=(algo == "spam"))
    (_run_spam if algo == "spam" else _run_stable)(group)


@pytest.mark.parametrize("algo", ["spam", "stable"])
def test_tensor_split_across_launches(algo):
    # 336 chunks of 64Ki elements > 320 table rows: the second tensor continues in a new launch.
    group = _make_group([11_000_000, 11_000_000, 5], torch.float32, seed=8)
    (_run_spam if algo == "spam" else _run_stable)(group)


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
@pytest.mark.parametrize("algo", ["spam", "stable"])
def test_non_default_stream(algo):
    group = _make_group(SIZES, torch.bfloat16, seed=9, spikes=True)
    side = torch.cuda.Stream()  # torch's pool streams do not synchronise with the default one
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (_run_spam if algo == "spam" else _run_stable)(group, stream=side,
                                                       before_launch=_restore_after_sleep)


def test_stable_spam_is_deterministic():
    group = _make_group(SIZES, torch.float32, seed=10)
    outs = []
    for _ in range(2):
        dev = _to_device(group)
        stats = [torch.tensor(STATS_CLIPPING, device=DEVICE) for _ in group]
        cnt = torch.zeros(2, dtype=torch.int64, device=DEVICE)
        _stable_call_cuda(dev, stats, _stable_lists(len(group)), cnt,
                          dict(STABLE_KW, reset=0, skip_nonfinite=True), _stream())
        torch.cuda.synchronize()
        outs.append([t.cpu() for ts in dev for t in ts] + [s.cpu() for s in stats])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_scratch_bytes_and_argument_checks():
    assert _C_cuda.stable_spam_scratch_bytes([]) == 0
    small, big = (_C_cuda.stable_spam_scratch_bytes(s) for s in ([10], [10, 100000]))
    assert 0 < small < big
    group = _to_device(_make_group([100], torch.float32, seed=11))
    stats = [torch.zeros(3, device=DEVICE)]
    cnt = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    kw = dict(STABLE_KW, reset=0, skip_nonfinite=True, stream=_stream())
    too_small = torch.empty(small - 1, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError):
        _C_cuda.stable_spam_step(*_columns(group), stats, *_stable_lists(1), cnt, **kw,
                                 scratch=too_small)
    cpu_params = [group[0][0].cpu()]
    with pytest.raises(TypeError):  # a CPU tensor handed to the CUDA module
        _C_cuda.spam_step(cpu_params, *_columns(group)[1:], [1e-3], cnt, **SPAM_KW,
                          clip_threshold=0.0, reset=0, skip_nonfinite=True, stream=_stream())
    with pytest.raises(TypeError):  # counters must be int64
        _C_cuda.spam_step(*_columns(group), [1e-3], cnt.float(), **SPAM_KW, clip_threshold=0.0,
                          reset=0, skip_nonfinite=True, stream=_stream())
