"""The element-algorithm path (cpp/spam/algorithms.h, docs/design.md §6): the entry's argument
checks, and the worked example of a second algorithm registered through the list, Adam with
L2 decay folded into the gradient (torch.optim.Adam's weight_decay), whose only Python is the
thin class below, checked step by step against a float64 brute-force computation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from spam_lowmem import _C, AdamW
from spam_lowmem import functional as F
from spam_lowmem.hyperparams import AdamWSettings, settings_constructor
from spam_lowmem.optim.base import SpikeAwareOptimizer


class AdamL2Example(SpikeAwareOptimizer):
    """Adam with L2 decay (the core's "adam_l2"): the whole Python side of a new algorithm."""

    KIND = "AdamL2Example"
    ALGORITHM = "adam_l2"
    SETTINGS = AdamWSettings  # lr, betas, eps, weight_decay (and the shared precision keys)
    __init__ = settings_constructor(AdamWSettings)

    def _group_scalars(self, group: dict[str, Any], call: int) -> None:
        """No schedule."""

    # the per-tensor lists of AdamW (bias corrections), which the descriptor shares with it
    _tensor_scalars = AdamW._tensor_scalars

    def _element_hyper(self, group: dict[str, Any], call: None) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"]}


KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
STEPS = 10


def _grads(shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1.0 + k) for k in range(STEPS)]


def _oracle(p0: torch.Tensor, grads: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Adam with L2 decay in float64, written out: (p, m, v) after each step."""
    lr, (b1, b2), eps, wd = KW["lr"], KW["betas"], KW["eps"], KW["weight_decay"]
    p = p0.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    out = []
    for k, g in enumerate(grads, start=1):
        gl = g.double() + wd * p
        m = b1 * m + (1 - b1) * gl
        v = b2 * v + (1 - b2) * gl * gl
        denom = v.sqrt() / math.sqrt(1 - b2**k) + eps
        p = p - lr / (1 - b1**k) * m / denom
        out.append((p.clone(), m.clone(), v.clone()))
    return out


def test_the_list_is_visible_from_python() -> None:
    algorithms = F.element_algorithms()
    assert algorithms["adamw"] == {
        "hyper": ["beta1", "beta2", "eps", "weight_keep"],
        "scalars": ["step_sizes", "sqrt_bc2s"],
    }
    assert algorithms["adam_l2"]["hyper"] == ["beta1", "beta2", "eps", "weight_decay"]


@pytest.mark.parametrize("shape", [(37,), (300, 7)])
def test_example_matches_float64_oracle_step_by_step(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    grads = _grads(shape, seed=1)
    expected = _oracle(p.detach(), grads)
    opt = AdamL2Example([p], **KW)
    for k, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        p64, m64, v64 = expected[k]
        state = opt.state[p]
        assert state["step"] == k + 1
        torch.testing.assert_close(p.detach().double(), p64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["exp_avg"].double(), m64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v64, rtol=1e-5, atol=1e-6)
    assert opt.spike_stats()["clipped"] == 0


def test_example_differs_from_adamw() -> None:
    """The L2 example is other arithmetic than AdamW's decoupled decay, not AdamW renamed."""
    a, b = (torch.nn.Parameter(torch.ones(64)) for _ in range(2))
    opts = AdamL2Example([a], **KW), AdamW([b], **KW)
    for g in _grads((64,), seed=2)[:3]:
        for p, opt in zip((a, b), opts):
            p.grad = g.clone()
            opt.step()
    assert not torch.equal(a.detach(), b.detach())


def test_example_8bit_stays_close_to_32bit() -> None:
    torch.manual_seed(3)
    shape = (4096 + 100,)  # several 256-blocks and a partial one
    p0 = torch.randn(shape)
    grads = _grads(shape, seed=4)
    results = {}
    for bits in (32, 8):
        p = torch.nn.Parameter(p0.clone())
        opt = AdamL2Example([p], **KW, state_bits=bits, min_8bit_size=0)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        if bits == 8:
            assert opt.state[p]["exp_avg_codes"].dtype == torch.uint8
        results[bits] = p.detach() - p0
    change32, change8 = results[32], results[8]
    assert torch.isfinite(change8).all()
    rel = (change8 - change32).norm() / change32.norm()
    assert rel < 0.05, rel


def test_example_skips_nonfinite_entries() -> None:
    p = torch.nn.Parameter(torch.ones(8))
    opt = AdamL2Example([p], **KW)
    g = torch.ones(8)
    g[3] = float("nan")
    p.grad = g
    opt.step()
    assert p[3].item() == 1.0 and p[0].item() != 1.0
    assert opt.state[p]["exp_avg"][3].item() == 0.0
    assert opt.spike_stats()["nonfinite"] == 1


def _batch() -> tuple[Any, list[torch.Tensor]]:
    p, g, m, v, empty = torch.zeros(5), torch.ones(5), torch.zeros(5), torch.zeros(5), torch.empty(0)
    counters = torch.zeros(2, dtype=torch.int64)
    columns = [[to_dlpack(t)] for t in (p, g, m, v, empty, empty)]
    q = [F._map_capsules(signed, torch.device("cpu")) for signed in (True, False)]
    return _C.StepBatch(*columns, to_dlpack(counters), *q), [p, m, v, counters]


HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_keep=1.0)
SCALARS = {"step_sizes": [1e-3], "sqrt_bc2s": [0.1]}


@pytest.mark.parametrize(
    ("algorithm", "hyper", "scalars", "match"),
    [
        ("adamw", {k: v for k, v in HYPER.items() if k != "eps"}, SCALARS, "missing 'eps'"),
        ("adamw", {**HYPER, "lr": 1e-3}, SCALARS, "unknown 'lr'"),
        ("adamw", HYPER, {"step_sizes": [1e-3]}, "missing 'sqrt_bc2s'"),
        ("adamw", HYPER, {**SCALARS, "extra": [1.0]}, "unknown 'extra'"),
        ("adamw", HYPER, {**SCALARS, "step_sizes": [1e-3, 1e-3]}, "step_sizes"),
        ("adam_l2", HYPER, SCALARS, "missing 'weight_decay'"),
        ("nadam", HYPER, SCALARS, "unknown element algorithm 'nadam'"),
    ],
)
def test_entry_checks_keywords_and_lengths(algorithm: str, hyper: dict, scalars: dict, match: str) -> None:
    batch, tensors = _batch()
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match=match):
        _C.step(batch, algorithm, hyper, scalars, True)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)  # nothing ran


def test_entry_rejects_a_non_number() -> None:
    batch, _ = _batch()
    with pytest.raises(TypeError, match="eps"):
        _C.step(batch, "adamw", {**HYPER, "eps": "small"}, SCALARS, True)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [32, 8])
def test_example_cuda_matches_cpu(bits: int) -> None:
    torch.manual_seed(5)
    p0 = torch.randn(3000)
    grads = _grads((3000,), seed=6)
    results = []
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(p0.to(device))
        opt = AdamL2Example([p], **KW, state_bits=bits, min_8bit_size=0)
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)
