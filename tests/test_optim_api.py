"""torch.optim conventions of sl.SPAM / sl.StableSPAM: groups, schedulers, closures,
zero_grad, add_param_group, state_dict round trip, telemetry, and the bad-input policy."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch

import spam_lowmem as sl
from spam_lowmem.reference import ReferenceSPAM, ReferenceStableSPAM

OPTIMS = {
    "spam": (sl.SPAM, ReferenceSPAM, dict(lr=1e-2, threshold=20.0, reset_interval=12, warmup_steps=4, clip_delay=3)),
    "stable": (sl.StableSPAM, ReferenceStableSPAM, dict(lr=1e-2, reset_interval=12, total_steps=40)),
}


def tiny_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


TEACHER = torch.randn(8, 3, generator=torch.Generator().manual_seed(99))


def loss_fn(model: torch.nn.Module, step: int) -> torch.Tensor:
    """Cross-entropy against a fixed linear teacher: a learnable task."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 8, generator=gen)
    y = (x @ TEACHER).argmax(dim=1)
    return torch.nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = loss_fn(model, step)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(OPTIMS))
def test_tiny_model_learns_and_matches_reference(name: str) -> None:
    cls, ref_cls, kw = OPTIMS[name]
    model, ref_model = tiny_model(), tiny_model()
    losses = train(model, cls(model.parameters(), **kw), range(60))
    ref_losses = train(ref_model, ref_cls(ref_model.parameters(), **kw), range(60))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(OPTIMS))
def test_param_groups_equal_separate_optimizers(name: str) -> None:
    cls, _, kw = OPTIMS[name]
    a, b = tiny_model(), tiny_model()
    other = dict(lr=3e-3, reset_interval=7) if name == "spam" else dict(lr=3e-3, gammas=(0.85, 0.99, 0.99))
    pa = list(a.parameters())
    opt = cls([{"params": pa[:2]}, {"params": pa[2:], **other}], **kw)
    pb = list(b.parameters())
    opt1, opt2 = cls(pb[:2], **kw), cls(pb[2:], **{**kw, **other})
    for step in range(30):
        for model, opts in ((a, [opt]), (b, [opt1, opt2])):
            for o in opts:
                o.zero_grad()
            loss_fn(model, step).backward()
            for o in opts:
                o.step()
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", list(OPTIMS))
def test_lr_scheduler_drives_group_lr(name: str) -> None:
    cls, ref_cls, kw = OPTIMS[name]
    model, ref_model = tiny_model(), tiny_model()
    opt, ref = cls(model.parameters(), **kw), ref_cls(ref_model.parameters(), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s // 5))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 0.5 ** (s // 5))
    for step in range(20):
        for m, o, s in ((model, opt, sched), (ref_model, ref, ref_sched)):
            o.zero_grad()
            loss_fn(m, step).backward()
            o.step()
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(kw["lr"] / 16)
    for x, y in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMS))
def test_closure_zero_grad_and_add_param_group(name: str) -> None:
    cls, _, kw = OPTIMS[name]
    model = tiny_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = cls(first, **kw)
    calls = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, 0)
        loss.backward()
        calls.append(1)
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == [1]
    assert not torch.equal(first[0], before[0])
    assert torch.equal(second[0], before[2])  # not in the optimizer yet
    opt.add_param_group({"params": second, "lr": 1e-3})
    assert opt.param_groups[1]["calls"] == 0 and opt.param_groups[1]["lr"] == 1e-3
    opt.step(closure)
    assert not torch.equal(second[0], before[2])
    # zero_grad(set_to_none=True): a parameter without a gradient is skipped, counters move on
    opt.zero_grad(set_to_none=True)
    snapshot = [p.detach().clone() for p in model.parameters()]
    steps = [opt.state[p]["step"] for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))
    assert [opt.state[p]["step"] for p in model.parameters()] == steps
    assert [g["calls"] for g in opt.param_groups] == [3, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIMS))
def test_state_dict_resume_is_bit_identical(name: str, dtype: torch.dtype) -> None:
    cls, _, kw = OPTIMS[name]
    model = tiny_model(dtype)
    opt = cls(model.parameters(), **kw)
    train(model, opt, range(10))  # crosses no reset yet; the resumed run crosses two
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_model(dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = cls(resumed.parameters(), **kw)
    opt2.load_state_dict(saved["opt"])
    for p in resumed.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][key].dtype == dtype
        if "grad_stats" in opt2.state[p]:
            assert opt2.state[p]["grad_stats"].dtype == torch.float32  # not cast to bf16
    assert train(model, opt, range(10, 35)) == train(resumed, opt2, range(10, 35))
    for x, y in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(x, y)


def test_load_state_dict_rejects_foreign_or_misshapen_state() -> None:
    model = tiny_model()
    spam = sl.SPAM(model.parameters())
    train(model, spam, range(2))
    stable = sl.StableSPAM(model.parameters())
    with pytest.raises(ValueError, match="saved by a SPAM optimizer; this is a StableSPAM"):
        stable.load_state_dict(spam.state_dict())
    bad = copy.deepcopy(spam.state_dict())
    bad["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        sl.SPAM(model.parameters()).load_state_dict(bad)


@pytest.mark.parametrize("name", list(OPTIMS))
def test_non_contiguous_parameter_is_updated_in_place(name: str) -> None:
    cls, ref_cls, kw = OPTIMS[name]
    base = torch.randn(6, 9)
    p = torch.nn.Parameter(base.t())  # a non-contiguous view
    assert not p.is_contiguous()
    q = torch.nn.Parameter(base.t().contiguous())
    opt, ref = cls([p], **kw), ref_cls([q], **kw)
    ptr = p.data_ptr()
    for _ in range(15):
        g = torch.randn(9, 6)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert p.data_ptr() == ptr
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMS))
def test_spike_stats_count_clips_per_group_and_reset(name: str) -> None:
    cls, ref_cls, kw = OPTIMS[name]
    model, ref_model = tiny_model(), tiny_model()
    pa = list(model.parameters())
    opt = cls([{"params": pa[:2]}, {"params": pa[2:]}], **kw)
    ref = ref_cls(ref_model.parameters(), **kw)
    total = 0
    for step in range(25):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            (loss_fn(m, step) * (50.0 if step % 6 == 5 else 1.0)).backward()
            o.step()
        total += ref.last_counts["clipped"]
    stats = opt.spike_stats()
    assert total > 0
    assert stats["clipped"] == total == sum(g["clipped"] for g in stats["groups"])
    assert len(stats["groups"]) == 2 and stats["nonfinite"] == 0
    assert opt.spike_stats()["clipped"] == 0  # reading resets


@pytest.mark.parametrize("name", list(OPTIMS))
def test_nonfinite_policy(name: str) -> None:
    cls, _, kw = OPTIMS[name]
    p = torch.nn.Parameter(torch.randn(50))
    opt = cls([p], **kw)
    for _ in range(3):
        p.grad = torch.randn(50)
        opt.step()
    before = p.detach().clone()
    m_before = opt.state[p]["exp_avg"].clone()
    g = torch.randn(50)
    g[[3, 17]] = torch.tensor([float("nan"), float("inf")])
    p.grad = g
    opt.step()
    assert torch.equal(p[[3, 17]], before[[3, 17]])
    assert torch.equal(opt.state[p]["exp_avg"][[3, 17]], m_before[[3, 17]])
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["exp_avg_sq"]).all()
    assert not torch.equal(p[0], before[0])
    assert opt.spike_stats()["nonfinite"] == 2
    loose = cls([q := torch.nn.Parameter(torch.randn(50))], nonfinite="propagate", **kw)
    q.grad = g
    loose.step()
    assert torch.isnan(q[3])


def test_spam_clipping_caps_g2_at_theta_v() -> None:
    theta = 4.0
    p = torch.nn.Parameter(torch.zeros(6))
    opt = sl.SPAM([p], lr=0.0, threshold=theta, clip_delay=2, reset_interval=0, betas=(0.5, 0.5))
    p.grad = torch.ones(6)
    opt.step()  # call 1 is inside the clip delay; v = 0.5
    v = opt.state[p]["exp_avg_sq"].clone()
    opt.state[p]["exp_avg"].zero_()
    g = torch.tensor([0.1, -1.0, 1.4, -1.5, 30.0, -1e4])
    p.grad = g.clone()
    opt.step()
    used = opt.state[p]["exp_avg"] / 0.5  # m = 0.5 * g_used since m was zeroed
    cap = (theta * v).sqrt()
    expected = torch.where(g * g > theta * v, torch.sign(g) * cap, g)
    torch.testing.assert_close(used, expected)
    assert opt.spike_stats()["clipped"] == int((g * g > theta * v).sum()) == 3
    assert torch.equal(p.grad, g)  # p.grad is not modified


def test_spam_reset_and_warmup_fire_on_schedule() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    interval, warmup = 10, 5
    opt = sl.SPAM([p], lr=1.0, reset_interval=interval, warmup_steps=warmup, spike_clipping=False, eps=0.0)
    for n in range(1, 26):
        before = p.detach().clone()
        g = torch.full((4,), 2.0)
        p.grad = g
        opt.step()
        state = opt.state[p]
        step = before - p.detach()
        if n % interval == 0:  # reset call: fresh moments, t keeps counting
            torch.testing.assert_close(state["exp_avg"], 0.1 * g)
            torch.testing.assert_close(state["exp_avg_sq"], 0.001 * g * g)
            assert state["step"] == n
        t = state["step"]
        bias = (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
        ratio = state["exp_avg"] / state["exp_avg_sq"].sqrt()
        s = step / (bias * ratio)
        j = n % interval
        expected = 1.0 if n < interval or j >= warmup else sl.schedules.spam_warmup_factor(n, interval, warmup)
        torch.testing.assert_close(s, torch.full((4,), expected), rtol=1e-5, atol=1e-6)
        if n in (10, 20):
            assert expected == pytest.approx(0.01)


BAD_SPAM: list[dict[str, Any]] = [
    dict(lr=-1e-3),
    dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, -0.1)),
    dict(eps=-1.0),
    dict(weight_decay=-0.1),
    dict(threshold=0.0),
    dict(threshold=-5.0),
    dict(reset_interval=-1),
    dict(reset_interval=2.5),
    dict(warmup_steps=-1),
    dict(clip_delay=-3),
    dict(nonfinite="ignore"),
]
BAD_STABLE: list[dict[str, Any]] = [
    dict(lr=-1.0),
    dict(gammas=(1.5, 0.9, 0.999)),
    dict(gammas=(0.7, 1.0, 0.999)),
    dict(gammas=(0.7, 0.9, -0.1)),
    dict(total_steps=0),
    dict(eta_min=1.5),
    dict(reset_interval=-5),
    dict(betas=(0.9, 1.0)),
    dict(nonfinite="raise"),
]


@pytest.mark.parametrize("kw", BAD_SPAM, ids=[str(k) for k in BAD_SPAM])
def test_spam_rejects_bad_hyperparameters(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Invalid"):
        sl.SPAM([torch.nn.Parameter(torch.zeros(2))], **kw)
    opt = sl.SPAM([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **kw})
    assert len(opt.param_groups) == 1  # the rejected group was not added


@pytest.mark.parametrize("kw", BAD_STABLE, ids=[str(k) for k in BAD_STABLE])
def test_stable_spam_rejects_bad_hyperparameters(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Invalid"):
        sl.StableSPAM([torch.nn.Parameter(torch.zeros(2))], **kw)


def test_threshold_zero_allowed_when_clipping_off_and_gamma1_minus_one() -> None:
    sl.SPAM([torch.nn.Parameter(torch.zeros(2))], threshold=0.0, spike_clipping=False)
    sl.StableSPAM([torch.nn.Parameter(torch.zeros(2))], gammas=(-1, 0.9, 0.999))


@pytest.mark.parametrize("cls", [sl.SPAM, sl.StableSPAM])
def test_bad_parameters_and_gradients(cls: type) -> None:
    with pytest.raises(ValueError, match="complex"):
        cls([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="float64"):
        cls([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    with pytest.raises(NotImplementedError, match="meta"):
        cls([torch.nn.Parameter(torch.zeros(2, device="meta"))])
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = cls([p])
    p.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert not opt.state[p]  # nothing was initialised or changed
    assert torch.equal(p.detach(), torch.zeros(3, 3))
