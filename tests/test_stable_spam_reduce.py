"""Stable-SPAM statistics reduced across shards: ``reduce_stats`` of functional.stable_spam_step
and the optimizer's ``_stats_reducer`` seam (docs/algorithms.md §4.4, "Sharded tensors").

Oracles: the core without a callback (an identity callback must change nothing, bit for bit);
the unsharded tensor stepped whole (two row blocks of it stepped as two tensors, with a
callback folding their rows, must agree within float rounding); values computed here from the
gradient (what the callback is handed); torch.optim.AdamW (a step whose statistics were made
NaN must be neither clipped nor normalised, i.e. plain AdamW at k = 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytest
import torch

import spam_lowmem as sl
from spam_lowmem import functional as F
from spam_lowmem.testing import available_devices, gradient_stream

KW: dict[str, Any] = dict(lr=1e-3, gammas=(0.7, 0.9, 0.999), reset_interval=5)
GAMMA3 = KW["gammas"][2]


class ReducedStableSPAM(sl.StableSPAM):
    """StableSPAM whose device batches are stepped with ``reducer`` (the distributed seam)."""

    def __init__(self, params: Iterable[torch.Tensor], *, reducer: F.StatsReducer | None, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.reducer = reducer

    def _stats_reducer(self, group: dict[str, Any], batch: Any) -> F.StatsReducer | None:
        return self.reducer


class Boom(Exception):
    pass


def identity(stats: torch.Tensor, phase: int) -> None:
    """One shard: the local values are the global ones."""


def fold_rows(rows: list[int]) -> F.StatsReducer:
    """Simulates the cross-shard reduction of one tensor split over ``rows`` (its shards,
    stepped as separate tensors of one call): max of column 0, float64 sum of column 1, written
    back to every one of those rows; other rows are whole tensors and stay as they are."""

    def reduce(stats: torch.Tensor, phase: int) -> None:
        assert stats.dtype == torch.float64 and stats.shape[1] == 2
        stats[rows, 0] = stats[rows, 0].max()
        stats[rows, 1] = stats[rows, 1].sum()

    return reduce


def state_snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[Any]:
    """Parameters, every state entry and the spike telemetry, copied."""
    snap: list[Any] = [p.detach().clone() for p in params]
    for p in params:
        snap.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()})
    snap.append({k: v.clone() for k, v in opt._telemetry.items()})
    snap.append([g["calls"] for g in opt.param_groups])
    return snap


def assert_same_snapshot(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], torch.Tensor):
                    assert torch.equal(x[k], y[k]), k
                else:
                    assert x[k] == y[k], k
        else:
            assert x == y


def moment_keys(state: dict[str, Any]) -> list[str]:
    return [
        k
        for k in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax")
        if k in state
    ]


# ------------------------------------------------------------------------------ (a) identity
@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_identity_callback_is_bit_identical(dtype: torch.dtype, state_bits: int) -> None:
    shapes = [(64, 96), (300,), (7, 3)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    qs = [torch.nn.Parameter(t.clone()) for t in init]
    phases: list[int] = []

    def recording(stats: torch.Tensor, phase: int) -> None:
        phases.append(phase)

    kw = dict(KW, state_bits=state_bits, min_8bit_size=256, weight_decay=0.1)
    opt = ReducedStableSPAM(ps, reducer=recording, **kw)
    ref = sl.StableSPAM(qs, **kw)
    clipped = 0
    for step, grads in enumerate(gradient_stream(shapes, 12, dtype=dtype, spike_every=3, seed=1)):
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert phases == [1, 2] * (step + 1)
        got, want = opt.spike_stats(), ref.spike_stats()
        assert got == want
        clipped += got["clipped"]
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), f"step {step}"
            for k in ("grad_stats", *moment_keys(ref.state[q])):
                assert torch.equal(opt.state[p][k], ref.state[q][k]), f"step {step}: {k}"
            assert opt.state[p]["step"] == ref.state[q]["step"]
            assert opt.state[p]["stat_step"] == ref.state[q]["stat_step"]
    assert clipped > 0, "the stream must make some tensor clip"
    if state_bits == 8:
        assert "exp_avg_codes" in opt.state[ps[0]]


# ---------------------------------------------------------------------- (b) shard simulation
def test_two_shards_match_the_whole_tensor() -> None:
    rows, cols = 129, 80
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(rows, cols, generator=gen) * 0.1
    bias_init = torch.randn(cols, generator=gen) * 0.1
    whole = torch.nn.Parameter(init.clone())
    whole_bias = torch.nn.Parameter(bias_init.clone())
    shards = [torch.nn.Parameter(init[:65].clone()), torch.nn.Parameter(init[65:].clone())]
    bias = torch.nn.Parameter(bias_init.clone())  # a whole (replicated) tensor: row 2, untouched
    kw = dict(KW, weight_decay=0.05)
    sharded = ReducedStableSPAM([*shards, bias], reducer=fold_rows([0, 1]), **kw)
    ref = sl.StableSPAM([whole, whole_bias], **kw)
    clipped_steps = 0
    stream = gradient_stream([(rows, cols), (cols,)], 14, spike_every=3, spike_scale=50.0, seed=4)
    for step, (g, gb) in enumerate(stream):
        whole.grad, whole_bias.grad = g.clone(), gb.clone()
        shards[0].grad, shards[1].grad, bias.grad = g[:65].clone(), g[65:].clone(), gb.clone()
        sharded.step()
        ref.step()
        got, want = sharded.spike_stats(), ref.spike_stats()
        # AdaClip's threshold comes from the exact global max, so the clip decisions are exact
        assert got["clipped"] == want["clipped"], f"step {step}"
        clipped_steps += got["clipped"] > 0
        msg = f"step {step}"
        torch.testing.assert_close(
            torch.cat([s.detach() for s in shards]), whole.detach(), rtol=1e-6, atol=1e-8, msg=msg
        )
        for key in ("exp_avg", "exp_avg_sq"):
            cat = torch.cat([sharded.state[s][key] for s in shards])
            torch.testing.assert_close(cat, ref.state[whole][key], rtol=1e-6, atol=1e-12, msg=f"{msg}: {key}")
        stats = [sharded.state[s]["grad_stats"] for s in shards]
        assert torch.equal(stats[0], stats[1]), "both shards must hold the same statistics"
        want_stats = ref.state[whole]["grad_stats"]
        assert torch.equal(stats[0][0], want_stats[0]), "M is an EMA of the exact max"
        torch.testing.assert_close(stats[0], want_stats, rtol=1e-6, atol=0.0, msg=msg)
        # the replicated tensor's row was left as its local value: bit for bit the whole run
        assert torch.equal(bias, whole_bias)
        assert torch.equal(sharded.state[bias]["grad_stats"], ref.state[whole_bias]["grad_stats"])
    assert clipped_steps >= 3, "the stream must clip on several steps"
    assert sharded.state[shards[0]]["step"] == ref.state[whole]["step"] == 5  # k = 1 at the reset call 10


# ---------------------------------------------------------------------- (c) a failing callback
@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("failing_phase", [1, 2])
def test_raising_callback_changes_nothing(failing_phase: int, state_bits: int) -> None:
    shapes = [(40, 64), (33,)]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    qs = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(KW, state_bits=state_bits, min_8bit_size=256)
    opt = ReducedStableSPAM(ps, reducer=identity, **kw)
    twin = sl.StableSPAM(qs, **kw)  # never sees the failed call
    grads = list(gradient_stream(shapes, 6, spike_every=4, spike_scale=100.0, seed=6))
    for g in grads[:3]:
        for p, q, x in zip(ps, qs, g):
            p.grad, q.grad = x.clone(), x.clone()
        opt.step()
        twin.step()
    seen: list[int] = []

    def failing(stats: torch.Tensor, phase: int) -> None:
        seen.append(phase)
        stats.fill_(12345.0)  # written, then the callback fails: nothing may be read back
        if phase == failing_phase:
            raise Boom(f"phase {phase}")

    for p, x in zip(ps, grads[3]):  # a spike step: phase 2 has clipped sums to hand over
        p.grad = x.clone()
    before = state_snapshot(opt, ps)
    opt.reducer = failing
    with pytest.raises(Boom, match=f"phase {failing_phase}"):
        opt.step()
    assert seen == [1, 2][:failing_phase]
    assert_same_snapshot(state_snapshot(opt, ps), before)
    # and the optimizer carries on as if the failed call had not happened
    opt.reducer = identity
    for g in grads[3:]:
        for p, q, x in zip(ps, qs, g):
            p.grad, q.grad = x.clone(), x.clone()
        opt.step()
        twin.step()
        assert opt.spike_stats() == twin.spike_stats()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["grad_stats"], twin.state[q]["grad_stats"])


# ------------------------------------------------------------------------- (d) NaN written
def test_nan_max_disables_clipping_from_then_on() -> None:
    """A NaN max makes M NaN: the tensor is not clipped on this call or any later one (NaN
    compares false), and its update is the unclipped one."""
    shape = (32, 48)
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(shape, generator=gen)
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    kw = dict(KW, reset_interval=0)

    def nan_max(stats: torch.Tensor, phase: int) -> None:
        if phase == 1:
            stats[:, 0] = float("nan")

    opt = ReducedStableSPAM([p], reducer=identity, **kw)
    ref = sl.StableSPAM([q], **kw)
    # max|g| halves every call, so it stays below M_hat (an average of earlier maxes): the
    # reference does not clip on the NaN call either
    small = [torch.randn(shape, generator=gen) * 0.5**i for i in range(3)]
    for g in small:
        p.grad, q.grad = g.clone(), g.clone()
        opt.reducer = nan_max if g is small[-1] else identity
        opt.step()
        ref.step()
    assert ref.spike_stats()["clipped"] <= 1  # k = 1 may clip the top entry by its rounding
    # this call's update is the one without clipping, which is what the reference did
    assert torch.equal(p, q)
    assert math.isnan(float(opt.state[p]["grad_stats"][0]))
    assert torch.equal(opt.state[p]["grad_stats"][1:], ref.state[q]["grad_stats"][1:])
    opt.spike_stats()
    spike = torch.randn(shape, generator=gen)
    spike[3, 4] = 1e3
    p.grad, q.grad = spike.clone(), spike.clone()
    opt.reducer = identity
    opt.step()
    ref.step()
    assert ref.spike_stats()["clipped"] > 0
    assert opt.spike_stats()["clipped"] == 0, "M is NaN: nothing clips any more"
    assert bool(torch.isfinite(p).all())


def test_nan_sum_skips_normalisation_then_poisons() -> None:
    """A NaN sum makes ||g|| and mu, nu NaN: the call's gradient is not normalised (at k = 1,
    nothing clips either, so the step is AdamW's), and a later call normalises to a NaN target."""
    shape = (16, 24)
    gen = torch.Generator().manual_seed(8)
    init = torch.randn(shape, generator=gen)
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())

    def nan_sum(stats: torch.Tensor, phase: int) -> None:
        if phase == 1:
            stats[:, 1] = float("nan")

    opt = ReducedStableSPAM([p], reducer=nan_sum, **dict(KW, weight_decay=0.1))
    adamw = torch.optim.AdamW([q], lr=KW["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    g = torch.randn(shape, generator=gen) * 3.0
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    adamw.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    stats = opt.state[p]["grad_stats"]
    assert math.isfinite(float(stats[0])) and math.isnan(float(stats[1])) and math.isnan(float(stats[2]))
    opt.reducer = identity
    p.grad = torch.randn(shape, generator=gen)
    opt.step()
    assert bool(torch.isnan(p).all()), "mu and nu are NaN: the normalisation target is NaN"


# ------------------------------------------------------------------ (e) what the callback sees
def test_callback_sees_local_values_in_phase_order() -> None:
    shapes = [(50, 40), (70,), (0,)]
    gen = torch.Generator().manual_seed(9)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    seen: list[tuple[int, torch.Tensor]] = []

    def recording(stats: torch.Tensor, phase: int) -> None:
        assert stats.dtype == torch.float64 and stats.device.type == "cpu"
        assert tuple(stats.shape) == (len(shapes), 2)
        seen.append((phase, stats.clone()))

    opt = ReducedStableSPAM(ps, reducer=recording, **dict(KW, reset_interval=0))
    clip_calls = 0
    for step in range(6):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        grads[1][5] = float("inf")  # left out of the statistics under "skip"
        if step >= 2:
            grads[0][1, 2] = 40.0 * (step - 1)  # spikes above the max EMA: tensor 0 clips
        prev_m = [float(opt.state[p]["grad_stats"][0]) if opt.state[p] else 0.0 for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        seen.clear()
        opt.step()
        assert [phase for phase, _ in seen] == [1, 2]
        (_, first), (_, second) = seen
        for i, g in enumerate(grads):
            finite = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
            gmax = float(finite.abs().max()) if g.numel() else 0.0
            assert first[i, 0] == gmax, f"step {step} tensor {i}"
            want_sq = float((finite.double() ** 2).sum())
            assert math.isclose(float(first[i, 1]), want_sq, rel_tol=1e-6), f"step {step} tensor {i}"
            # phase 2: column 0 still the phase-1 (global) max; column 1 the clipped local sum
            assert second[i, 0] == first[i, 0]
            k = opt.state[ps[i]]["stat_step"]
            m_new = float(opt.state[ps[i]]["grad_stats"][0])
            assert m_new == pytest.approx(GAMMA3 * prev_m[i] + (1 - GAMMA3) * gmax, rel=1e-6)
            threshold = m_new / (1.0 - GAMMA3**k)
            if gmax > threshold:
                scale = torch.tensor(threshold, dtype=torch.float32) / torch.tensor(gmax, dtype=torch.float32)
                clipped = torch.where(finite.abs() > threshold, finite * scale, finite)
                want = float((clipped.double() ** 2).sum())
                assert math.isclose(float(second[i, 1]), want, rel_tol=1e-6), f"step {step} tensor {i}"
                assert float(second[i, 1]) < float(first[i, 1])
                clip_calls += 1
            else:
                assert second[i, 1] == 0.0, "a tensor that does not clip hands over 0"
    assert clip_calls >= 3


def test_functional_call_without_tensors_does_not_call_back() -> None:
    calls: list[int] = []
    counters = torch.zeros(2, dtype=torch.int64)
    F.stable_spam_step(
        [], [], [], [], [], [], [], [], [], [], counters,
        gamma1=0.7, gamma2=0.9, gamma3=0.999, beta1=0.9, beta2=0.999, eps=1e-8, weight_keep=1.0,
        reset=F.MomentReset.NONE, skip_nonfinite=True, reduce_stats=lambda s, ph: calls.append(ph),
    )  # fmt: skip
    assert calls == []


def test_reduce_stats_must_be_callable() -> None:
    p = torch.zeros(4)
    with pytest.raises(TypeError, match="reduce_stats"):
        F.stable_spam_step(
            [p], [p.clone()], [p.clone()], [p.clone()], [torch.empty(0)], [torch.empty(0)],
            [torch.zeros(3)], [0.3, 0.1, 0.001], [1e-2], [0.03], torch.zeros(2, dtype=torch.int64),
            gamma1=0.7, gamma2=0.9, gamma3=0.999, beta1=0.9, beta2=0.999, eps=1e-8, weight_keep=1.0,
            reset=F.MomentReset.NONE, skip_nonfinite=True, reduce_stats="sum",  # type: ignore[arg-type]
        )  # fmt: skip


# ------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
def test_cuda_shards_match_cpu_whole_tensor() -> None:
    """The CUDA core's split phases (export, callback, read back) against the CPU core stepping
    the whole tensor, over clipping steps and a reset."""
    assert "cuda" in available_devices()
    rows, cols = 129, 80
    gen = torch.Generator().manual_seed(10)
    init = torch.randn(rows, cols, generator=gen) * 0.1
    whole = torch.nn.Parameter(init.clone())
    shards = [torch.nn.Parameter(init[:65].clone().cuda()), torch.nn.Parameter(init[65:].clone().cuda())]
    phases: list[int] = []
    fold = fold_rows([0, 1])

    def reduce(stats: torch.Tensor, phase: int) -> None:
        assert stats.device.type == "cuda"
        phases.append(phase)
        fold(stats, phase)

    sharded = ReducedStableSPAM(shards, reducer=reduce, **KW)
    ref = sl.StableSPAM([whole], **KW)
    for step, (g,) in enumerate(gradient_stream([(rows, cols)], 12, spike_every=3, spike_scale=50.0, seed=11)):
        whole.grad = g.clone()
        shards[0].grad, shards[1].grad = g[:65].cuda(), g[65:].cuda()
        sharded.step()
        ref.step()
        assert sharded.spike_stats()["clipped"] == ref.spike_stats()["clipped"], f"step {step}"
        got = torch.cat([s.detach().cpu() for s in shards])
        torch.testing.assert_close(got, whole.detach(), rtol=1e-6, atol=1e-8, msg=f"step {step}")
        torch.testing.assert_close(
            sharded.state[shards[0]]["grad_stats"].cpu(), ref.state[whole]["grad_stats"], rtol=1e-6, atol=0.0
        )
    assert phases == [1, 2] * 12


@pytest.mark.cuda
@pytest.mark.parametrize("failing_phase", [1, 2])
def test_cuda_raising_callback_changes_nothing(failing_phase: int) -> None:
    ps = [torch.nn.Parameter(torch.randn(40, 64, device="cuda"))]
    opt = ReducedStableSPAM(ps, reducer=identity, **KW)
    for _ in range(3):
        ps[0].grad = torch.randn(40, 64, device="cuda")
        opt.step()
    ps[0].grad = torch.randn(40, 64, device="cuda") * 50.0

    def failing(stats: torch.Tensor, phase: int) -> None:
        if phase == failing_phase:
            raise Boom("cuda")

    before = state_snapshot(opt, ps)
    opt.reducer = failing
    with pytest.raises(Boom):
        opt.step()
    assert_same_snapshot(state_snapshot(opt, ps), before)
