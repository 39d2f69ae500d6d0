"""Fused packed 4-bit optimizer step (ISSUE 6a): the optimizer steps a packed QuantLinear on
its codes in one pass per group. Checked against the unfused path (materialise -> dense step
-> requantize_), bit for bit; training, resume, no materialisation, and bad input."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

import spam_lowmem as sl
from spam_lowmem import functional as F
from spam_lowmem import quant4 as q4
from spam_lowmem.nn import QuantLinear, attach_packed_requant

OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "adamw": (sl.AdamW, {"weight_decay": 0.1}),
    # small theta and period: the run clips spikes, resets momentum and warms up again
    "spam": (sl.SPAM, {"threshold": 2.0, "reset_interval": 3, "warmup_steps": 2, "clip_delay": 1, "weight_decay": 0.1}),
    "stable_spam": (sl.StableSPAM, {"reset_interval": 3, "total_steps": 6, "weight_decay": 0.1}),
}


def _model(fmt: str, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        QuantLinear(64, 48, fmt=fmt, group_size=32, storage="packed", dtype=dtype, device=device),
        nn.ReLU(),
        QuantLinear(48, 8, fmt=fmt, group_size=16, storage="packed", dtype=dtype, device=device),
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    device = next(model.buffers()).device
    gen = torch.Generator().manual_seed(seed)
    dtype = model[0].weight.dtype
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen).to(device=device, dtype=dtype)
        y = torch.randint(0, 8, (32,), generator=gen).to(device)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _run(
    name: str, fmt: str, dtype: torch.dtype, fused: bool, steps: int = 6, device: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cls, kw = OPTIMIZERS[name]
    model = _model(fmt, dtype, device)
    opt = cls(model.parameters(), lr=1e-2, **kw)
    handle = attach_packed_requant(opt, model, fused=fused)
    assert handle.fused is fused
    _train(model, opt, steps)
    return model.state_dict(), opt.state_dict()


def _assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
    for pid, state in oa["state"].items():
        for key, value in state.items():
            other = ob["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (pid, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_equals_unfused(name: str, fmt: str, dtype: torch.dtype) -> None:
    fused = _run(name, fmt, dtype, fused=True)
    _assert_same(fused, _run(name, fmt, dtype, fused=False))
    start = _model(fmt, dtype).state_dict()
    assert not torch.equal(fused[0]["0.weight_codes"], start["0.weight_codes"])  # it did move
    assert int(fused[0]["0.weight_sr_state"][1]) == 6  # one re-quantisation per step


def test_fused_never_materialises() -> None:
    model = _model("int4", torch.float32)
    opt = sl.StableSPAM(model.parameters(), lr=1e-2)
    attach_packed_requant(opt, model)
    seen: list[bool] = []
    opt.register_step_pre_hook(lambda *_: seen.append(model[0].is_materialized))
    opt.register_step_post_hook(lambda *_: seen.append(model[0].is_materialized))
    _train(model, opt, 2)
    assert seen == [False] * 4
    assert model[0].weight.untyped_storage().nbytes() == 4  # still the 1-element placeholder


@pytest.mark.parametrize("name", ["adamw", "stable_spam"])
def test_fused_training_learns(name: str) -> None:
    cls, kw = OPTIMIZERS[name]
    torch.manual_seed(0)
    model = nn.Sequential(
        QuantLinear(64, 64, group_size=64, storage="packed"),
        nn.Tanh(),
        QuantLinear(64, 8, group_size=64, storage="packed"),
    )
    opt = cls(model.parameters(), lr=3e-3, **{k: v for k, v in kw.items() if k == "weight_decay"})
    assert attach_packed_requant(opt, model).fused
    x, y = torch.randn(128, 64), torch.randint(0, 8, (128,))
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name: str) -> None:
    cls, kw = OPTIMIZERS[name]
    model = _model("int4", torch.float32)
    opt = cls(model.parameters(), lr=1e-2, **kw)
    attach_packed_requant(opt, model)
    _train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=7)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = _model("int4", torch.float32)
    model2.load_state_dict(saved["model"])
    opt2 = cls(model2.parameters(), lr=1e-2, **kw)
    opt2.load_state_dict(saved["opt"])
    assert attach_packed_requant(opt2, model2).fused
    _train(model2, opt2, 3, seed=7)
    _assert_same((model.state_dict(), opt.state_dict()), (model2.state_dict(), opt2.state_dict()))


def test_eight_bit_moments_are_not_fused() -> None:
    model = _model("int4", torch.float32)
    opt = sl.SPAM(model.parameters(), lr=1e-2, state_bits=8, min_8bit_size=256)
    with pytest.raises(NotImplementedError, match="8-bit moments"):
        attach_packed_requant(opt, model, fused=True)
    assert not opt.is_packed(model[0].weight)  # all or nothing
    handle = attach_packed_requant(opt, model)  # default: the unfused path still works
    assert not handle.fused
    _train(model, opt, 2)
    handle.remove()
    # small tensors under min_8bit_size keep dense moments, so they can be fused
    opt32 = sl.SPAM(model.parameters(), lr=1e-2, state_bits=8)
    assert attach_packed_requant(opt32, model).fused


@pytest.mark.filterwarnings("ignore:.*no optimizer re-quantises")
def test_bad_input() -> None:
    model = _model("int4", torch.float32)
    with pytest.raises(TypeError, match="spam_lowmem optimizer"):
        attach_packed_requant(torch.optim.AdamW(model.parameters()), model, fused=True)
    sparse = sl.SPAM([{"params": [model[0].weight], "density": 0.5}], lr=1e-2)
    with pytest.raises(NotImplementedError, match="sparse momentum"):
        attach_packed_requant(sparse, model, fused=True)
    opt = sl.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.attach_packed(nn.Parameter(torch.zeros(2, 2)), model[0])

    layer = model[0]
    layer(torch.randn(2, 64)).sum().backward()
    grad = layer.weight.grad
    m, v = torch.zeros_like(grad), torch.zeros_like(grad)
    step = F.PackedStep(layer.packed_weight(), 1, 0)
    common = dict(
        exp_avg_sqs=[v],
        absmax_m=[torch.empty(0)],
        absmax_v=[torch.empty(0)],
        step_sizes=[1e-3],
        sqrt_bc2s=[0.1],
        counters=torch.zeros(2, dtype=torch.int64),
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_keep=1.0,
        skip_nonfinite=True,
    )
    with pytest.raises(ValueError, match="packed_bad"):
        F.adamw_step([torch.empty(0)], [grad], [m], packed=[step], **common)
    bad = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="empty array"):  # a dense buffer where the dtype goes
        F.adamw_step([torch.zeros_like(grad)], [grad], [m], packed=[step], packed_bad=bad, **common)
    with pytest.raises(TypeError, match="PackedStep"):
        F.adamw_step([torch.empty(0)], [grad], [m], packed=[(1, 2)], packed_bad=bad, **common)
    with pytest.raises(ValueError, match="elements"):  # codes of another shape
        other = F.PackedStep(q4.PackedWeight.empty((4, 8), fmt="int4", group_size=32), 1, 0)
        F.adamw_step([torch.empty(0)], [grad], [m], packed=[other], packed_bad=bad, **common)
    with pytest.raises(ValueError, match="dense"):  # 8-bit moments
        F.adamw_step(
            [torch.empty(0)],
            [grad],
            [torch.zeros(grad.numel(), dtype=torch.uint8)],
            packed=[step],
            packed_bad=bad,
            **{
                **common,
                "exp_avg_sqs": [torch.zeros(grad.numel(), dtype=torch.uint8)],
                "absmax_m": [torch.zeros(grad.numel() // 256 + 1)],
                "absmax_v": [torch.zeros(grad.numel() // 256 + 1)],
            },
        )


def test_nonfinite_update_keeps_packed_groups_fused() -> None:
    layer = QuantLinear(32, 8, group_size=32, storage="packed")
    opt = sl.AdamW(layer.parameters(), lr=0.1, nonfinite="propagate")
    assert attach_packed_requant(opt, layer).fused
    before = layer.quantized_weight()
    layer(torch.randn(2, 32)).sum().backward()
    layer.weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    after = layer.quantized_weight()
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1:], before[1:])
    assert opt.spike_stats()["requant_nonfinite_groups"] == 1


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_fused_matches_cpu(name: str, fmt: str) -> None:
    cpu = _run(name, fmt, torch.float32, fused=True)
    gpu = _run(name, fmt, torch.float32, fused=True, device="cuda")
    for key, value in cpu[0].items():
        if key.endswith(("codes", "zero", "outlier_idx", "sr_state")):
            assert torch.equal(gpu[0][key].cpu(), value), key
    # AdamW/SPAM have no reductions: same bits; Stable-SPAM's norms differ by summation order
    if name != "stable_spam":
        _assert_same(
            cpu,
            (
                {k: v.cpu() for k, v in gpu[0].items()},
                {
                    "state": {
                        i: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                        for i, s in gpu[1]["state"].items()
                    }
                },
            ),
        )
