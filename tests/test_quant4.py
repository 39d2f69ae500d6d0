"""4-bit quantisers and QuantLinear (docs/algorithms.md §5): brute force -> reference -> C++/CUDA,
golden nibble layouts, stochastic rounding, STE gradients, tiny-model training, module
behaviour and bad input."""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import spam_lowmem as sl
import spam_lowmem.reference.quant4 as R
from spam_lowmem import quant4 as q4
from spam_lowmem.nn import QuantLinear, attach_packed_requant, quantize_model

F32 = np.float32
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------- brute force
# Element-by-element loops in numpy float32 scalars (IEEE fp32, np.round = half to even):
# an oracle independent of the vectorised torch reference.
def _groups(flat: list[float], g: int) -> list[list[F32]]:
    return [[F32(v) for v in flat[i : i + g]] for i in range(0, len(flat), g)]  # last may be short


def brute_weight_int4(w: torch.Tensor, g: int) -> list[float]:
    out: list[float] = []
    for grp in _groups(w.float().flatten().tolist(), g):
        lo, hi = min(grp), max(grp)
        scale = max(F32(hi - lo), F32(1e-5)) / F32(15)
        zero = min(max(-np.round(lo / scale), F32(0)), F32(15))
        for v in grp:
            q = min(max(np.round(v / scale) + zero, F32(0)), F32(15))
            out.append(float((q - zero) * scale))
    return out


def brute_top2(grp: list[F32]) -> tuple[set[int], F32]:
    order = sorted(range(len(grp)), key=lambda i: (-abs(grp[i]), i))  # ties: lower index first
    top = set(order[:2])
    rest = [abs(grp[i]) for i in order[2:]]
    return top, (max(rest) if rest else F32(0))


def brute_act(x: torch.Tensor, g: int, fmt: str) -> list[float]:
    out: list[float] = []
    for grp in _groups(x.float().flatten().tolist(), g):
        top, rest = brute_top2(grp)
        for i, v in enumerate(grp):
            if i in top:
                out.append(float(v))
            elif fmt == "int4":
                scale = max(rest, F32(1e-6))
                q = min(max(np.round(v * F32(7) / scale), F32(-8)), F32(7))
                out.append(float(q * scale / F32(7)))
            else:
                step = max(rest, F32(1e-6)) * F32(0.25)
                out.append(float(min(max(np.round(v / step), F32(-4)), F32(4)) * step))
    return out


def _with_ties(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values on a 1/8 grid (many exact .5-step ties) plus planted outliers and equal maxima."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-12, 13, shape, generator=gen).float() / 8
    flat = x.view(-1)
    flat[3], flat[5], flat[11] = 40.0, -40.0, 40.0  # tied outliers: the lower indices win
    return x


@pytest.mark.parametrize("g", [3, 8, 12, 20])
def test_weight_int4_brute_force(g: int) -> None:
    w = torch.cat([_with_ties((4, 15)).flatten(), torch.randn(60)]).reshape(8, 15)  # groups straddle rows
    if w.numel() % g:
        pytest.skip("weights need divisible groups")
    ours = q4.fake_quantize_weight(w, fmt="int4", group_size=g)
    assert ours.flatten().tolist() == brute_weight_int4(w, g)
    assert torch.equal(R.fake_weight_int4(w, g), ours)


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("g", [2, 7, 16, 256])
def test_activation_brute_force(fmt: str, g: int) -> None:
    x = torch.cat([_with_ties((5, 9)).flatten(), 3 * torch.randn(60)]).reshape(3, 7, 5)  # tail groups
    ours = q4.fake_quantize_activation(x, fmt=fmt, group_size=g)
    assert ours.flatten().tolist() == brute_act(x, g, fmt)
    ref = R.fake_act_int4(x, g) if fmt == "int4" else R.fake_fp4(x, g)
    assert torch.equal(ref, ours)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,g", [((33, 64), 64), ((16, 96), 256), ((7, 10), 14), ((4, 256), 1024)])
def test_cpp_matches_reference_bit_exact(dtype: torch.dtype, shape: tuple[int, int], g: int) -> None:
    x = (torch.randn(shape) * torch.logspace(-2, 1, shape[1])).to(dtype)
    assert torch.equal(q4.fake_quantize_weight(x, fmt="int4", group_size=g), R.fake_weight_int4(x, g))
    assert torch.equal(q4.fake_quantize_weight(x, fmt="fp4", group_size=g), R.fake_fp4(x, g))
    for gg in (g, g + 3):  # + a tail group
        assert torch.equal(q4.fake_quantize_activation(x, fmt="int4", group_size=gg), R.fake_act_int4(x, gg))
        assert torch.equal(q4.fake_quantize_activation(x, fmt="fp4", group_size=gg), R.fake_fp4(x, gg))


# --------------------------------------------------------------------------- packing
def test_pack_golden_int4() -> None:
    # group 0: scale = 1.875/15 = 0.125 exactly, so -0.0625 and -0.1875 are exact ties
    # (-0.5 and -1.5 steps) that round half to even: to 0 and -2 steps
    w = torch.tensor([-1.875, -0.0625, 0.0, -0.1875, 0.0, 1.0, 2.0, 3.0])
    p = q4.pack_weight(w, fmt="int4", group_size=4)
    # group 0: scale 0.125, zero 15, codes [0, 15, 15, 13]; group 1: scale 0.2, zero 0, [0, 5, 10, 15]
    assert p.codes.tolist() == [0xF0, 0xDF, 0x50, 0xFA]
    assert p.zero is not None and p.zero.tolist() == [15, 0]
    assert p.scale.tolist() == [0.125, float(np.float32(3) / np.float32(15))]
    assert q4.unpack_weight(p).tolist()[:4] == [-1.875, 0.0, 0.0, -0.25]
    assert torch.equal(R.pack_nibbles(torch.tensor([1, 2, 15, 0])), torch.tensor([0x21, 0x0F], dtype=torch.uint8))
    assert R.unpack_nibbles(torch.tensor([0x21, 0x0F], dtype=torch.uint8)).tolist() == [1, 2, 15, 0]


def test_pack_golden_fp4() -> None:
    w = torch.tensor([0.125, 4.0, -0.375, 0.0625, -5.0, 0.25, 0.5, -0.1875])
    p = q4.pack_weight(w, fmt="fp4", group_size=8)
    # outliers -5 (idx 4) and 4 (idx 1) store code 4; step = 0.5/4; 0.0625 = 0.5 step -> 0
    assert p.codes.tolist() == [0x45, 0x41, 0x64, 0x28]
    assert p.scale.tolist() == [0.125]
    assert p.outlier_idx is not None and p.outlier_idx.tolist() == [[4, 1]]
    assert p.outlier_val is not None and p.outlier_val.tolist() == [[-5.0, 4.0]]
    assert q4.unpack_weight(p).tolist() == [0.125, 4.0, -0.375, 0.0, -5.0, 0.25, 0.5, -0.25]


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_unpack_equals_fake_and_reference(fmt: str, dtype: torch.dtype) -> None:
    w = torch.randn(48, 40).to(dtype)
    p = q4.pack_weight(w, fmt=fmt, group_size=64)
    ref = R.pack(w, fmt, 64)
    for name, t in p.tensors().items():
        assert torch.equal(t, ref[name].reshape(t.shape)), name
    assert torch.equal(q4.unpack_weight(p, dtype=dtype), q4.fake_quantize_weight(w, fmt=fmt, group_size=64))
    assert torch.equal(q4.unpack_weight(p), R.unpack(ref, fmt, 64, tuple(w.shape)))
    assert p.nbytes() / w.numel() == q4.packed_bytes_per_weight(fmt, 64)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- stochastic rounding
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_requant_matches_reference_and_keeps_unmoved_weights(fmt: str, dtype: torch.dtype) -> None:
    w = torch.randn(32, 64)
    p = q4.pack_weight(w, fmt=fmt, group_size=64)
    work = q4.unpack_weight(p, dtype=dtype)  # the working copy, rounded to its dtype
    before = {k: t.clone() for k, t in p.tensors().items()}
    for step in range(3):  # nothing moved: nothing may change, whatever the working dtype
        q4.requantize_(work, p, seed=7, step=step)
    assert all(torch.equal(t, before[k]) for k, t in p.tensors().items())
    moved = work.float() + 0.05 * torch.randn(w.shape)
    moved.view(-1)[::97] *= 3  # some groups outgrow their window: the scale doubles
    moved = moved.to(dtype)
    ref = R.requant_sr(moved, {k: v.clone() for k, v in p.tensors().items()}, fmt, 64, seed=11, step=3)
    q4.requantize_(moved, p, seed=11, step=3)
    for name, t in p.tensors().items():
        assert torch.equal(t, ref[name].reshape(t.shape)), name
    assert not torch.equal(p.codes, before["codes"])


@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_stochastic_rounding_is_unbiased(fmt: str) -> None:
    # One group replicated K times in one tensor: every copy has the same old grid and the same
    # target values but its own uniforms (they depend on the element index), so the mean over
    # copies estimates E[dequant(requant(w))]. Each draw has variance <= step^2/4, so the mean
    # of K draws has std <= step / (2 sqrt(K)); we allow 5 of those per element (max over 256
    # elements of |N(0,1)| is ~3.5) and 5/sqrt(256) of them for the mean bias over the group.
    g, k = 256, 4096
    base = q4.pack_weight(torch.randn(g), fmt=fmt, group_size=g)
    target = q4.unpack_weight(base) + 0.3 * torch.rand(g) * base.scale  # between lattice points
    target[7] += 4 * float(base.scale)  # and past the window edge: the scale grows
    packed = q4.PackedWeight.empty((k * g,), fmt=fmt, group_size=g)  # type: ignore[arg-type]
    for name, t in packed.tensors().items():
        src = getattr(base, name)
        t.copy_(src.repeat(k, *([1] * (src.dim() - 1))) if name != "codes" else src.repeat(k))
    q4.requantize_(target.repeat(k), packed, seed=2024, step=1)
    draws = q4.unpack_weight(packed).view(k, g)
    step = packed.scale.view(k)[0]
    assert torch.equal(packed.scale, step.expand(k))  # same grid choice in every copy
    err = (draws.mean(0) - target) / step
    sigma = 1 / (2 * k**0.5)
    assert err.abs().max() < 5 * sigma, err.abs().max()
    assert err.mean().abs() < 5 * sigma / g**0.5
    assert (draws != draws[0]).any()  # it is random


# --------------------------------------------------------------------------- STE gradients
@pytest.mark.parametrize("storage", ["fake", "packed"])
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_ste_gradients(storage: str, fmt: str) -> None:
    layer = QuantLinear(64, 24, fmt=fmt, group_size=64, storage=storage)
    x = torch.randn(3, 5, 64, requires_grad=True)
    gy = torch.randn(3, 5, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (layer(x) * gy).sum().backward()
    # the authors' rule, via autograd on the reference formulas with detach-based STE
    qw = R.fake_weight_int4 if fmt == "int4" else R.fake_fp4
    qa = R.fake_act_int4 if fmt == "int4" else R.fake_fp4
    w = (layer.quantized_weight() if storage == "packed" else layer.weight.detach()).clone().requires_grad_()
    wq = w + ((w if storage == "packed" else qw(w, 64)) - w).detach()
    xr = x.detach().clone().requires_grad_()
    xq = xr + (qa(xr.reshape(-1, 64), 64).reshape(xr.shape) - xr).detach()
    assert layer.bias is not None
    b = layer.bias.detach().clone().requires_grad_()
    (torch.nn.functional.linear(xq, wq, b) * gy).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)


# --------------------------------------------------------------------------- training
class TinyLlamaMLP(nn.Module):
    """Projections named as in LLaMA, plus an unquantised head."""

    def __init__(self, d: int = 64, f: int = 128, classes: int = 8) -> None:
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj, self.lm_head = nn.Linear(f, d, bias=False), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.o_proj(torch.tanh(self.q_proj(x)))
        h = h + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.lm_head(h)


@pytest.mark.parametrize("storage", ["fake", "packed"])
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_tiny_model_trains(storage: str, fmt: str) -> None:
    model = quantize_model(TinyLlamaMLP(), fmt=fmt, storage=storage, group_size=64)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.q_proj, QuantLinear)
    opt = sl.StableSPAM(model.parameters(), lr=3e-3) if fmt == "fp4" else torch.optim.AdamW(model.parameters(), lr=3e-3)
    if storage == "packed":
        attach_packed_requant(opt, model)
    x, y = torch.randn(128, 64), torch.randint(0, 8, (128,))
    losses: list[float] = []
    while len(losses) < 60 and (not losses or losses[-1] > 0.5 * losses[0]):  # stop before denormals
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    if storage == "packed":
        assert not model.q_proj.is_materialized and model.q_proj.weight.untyped_storage().nbytes() == 4


def test_llama_quantize_and_train() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg)
    quantize_model(model, storage="packed", group_size=256)
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in model.named_modules() if n}
    assert kinds["q_proj"] == kinds["down_proj"] == "QuantLinear" and kinds["lm_head"] == "Linear"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    attach_packed_requant(opt, model)
    ids = torch.randint(0, 64, (4, 16))
    losses: list[float] = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


# --------------------------------------------------------------------------- module behaviour
def _save_load(obj: object, weights_only: bool) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


@pytest.mark.parametrize("storage", ["fake", "packed"])
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_module_state_dict_copy_save(storage: str, fmt: str) -> None:
    layer = QuantLinear(32, 16, fmt=fmt, group_size=32, storage=storage)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    if storage == "packed":
        attach_packed_requant(opt, layer)
    layer(torch.randn(4, 32)).square().sum().backward()
    opt.step()  # one training step, so the state is not just the initial one
    x = torch.randn(5, 32)
    with torch.no_grad():
        y = layer(x)
    sd = layer.state_dict()
    if storage == "fake":
        assert set(sd) == {"weight", "bias"}
    else:
        assert sd["weight"].numel() == 0  # the marker that makes dense loaders refuse the codes
        assert {"weight_codes", "weight_scale", "weight_sr_state"} <= set(sd)
    fresh = QuantLinear(32, 16, fmt=fmt, group_size=32, storage=storage)
    fresh.load_state_dict(_save_load(sd, weights_only=True))  # type: ignore[arg-type]
    clone = copy.deepcopy(layer)
    pickled = _save_load(layer, weights_only=False)
    with torch.no_grad():
        for other in (fresh, clone, pickled, copy.deepcopy(layer).to("cpu")):
            assert torch.equal(other(x), y)  # type: ignore[operator]
    if storage == "packed":
        assert clone.weight.untyped_storage().nbytes() == 4 and fresh._sr_step == layer._sr_step
        half = copy.deepcopy(layer).half()  # the packed metadata stays fp32, the working dtype changes
        assert half.weight_scale.dtype == torch.float32 and half.weight.dtype == torch.float16
        assert half.bias is not None and half.bias.dtype == torch.float16
        assert torch.equal(half.quantized_weight(torch.float32), layer.quantized_weight())


@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_load_dense_linear_checkpoint(storage: str) -> None:
    lin = nn.Linear(32, 16)
    layer = QuantLinear(32, 16, group_size=32, storage=storage)
    layer.load_state_dict(lin.state_dict())
    torch.testing.assert_close(
        layer.quantized_weight(), q4.fake_quantize_weight(lin.weight, group_size=32), rtol=0, atol=0
    )


# --------------------------------------------------------------------------- bad input
def test_bad_input() -> None:
    w = torch.randn(10, 30)
    with pytest.raises(ValueError, match="does not divide"):
        q4.fake_quantize_weight(w, group_size=256)
    with pytest.raises(ValueError, match="even"):
        q4.pack_weight(torch.randn(9, 3), group_size=3)
    with pytest.raises(ValueError, match="unsupported 4-bit format"):
        q4.fake_quantize_activation(w, fmt="nf4")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        q4.fake_quantize_activation(w, group_size=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        q4.fake_quantize_activation(w, group_size=0)
    with pytest.raises(TypeError, match="dtype"):
        q4.fake_quantize_activation(torch.ones(4, dtype=torch.int32))
    for kwargs, match in [
        ({"weight_bits": 8}, "weight_bits"),
        ({"act_bits": 8}, "act_bits"),
        ({"storage": "int4"}, "storage"),
        ({"group_size": 96}, "does not divide"),
    ]:
        with pytest.raises(ValueError, match=match):
            QuantLinear(16, 16, **{"group_size": 16, **kwargs})  # type: ignore[arg-type]
    model = TinyLlamaMLP()
    with pytest.raises(ValueError, match="no module name ends with"):
        quantize_model(model, targets=("qkv_proj",))
    with pytest.raises(TypeError, match=r"not nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), targets=("0",))
    with pytest.raises(ValueError, match="does not divide"):
        quantize_model(model, group_size=96)
    with torch.no_grad():
        model.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(model)
    assert all(not isinstance(m, QuantLinear) for m in model.modules())  # nothing replaced
    with pytest.raises(ValueError, match="NaN"):
        q4.pack_weight(model.up_proj.weight)
    fake = quantize_model(TinyLlamaMLP(), group_size=64)
    with pytest.raises(ValueError, match="already"):
        quantize_model(fake, group_size=64)
    with pytest.raises(ValueError, match="packed"):  # nothing to re-quantise
        attach_packed_requant(torch.optim.SGD(fake.parameters(), lr=0.1), fake)


def test_nonfinite_update_keeps_packed_groups() -> None:
    layer = QuantLinear(32, 8, group_size=32, storage="packed")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    attach_packed_requant(opt, layer)
    before = layer.quantized_weight()
    layer(torch.randn(2, 32)).sum().backward()
    assert layer.weight.grad is not None
    layer.weight.grad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    after = layer.quantized_weight()
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1:], before[1:])
    assert not layer.is_materialized  # the bad working copy was dropped


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(fmt: str, dtype: torch.dtype) -> None:
    w = (torch.randn(96, 160) * torch.logspace(-2, 1, 160)).to(dtype)
    wc = w.cuda()
    assert torch.equal(
        q4.fake_quantize_weight(wc, fmt=fmt, group_size=256).cpu(), q4.fake_quantize_weight(w, fmt=fmt, group_size=256)
    )
    for g in (256, 100, 7):
        assert torch.equal(
            q4.fake_quantize_activation(wc, fmt=fmt, group_size=g).cpu(),
            q4.fake_quantize_activation(w, fmt=fmt, group_size=g),
        )
    p, pc = q4.pack_weight(w, fmt=fmt, group_size=256), q4.pack_weight(wc, fmt=fmt, group_size=256)
    moved = q4.unpack_weight(p) + 0.05 * torch.randn(w.shape)
    q4.requantize_(moved, p, seed=5, step=9)
    q4.requantize_(moved.cuda(), pc, seed=5, step=9)
    for name, t in p.tensors().items():
        assert torch.equal(getattr(pc, name).cpu(), t), name
    assert torch.equal(q4.unpack_weight(pc, dtype=dtype).cpu(), q4.unpack_weight(p, dtype=dtype))
