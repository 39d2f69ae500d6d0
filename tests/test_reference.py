"""Tests of the pure-PyTorch oracles (spam_lowmem.reference) against independent oracles.

1. Brute-force textbook loops in plain Python floats (float64), written from
   docs/algorithms.md §2.2-2.7 and §4.3-4.6 without importing spam_lowmem.schedules.
2. Reductions to torch.optim.Adam / AdamW, with the eps and weight-decay conventions
   derived explicitly.
3. Properties: resets, warmup factor, clipping, holdoff, stale reset step, non-finite
   policies, bf16 storage, parameter groups, validation.
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
import types
from pathlib import Path

import pytest
import torch


def _load_reference() -> types.ModuleType:
    try:
        return importlib.import_module("spam_lowmem.reference")
    except ImportError:
        # The package __init__ needs the compiled extension; the oracle does not. Load the
        # pure-Python modules under a bare package (only when the extension is missing).
        for name in [n for n in sys.modules if n == "spam_lowmem" or n.startswith("spam_lowmem.")]:
            del sys.modules[name]
        pkg = types.ModuleType("spam_lowmem")
        pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "spam_lowmem")]
        sys.modules["spam_lowmem"] = pkg
        return importlib.import_module("spam_lowmem.reference")


_ref = _load_reference()
ReferenceSPAM = _ref.ReferenceSPAM
ReferenceStableSPAM = _ref.ReferenceStableSPAM


def _grads(steps: int, numel: int, seed: int, spike_every: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        g = torch.randn(numel, generator=gen)
        if spike_every and i % spike_every == spike_every - 1:
            g[i % numel] *= 30.0
        out.append(g)
    return out


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ----------------------------------------------------------------------------- 1. textbook
def textbook_spam(p0, grads, lr, beta1, beta2, eps, wd, theta, dT, N, delay, reset_t=False):
    """docs/algorithms.md §2.2-2.5 literally: the authors' counters (total_step, current_step).
    ``reset_t``: the §11 clean-up that also restarts the bias-correction count t."""
    p, m, v = list(p0), [0.0] * len(p0), [0.0] * len(p0)
    t, total_step, current_step = 0, 0, N + 1
    clips = []
    for g in grads:
        n = total_step + 1
        j = current_step
        s = 1.0 - (0.99 * 0.5 * (1.0 + math.cos(math.pi * j / (N + 1))) if j < N else 0.0)
        if dT and n % dT == 0:
            m, v = [0.0] * len(p), [0.0] * len(p)
            t = 0 if reset_t else t
        t += 1
        clip_on = theta != 0 and n >= delay and (dT == 0 or n % dT >= delay)
        count = 0
        step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        for i, gi in enumerate(g):
            if clip_on and gi * gi > theta * v[i]:
                gi = math.copysign(math.sqrt(theta * v[i]), gi)
                count += 1
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
            p[i] -= step_size * s * m[i] / (math.sqrt(v[i]) + eps)
            p[i] -= lr * wd * p[i]
        clips.append(count)
        total_step += 1  # noqa: SIM113 (the authors' counter, kept as they write it)
        current_step += 1
        if dT and (total_step + 1) % dT == 0:
            current_step = 0
    return p, m, v, clips


def textbook_stable(p0, grads, lr, betas, gammas, eps, wd, dT, total_T, eta, stale, restart):
    """docs/algorithms.md §4.3-4.6. ``stale``/``restart``: the §4.5a/b as-implemented behaviour."""
    beta1, beta2 = betas
    p, m, v = list(p0), [0.0] * len(p0), [0.0] * len(p0)
    k = ks = 0
    M = mu = nu = 0.0
    clips = []
    for T, g in enumerate(grads, start=1):
        sc = eta + (1 - eta) * 0.5 * (1 + math.cos(math.pi * T / (total_T + 1))) if total_T else 1.0
        p = [x * (1 - lr * wd) for x in p]
        k += 1
        ks += 1
        gmax = max(abs(x) for x in g)
        M = gammas[2] * M + (1 - gammas[2]) * gmax
        thr = M / (1 - gammas[2] ** ks)
        clips.append(sum(abs(x) > thr for x in g))
        g = [x * thr / gmax if abs(x) > thr else x for x in g]
        norm = math.sqrt(sum(x * x for x in g))
        g1 = (beta1 if gammas[0] == -1 else gammas[0]) * sc
        mu = g1 * mu + (1 - g1) * norm
        nu = gammas[1] * nu + (1 - gammas[1]) * norm**2
        c = (mu / (1 - g1**ks)) / (math.sqrt(nu / (1 - gammas[1] ** ks)) + eps)
        if norm > 0:
            g = [x / norm * c for x in g]
        reset = dT and T % dT == 0
        if reset:
            k = 1
            if restart:
                ks = 1
            if not stale:
                m, v = [0.0] * len(p), [0.0] * len(p)
        b1 = beta1 * sc
        m = [b1 * a + (1 - b1) * x for a, x in zip(m, g)]
        v = [beta2 * a + (1 - beta2) * x * x for a, x in zip(v, g)]
        p = [x - lr / (1 - b1**k) * a / (math.sqrt(b) / math.sqrt(1 - beta2**k) + eps) for x, a, b in zip(p, m, v)]
        if reset and stale:
            m, v = [0.0] * len(p), [0.0] * len(p)
    return p, m, v, clips


def _run(opt_cls, p0, grads, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = opt_cls([p], **kw)
    counts = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        counts.append(opt.last_counts["clipped"])
    return p.detach(), opt.state[p], counts


@pytest.mark.parametrize("wd,reset_bias", [(0.0, False), (0.05, False), (0.05, True)])
def test_spam_matches_textbook(wd, reset_bias):
    p0 = torch.randn(5, generator=torch.Generator().manual_seed(0))
    grads = _grads(60, 5, seed=1, spike_every=4)
    kw = dict(
        lr=1e-2,
        betas=(0.8, 0.9),
        eps=1e-6,
        weight_decay=wd,
        threshold=3.0,
        reset_interval=25,
        warmup_steps=7,
        clip_delay=3,
    )
    p, state, counts = _run(ReferenceSPAM, p0, grads, reset_bias_correction=reset_bias, **kw)
    ep, em, ev, eclips = textbook_spam(
        p0.tolist(), [g.tolist() for g in grads], 1e-2, 0.8, 0.9, 1e-6, wd, 3.0, 25, 7, 3, reset_t=reset_bias
    )
    assert counts == eclips
    assert 0 < sum(counts) < 60 * 5
    torch.testing.assert_close(p, torch.tensor(ep), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg"], torch.tensor(em), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"], torch.tensor(ev), rtol=1e-5, atol=1e-8)
    assert state["step"] == (11 if reset_bias else 60)  # last reset at call 50


@pytest.mark.parametrize(
    "stale,restart,gammas",
    [(True, True, (0.7, 0.9, 0.999)), (False, False, (0.85, 0.99, 0.9)), (True, False, (-1, 0.9, 0.99))],
)
def test_stable_spam_matches_textbook(stale, restart, gammas):
    p0 = torch.randn(5, generator=torch.Generator().manual_seed(2))
    grads = _grads(60, 5, seed=3, spike_every=5)
    kw = dict(
        lr=1e-2,
        betas=(0.9, 0.999),
        gammas=gammas,
        eps=1e-8,
        weight_decay=0.01,
        reset_interval=20,
        total_steps=60,
        eta_min=0.5,
    )
    p, state, counts = _run(ReferenceStableSPAM, p0, grads, stale_reset_step=stale, restart_stat_counts=restart, **kw)
    ep, em, ev, eclips = textbook_stable(
        p0.tolist(), [g.tolist() for g in grads], 1e-2, (0.9, 0.999), gammas, 1e-8, 0.01, 20, 60, 0.5, stale, restart
    )
    assert counts == eclips
    assert sum(counts) > 0
    torch.testing.assert_close(p, torch.tensor(ep), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg"], torch.tensor(em), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(state["exp_avg_sq"], torch.tensor(ev), rtol=1e-4, atol=1e-8)
    assert state["step"] == 1  # call 60 is a reset call: k = 1 in both modes
    assert state["stat_step"] == (1 if restart else 60)
    if stale:
        assert torch.count_nonzero(state["exp_avg"]) == 0


# ------------------------------------------------------------------ 2. reductions to torch
def _adam_run(p0, grads, opt_kw, per_step=None, post=None):
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.Adam([p], foreach=False, **opt_kw)
    for t, g in enumerate(grads, start=1):
        if per_step:
            per_step(opt.param_groups[0], t)
        p.grad = g.clone()
        opt.step()
        if post:
            post(p)
    return p.detach()


def test_spam_without_clip_and_reset_is_adam_with_eps0():
    """SPAM step = lr*sqrt(bc2)/bc1 * m/(sqrt(v)+eps) = lr/bc1 * m/(sqrt(v)/sqrt(bc2) + eps/sqrt(bc2))."""
    p0, grads = torch.randn(64), _grads(25, 64, seed=4)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    p, _, _ = _run(ReferenceSPAM, p0, grads, spike_clipping=False, reset_interval=0, **kw)
    torch.testing.assert_close(p, _adam_run(p0, grads, kw), rtol=1e-6, atol=1e-7)


def test_spam_eps_is_torch_eps_over_sqrt_bc2():
    """With eps > 0, SPAM equals torch Adam whose eps is eps/sqrt(1-beta2^t) at step t."""
    p0, grads = torch.randn(64), [g * 1e-5 for g in _grads(25, 64, seed=5)]  # eps ~ sqrt(v)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
    p, _, _ = _run(ReferenceSPAM, p0, grads, spike_clipping=False, reset_interval=0, **kw)

    def eps_t(group, t):
        group["eps"] = 1e-6 / math.sqrt(1 - 0.999**t)

    matched = _adam_run(p0, grads, kw, per_step=eps_t)
    torch.testing.assert_close(p, matched, rtol=2e-6, atol=2e-7)
    plain = _adam_run(p0, grads, kw)  # torch's constant eps: a visibly different update
    assert ((p - p0) - (plain - p0)).abs().max() > 0.1 * (p - p0).abs().max()


def test_spam_weight_decay_after_update_vs_adamw_before():
    lr, wd = 1e-2, 0.5
    p0, grads = torch.randn(64), _grads(20, 64, seed=6)
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=0.0)
    p, _, _ = _run(ReferenceSPAM, p0, grads, spike_clipping=False, reset_interval=0, weight_decay=wd, **kw)
    # SPAM: p <- (p - u) - lr*wd*(p - u): torch Adam, then the decay on the stepped p.
    after = _adam_run(p0, grads, kw, post=lambda q: q.data.sub_(q.data * (lr * wd)))
    torch.testing.assert_close(p, after, rtol=1e-6, atol=1e-6)
    # torch AdamW decays first: one step differs by exactly lr*wd*u, u the Adam update.
    p1, _, _ = _run(ReferenceSPAM, p0, grads[:1], spike_clipping=False, reset_interval=0, weight_decay=wd, **kw)
    adamw = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([adamw], weight_decay=wd, foreach=False, **kw)
    adamw.grad = grads[0].clone()
    opt.step()
    u = p0 - _adam_run(p0, grads[:1], kw)
    torch.testing.assert_close(p1 - adamw.detach(), lr * wd * u, rtol=2e-2, atol=2e-8)


@pytest.mark.parametrize("total_steps", [None, 30])
def test_stable_spam_with_constant_max_and_norm_is_adamw(total_steps):
    """Gradients that are signed permutations of one vector have a constant max|g| and norm R,
    so AdaClip is the identity (M_hat = max|g|) and AdaGN scales g by c/R, with c from the
    scalar EMAs below (c = R/(R+eps) when sc = 1). What remains is torch AdamW, with
    decoupled weight decay first, eps after the bias correction and beta1 decayed by sc."""
    base = torch.linspace(0.2, 1.5, 16)
    gen = torch.Generator().manual_seed(7)
    grads = [
        base[torch.randperm(16, generator=gen)] * torch.where(torch.rand(16, generator=gen) < 0.5, -1.0, 1.0)
        for _ in range(30)
    ]
    R = float(base.double().norm())
    lr, wd, eps, (beta1, beta2), (gm1, gm2, gm3) = 1e-2, 0.1, 1e-8, (0.9, 0.999), (0.7, 0.9, 0.999)
    p0 = torch.randn(16, generator=gen)
    p, _, _ = _run(
        ReferenceStableSPAM,
        p0,
        grads,
        lr=lr,
        betas=(beta1, beta2),
        gammas=(gm1, gm2, gm3),
        eps=eps,
        weight_decay=wd,
        reset_interval=0,
        total_steps=total_steps,
    )

    q = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([q], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd, foreach=False)
    mu = nu = 0.0
    for t, g in enumerate(grads, start=1):
        sc = 0.5 + 0.25 * (1 + math.cos(math.pi * t / (total_steps + 1))) if total_steps else 1.0
        g1 = gm1 * sc
        mu, nu = g1 * mu + (1 - g1) * R, gm2 * nu + (1 - gm2) * R * R
        c = (mu / (1 - g1**t)) / (math.sqrt(nu / (1 - gm2**t)) + eps)
        opt.param_groups[0]["betas"] = (beta1 * sc, beta2)
        q.grad = (g.double() / R * c).float()
        opt.step()
    torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 3. properties
@pytest.mark.parametrize("reset_bias_correction", [False, True])
def test_spam_reset_zeroes_moments(reset_bias_correction):
    p = torch.nn.Parameter(torch.randn(32))
    opt = ReferenceSPAM(
        [p], betas=(0.9, 0.99), reset_interval=4, clip_delay=1, reset_bias_correction=reset_bias_correction
    )
    for n, g in enumerate(_grads(12, 32, seed=8), start=1):
        p.grad = g
        opt.step()
        st = opt.state[p]
        assert opt.param_groups[0]["calls"] == n
        if n % 4 == 0:  # m, v restarted from exact zeros: m = (1-b1) g, v = (1-b2) g^2
            assert torch.equal(st["exp_avg"], _f32(1 - 0.9) * g)
            assert torch.equal(st["exp_avg_sq"], _f32(1 - 0.99) * (g * g))
        else:
            assert not torch.equal(st["exp_avg"], _f32(1 - 0.9) * g)
        assert st["step"] == (n % 4 + 1 if reset_bias_correction and n >= 4 else n)


def test_spam_warmup_factor():
    """s = 0.01 on reset calls, the cosine of §2.3 in between, 1 after warmup_steps."""
    lr, b1, b2, eps, dT, N = 1e-2, 0.9, 0.999, 1e-6, 10, 4
    p = torch.nn.Parameter(torch.zeros(8))
    opt = ReferenceSPAM([p], lr=lr, betas=(b1, b2), eps=eps, reset_interval=dT, warmup_steps=N, spike_clipping=False)
    for n, g in enumerate(_grads(30, 8, seed=9), start=1):
        p.data.zero_()
        p.grad = g
        opt.step()
        st = opt.state[p]
        u = st["exp_avg"].double() / (st["exp_avg_sq"].double().sqrt() + eps)
        s = (-p.detach().double() / (lr * math.sqrt(1 - b2**n) / (1 - b1**n) * u)).mean().item()
        j = n % dT
        expected = 1.0 if n < dT or j >= N else 1 - 0.99 * 0.5 * (1 + math.cos(math.pi * j / (N + 1)))
        assert s == pytest.approx(expected, rel=1e-5), n
        if n >= dT and j == 0:
            assert s == pytest.approx(0.01, rel=1e-5)


def test_spam_clipping_caps_at_theta_v_prev():
    theta = 4.0
    p = torch.nn.Parameter(torch.randn(16))
    opt = ReferenceSPAM([p], betas=(0.9, 0.9), threshold=theta, reset_interval=0, clip_delay=2)
    for g in _grads(5, 16, seed=10):
        p.grad = g
        opt.step()
    m_prev, v_prev = opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()
    g = torch.randn(16, generator=torch.Generator().manual_seed(11)) * 0.1
    g[[0, 5, 9]] = torch.tensor([100.0, -80.0, 50.0])
    p.grad = g
    opt.step()
    spike = g * g > theta * v_prev
    assert spike.sum().item() == opt.last_counts["clipped"] >= 3
    g_used = torch.where(spike, torch.sign(g) * torch.sqrt(theta * v_prev), g)
    assert torch.all(g_used * g_used <= theta * v_prev * (1 + 1e-6) + (~spike) * g * g)
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.9 * m_prev + 0.1 * g_used, rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], 0.9 * v_prev + 0.1 * g_used**2, rtol=1e-6, atol=0)


def test_spam_no_clipping_in_holdoff():
    p = torch.nn.Parameter(torch.randn(16))
    opt = ReferenceSPAM([p], threshold=1.0, reset_interval=10, clip_delay=4)
    clipped = {}
    for n in range(1, 26):
        g = torch.full((16,), 1e-3)
        g[n % 16] = 1e3  # a spike every call
        p.grad = g
        opt.step()
        clipped[n] = opt.last_counts["clipped"]
    holdoff = {1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23}
    assert all(clipped[n] == 0 for n in holdoff)
    assert all(clipped[n] > 0 for n in set(clipped) - holdoff)


def _stable_opt(p, **kw):
    base = dict(lr=1e-2, gammas=(0.7, 0.9, 0.99), weight_decay=0.1, reset_interval=3)
    return ReferenceStableSPAM([p], **{**base, **kw})


def test_stable_spam_stale_reset_step():
    """§4.5a: the reset call is a normal update with Adam count k = 1 on the OLD moments,
    after which zeros are stored; §4.5b: the statistics' count restarts too."""
    grads = _grads(4, 32, seed=12)
    p = torch.nn.Parameter(torch.randn(32))
    twin = torch.nn.Parameter(p.detach().clone())
    opt, ctl = _stable_opt(p), _stable_opt(twin, reset_interval=0)
    for g in grads[:2]:
        p.grad, twin.grad = g.clone(), g.clone()
        opt.step()
        ctl.step()
    ctl.state[twin]["step"] = 0  # so the control's next call uses k = 1, without a reset
    p.grad, twin.grad = grads[2].clone(), grads[2].clone()
    opt.step()
    ctl.step()
    st = opt.state[p]
    assert torch.equal(p, twin)
    assert torch.equal(st["grad_stats"], ctl.state[twin]["grad_stats"])
    assert torch.count_nonzero(st["exp_avg"]) == 0 and torch.count_nonzero(st["exp_avg_sq"]) == 0
    assert torch.count_nonzero(ctl.state[twin]["exp_avg"]) == 32
    assert st["step"] == 1 and st["stat_step"] == 1
    p.grad = grads[3]
    opt.step()
    assert st["step"] == 2 and st["stat_step"] == 2


def test_stable_spam_clean_reset():
    p = torch.nn.Parameter(torch.randn(32))
    opt = _stable_opt(p, stale_reset_step=False, restart_stat_counts=False)
    for g in _grads(3, 32, seed=13):
        p.grad = g
        opt.step()
    st = opt.state[p]
    assert st["step"] == 1 and st["stat_step"] == 3
    # The moments restarted from zero before the update: v = (1-beta2) gn^2, m = (1-beta1) gn.
    gn = st["exp_avg"] / _f32(1 - 0.9)
    torch.testing.assert_close(st["exp_avg_sq"], _f32(1 - 0.999) * gn * gn, rtol=1e-5, atol=0)


def test_spam_nonfinite_skip_and_propagate():
    grads = _grads(6, 16, seed=14)
    bad = grads[5].clone()
    bad[1], bad[3] = float("nan"), float("inf")
    p = torch.nn.Parameter(torch.randn(16))
    opt = ReferenceSPAM([p], reset_interval=0, clip_delay=2, threshold=50.0)
    for g in grads[:5]:
        p.grad = g
        opt.step()
    before = [p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()]
    p.grad = bad
    opt.step()
    after = [p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]
    for b, a in zip(before, after):
        assert torch.equal(a[[1, 3]], b[[1, 3]])
        assert torch.all(a[[0, 2, 4]] != b[[0, 2, 4]]) and torch.isfinite(a).all()
    assert opt.last_counts["nonfinite"] == 2
    # A reset call still zeroes m, v of a skipped entry.
    opt2 = ReferenceSPAM([q := torch.nn.Parameter(torch.randn(16))], reset_interval=2)
    q.grad = grads[0]
    opt2.step()
    q0 = q.detach().clone()
    q.grad = bad
    opt2.step()
    assert opt2.state[q]["exp_avg"][1] == 0 and opt2.state[q]["exp_avg_sq"][3] == 0 and q[1] == q0[1]
    # propagate: plain arithmetic, the NaN reaches p at its own entry only.
    r = torch.nn.Parameter(torch.randn(16))
    opt3 = ReferenceSPAM([r], nonfinite="propagate", reset_interval=0)
    r.grad = bad
    opt3.step()
    assert torch.isnan(r[1]) and torch.isfinite(r[[0, 2, 4]]).all()
    assert opt3.last_counts["nonfinite"] == 2


def test_stable_spam_nonfinite_skip_and_propagate():
    g = torch.randn(32, generator=torch.Generator().manual_seed(15))
    bad, zeroed = g.clone(), g.clone()
    bad[[2, 7]] = torch.tensor([float("nan"), float("-inf")])
    zeroed[[2, 7]] = 0.0
    p = torch.nn.Parameter(torch.randn(32))
    twin = torch.nn.Parameter(p.detach().clone())
    p_init = p.detach().clone()
    opt, ctl = _stable_opt(p), _stable_opt(twin)
    for gg, pp, oo in ((bad, p, opt), (zeroed, twin, ctl)):
        pp.grad = gg
        oo.step()
    # Skipped entries are left out of the reductions, exactly like zeros ...
    assert torch.equal(opt.state[p]["grad_stats"], ctl.state[twin]["grad_stats"])
    keep = torch.ones(32, dtype=torch.bool)
    keep[[2, 7]] = False
    assert torch.equal(p[keep], twin[keep])
    # ... and their p, m, v do not move.
    assert torch.equal(p[~keep], p_init[~keep]) and not torch.equal(twin[~keep], p_init[~keep])
    assert torch.count_nonzero(opt.state[p]["exp_avg"][~keep]) == 0
    assert torch.count_nonzero(opt.state[p]["exp_avg"][keep]) == 30
    assert opt.last_counts["nonfinite"] == 2
    # propagate (authors' arithmetic): the NaN enters max|g| and the norm, so M, mu, nu go
    # NaN; `norm > 0` is False for a NaN norm, so this call skips the normalisation, and
    # from the next call on c is NaN and the whole tensor goes NaN.
    r = torch.nn.Parameter(torch.randn(32))
    opt3 = _stable_opt(r, nonfinite="propagate")
    r.grad = bad
    opt3.step()
    assert torch.isnan(opt3.state[r]["grad_stats"]).all()
    assert torch.isnan(r[~keep]).all() and torch.isfinite(r[keep]).all()
    r.grad = g
    opt3.step()
    assert torch.isnan(r).all()


@pytest.mark.parametrize("cls", [ReferenceSPAM, ReferenceStableSPAM])
def test_bf16_storage(cls):
    """bf16 params: states bf16 (grad_stats fp32); one step = fp32 math then rounding."""
    p16 = torch.nn.Parameter(torch.randn(64).bfloat16())
    p32 = torch.nn.Parameter(p16.detach().float())
    g = torch.randn(64).bfloat16()
    kw = dict(lr=1e-2, weight_decay=0.1)
    o16, o32 = cls([p16], **kw), cls([p32], **kw)
    p16.grad, p32.grad = g, g.float()
    o16.step()
    o32.step()
    s16, s32 = o16.state[p16], o32.state[p32]
    assert s16["exp_avg"].dtype == s16["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.equal(p16, p32.detach().bfloat16())
    assert torch.equal(s16["exp_avg"], s32["exp_avg"].bfloat16())
    assert torch.equal(s16["exp_avg_sq"], s32["exp_avg_sq"].bfloat16())
    if cls is ReferenceStableSPAM:
        assert s16["grad_stats"].dtype == torch.float32 and s16["grad_stats"].shape == (3,)
        assert torch.equal(s16["grad_stats"], s32["grad_stats"])


@pytest.mark.parametrize(
    "cls,g0,g1",
    [
        (
            ReferenceSPAM,
            dict(lr=1e-2, threshold=2.0, reset_interval=5, clip_delay=2),
            dict(lr=3e-3, betas=(0.8, 0.95), threshold=10.0, reset_interval=7, warmup_steps=3),
        ),
        (
            ReferenceStableSPAM,
            dict(lr=1e-2, reset_interval=5, total_steps=20),
            dict(lr=3e-3, betas=(0.8, 0.95), gammas=(0.85, 0.99, 0.9), reset_interval=0, weight_decay=0.1),
        ),
    ],
)
def test_param_groups_are_independent(cls, g0, g1):
    a, b = torch.randn(8), torch.randn(3, 4)
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    sa, sb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
    both = cls([{"params": [pa], **g0}, {"params": [pb], **g1}])
    one, two = cls([sa], **g0), cls([sb], **g1)
    for t, (ga, gb) in enumerate(zip(_grads(15, 8, 16), _grads(15, 12, 17))):
        pa.grad, sa.grad = ga.clone(), ga.clone()
        gb_t = None if t in (3, 4) else gb.view(3, 4)  # a param without grad is skipped ...
        pb.grad, sb.grad = gb_t, (None if gb_t is None else gb_t.clone())
        both.step()
        one.step()
        two.step()
    assert torch.equal(pa, sa) and torch.equal(pb, sb)
    assert [g["calls"] for g in both.param_groups] == [15, 15]  # ... but the calls still count
    assert both.state[pb]["step"] == two.state[sb]["step"]


@pytest.mark.parametrize(
    "cls,kw",
    [
        (ReferenceSPAM, dict(lr=-1.0)),
        (ReferenceSPAM, dict(betas=(1.0, 0.9))),
        (ReferenceSPAM, dict(betas=(0.9, -0.1))),
        (ReferenceSPAM, dict(eps=-1e-8)),
        (ReferenceSPAM, dict(weight_decay=-0.1)),
        (ReferenceSPAM, dict(threshold=0.0)),
        (ReferenceSPAM, dict(reset_interval=-1)),
        (ReferenceSPAM, dict(warmup_steps=-1)),
        (ReferenceSPAM, dict(clip_delay=-2)),
        (ReferenceSPAM, dict(nonfinite="ignore")),
        (ReferenceStableSPAM, dict(lr=-1.0)),
        (ReferenceStableSPAM, dict(gammas=(1.0, 0.9, 0.9))),
        (ReferenceStableSPAM, dict(gammas=(0.7, 0.9, 1.5))),
        (ReferenceStableSPAM, dict(total_steps=0)),
        (ReferenceStableSPAM, dict(eta_min=1.5)),
        (ReferenceStableSPAM, dict(nonfinite="zero")),
        (ReferenceStableSPAM, dict(reset_interval=-5)),
        (ReferenceStableSPAM, dict(eps=-1.0)),
    ],
)
def test_invalid_hyperparameters(cls, kw):
    with pytest.raises(ValueError):
        cls([torch.nn.Parameter(torch.zeros(2))], **kw)
    with pytest.raises(ValueError):  # also per group
        cls([{"params": [torch.nn.Parameter(torch.zeros(2))], **kw}])


def test_threshold_unchecked_without_clipping_and_sparse_grads_rejected():
    ReferenceSPAM([torch.nn.Parameter(torch.zeros(2))], threshold=0.0, spike_clipping=False)
    for cls in (ReferenceSPAM, ReferenceStableSPAM):
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.zeros(4).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            cls([p]).step()


@pytest.mark.parametrize("cls", [ReferenceSPAM, ReferenceStableSPAM])
def test_state_dict_round_trip(cls):
    grads = _grads(12, 8, seed=18)
    p, q = torch.nn.Parameter(torch.randn(8)), None
    opt = cls([p], reset_interval=4, lr=1e-2)
    for g in grads[:6]:
        p.grad = g
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = cls([q], reset_interval=4, lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares tensors otherwise
    assert opt2.param_groups[0]["calls"] == 6
    for g in grads[6:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    assert torch.equal(p, q)
