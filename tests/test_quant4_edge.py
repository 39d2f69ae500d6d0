"""4-bit quantisers at the edges: non-finite groups, fp32 overflow, denormals, huge group
sizes, corrupt packed checkpoints, and the transformers save/load round trip of packed models.
Every check compares real numbers with the torch reference (spam_lowmem.reference.quant4) or
with a brute-force loop over the group's finite entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.dlpack import to_dlpack

import spam_lowmem as sl
import spam_lowmem.reference.quant4 as R
from spam_lowmem import _backend
from spam_lowmem import quant4 as q4
from spam_lowmem.nn import QuantLinear, load_quantized, quantize_model

F32 = np.float32
FMAX = float(np.finfo(np.float32).max)
INF, NAN = float("inf"), float("nan")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values (NaN matching NaN) and equal dtype: bit for bit up to the sign of zero."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


# --------------------------------------------------------------------------- brute force
def brute_weight_int4_finite(vals: list[float]) -> list[float]:
    """int4 min-max over the finite entries, non-finite passed through, overflow-safe scale."""
    fin = [F32(v) for v in vals if np.isfinite(v)]
    out = []
    if fin:
        lo, hi = min(fin), max(fin)
        with np.errstate(over="ignore"):
            span = F32(hi - lo)
        scale = max(span, F32(1e-5)) / F32(15) if np.isfinite(span) else hi / F32(15) - lo / F32(15)
        zero = min(max(-np.round(lo / scale), F32(0)), F32(15))
    for v in vals:
        if not np.isfinite(v):
            out.append(v)
            continue
        q = min(max(np.round(F32(v) / scale) + zero, F32(0)), F32(15))
        with np.errstate(over="ignore"):  # the saturation below is the rule under test
            out.append(float(min(max((q - zero) * scale, F32(-FMAX)), F32(FMAX))))
    return out


def brute_act_finite(vals: list[float], fmt: str) -> list[float]:
    """Top-2 |x| among the finite entries exact, the rest quantised by max|rest| of the finite
    ones, non-finite passed through."""
    fin = [i for i, v in enumerate(vals) if np.isfinite(v)]
    order = sorted(fin, key=lambda i: (-abs(vals[i]), i))
    top = set(order[:2])
    rest = max([F32(abs(vals[i])) for i in order[2:]], default=F32(0))
    out = []
    for i, v in enumerate(vals):
        x = F32(v)
        if not np.isfinite(v) or i in top:
            out.append(v)
        elif fmt == "int4":
            s = max(rest, F32(1e-6))
            with np.errstate(over="ignore"):
                x7 = x * F32(7)
                q = min(max(np.round(x7 / s if np.isfinite(x7) else F32(7) * (x / s)), F32(-8)), F32(7))
                qs = q * s
            out.append(float(qs / F32(7) if np.isfinite(qs) else q * (s / F32(7))))
        else:
            step = max(rest, F32(1e-6)) * F32(0.25)
            out.append(float(min(max(np.round(x / step), F32(-4)), F32(4)) * step))
    return out


def _groups_brute(x: torch.Tensor, g: int, fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    flat = x.float().flatten().tolist()
    out: list[float] = []
    for i in range(0, len(flat), g):
        out += fn(flat[i : i + g])
    return torch.tensor(out, dtype=torch.float32).to(x.dtype).reshape(x.shape)


# --------------------------------------------------------------------------- non-finite rule
NONFINITE_GROUPS = [
    [INF] * 8,
    [-INF] * 8,
    [NAN] * 8,
    [INF, -INF, NAN, INF, NAN, -INF, INF, INF],
    [0.3, NAN, -0.7, 0.1, 0.25, -0.05, 0.9, 0.4],  # one NaN: the rest as if it were absent
    [0.3, INF, -0.7, 0.1, 0.25, -0.05, 0.9, -INF],  # +-Inf neither scale nor take an outlier slot
    [INF, 2.0, NAN, NAN, NAN, NAN, NAN, NAN],  # a single finite entry
    [5.0, -5.0, INF, 1.0, 0.5, -0.25, NAN, 0.125],
]


@pytest.mark.parametrize("group", NONFINITE_GROUPS, ids=range(len(NONFINITE_GROUPS)))
def test_nonfinite_groups_follow_the_rule(group: list[float]) -> None:
    # the group under test between two ordinary groups, which must not notice it
    x = torch.tensor([0.1 * k - 0.35 for k in range(8)] + group + [0.2 * k - 0.6 for k in range(8)])
    cases = [
        (
            q4.fake_quantize_weight(x, group_size=8),
            R.fake_weight_int4(x, 8),
            _groups_brute(x, 8, brute_weight_int4_finite),
        )
    ]
    for fmt in ("int4", "fp4"):
        cases.append(
            (
                q4.fake_quantize_activation(x, fmt=fmt, group_size=8),
                R.fake_act_int4(x, 8) if fmt == "int4" else R.fake_fp4(x, 8),
                _groups_brute(x, 8, lambda v, f=fmt: brute_act_finite(v, f)),
            )
        )
    for kernel, ref, brute in cases:
        assert _same(kernel, brute), (kernel, brute)
        assert _same(ref, brute), (ref, brute)
        nf = ~x.isfinite()
        assert _same(kernel[nf], x[nf])  # non-finite entries pass through unchanged
        assert bool(kernel[x.isfinite()].isfinite().all())
    # an all-Inf group stays Inf (it used to come out as +-1e-5)
    if all(v == INF for v in group):
        assert bool((cases[0][0][8:16] == INF).all())


def test_nan_does_not_change_the_finite_entries() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, generator=gen)
    y = x.clone()
    y[[5, 40]] = NAN
    want_w = _groups_brute(y, 32, brute_weight_int4_finite)
    got_w = q4.fake_quantize_weight(y, group_size=32)
    assert _same(got_w, want_w) and _same(R.fake_weight_int4(y, 32), want_w)
    for fmt in ("int4", "fp4"):
        want = _groups_brute(y, 32, lambda v, f=fmt: brute_act_finite(v, f))
        assert _same(q4.fake_quantize_activation(y, fmt=fmt, group_size=32), want)
    # and the finite entries come out as if the NaN were absent (brute force on the rest)
    keep = y.isfinite()
    for gi in range(2):
        grp = y[32 * gi : 32 * gi + 32]
        k = keep[32 * gi : 32 * gi + 32]
        alone = torch.tensor(brute_weight_int4_finite(grp[k].tolist()))
        assert torch.equal(got_w[32 * gi : 32 * gi + 32][k], alone)


# --------------------------------------------------------------------------- overflow
def test_int4_weight_range_beyond_float_max_stays_finite() -> None:
    # max - min = 6e38 overflows fp32; the old scale was Inf and every output NaN
    x = torch.tensor([3e38, -3e38, 1e38, 0.0, -1e37, 2.5e38, FMAX, -FMAX])
    got = q4.fake_quantize_weight(x, group_size=8)
    assert _same(got, R.fake_weight_int4(x, 8))
    assert _same(got, _groups_brute(x, 8, brute_weight_int4_finite))
    assert bool(got.isfinite().all())
    scale = float(x.max()) / 15 - float(x.min()) / 15
    assert float((got - x).abs().max()) <= scale  # within one step of the input (clamped: saturated)
    p = q4.pack_weight(x.reshape(2, 4), group_size=8)
    assert _same(q4.unpack_weight(p).flatten(), got)  # packing agrees with the fake quantiser
    ref = R.pack(x, "int4", 8)
    for name, t in p.tensors().items():
        assert torch.equal(t, ref[name]), name


def test_int4_activation_near_float_max_stays_finite() -> None:
    # the third-largest |x| is 1e38: x * 7 overflowed and the result was Inf
    x = torch.tensor([3e38, -3.2e38, 1e38, -9e37, 5e37, 1.0, 0.0, -2e38])
    got = q4.fake_quantize_activation(x, group_size=8)
    assert _same(got, R.fake_act_int4(x, 8))
    assert _same(got, _groups_brute(x, 8, lambda v: brute_act_finite(v, "int4")))
    assert bool(got.isfinite().all())


def test_denormals_and_tiny_groups() -> None:
    x = torch.tensor([1e-45, -1e-45, 3e-39, -2e-40, 0.0, -0.0, 1.2e-38, 7e-42] * 4)
    for fmt in ("int4", "fp4"):
        assert _same(
            q4.fake_quantize_weight(x, fmt=fmt, group_size=8),
            R.fake_weight_int4(x, 8) if fmt == "int4" else R.fake_fp4(x, 8),
        )
        assert _same(
            q4.fake_quantize_activation(x, fmt=fmt, group_size=16),
            R.fake_act_int4(x, 16) if fmt == "int4" else R.fake_fp4(x, 16),
        )
    assert _same(q4.fake_quantize_weight(x, group_size=8), _groups_brute(x, 8, brute_weight_int4_finite))


# --------------------------------------------------------------------------- seeded fuzz
def _fuzz_tensor(gen: torch.Generator, n: int) -> torch.Tensor:
    kind = int(torch.randint(0, 8, (), generator=gen))
    r = torch.randn(n, generator=gen)
    if kind == 0:
        x = r
    elif kind == 1:  # magnitudes over the whole fp32 range, denormals included
        x = torch.sign(r) * 10 ** torch.empty(n).uniform_(-45, 38.5, generator=gen)
    elif kind == 2:
        x = r * 1e38  # overflows to +-Inf for |r| > 3.4
    elif kind == 3:
        x = r * 1e-39  # denormal
    elif kind == 4:
        x = r.clone()
        x[torch.rand(n, generator=gen) < 0.2] = 1e38
    elif kind == 5:
        x = r + 1e4  # large offset: zero point saturated
    else:
        x = r
    special = torch.rand(n, generator=gen)
    rate = 0.0 if kind < 6 else 0.03
    x = torch.where(special < rate, torch.full_like(x, INF), x)
    x = torch.where((special >= rate) & (special < 2 * rate), torch.full_like(x, -INF), x)
    if kind == 7:
        x = torch.where(torch.rand(n, generator=gen) < 0.02, torch.full_like(x, NAN), x)
    return x


def test_seeded_fuzz_kernels_equal_reference() -> None:
    gen = torch.Generator().manual_seed(20240607)
    sizes = [1, 2, 3, 4, 8, 16, 32, 64, 256, 1024]
    mismatches = []
    for case in range(300):
        g = sizes[int(torch.randint(0, len(sizes), (), generator=gen))]
        hi = 70_000 if case % 20 == 0 else 3_000
        n = int(torch.randint(0, hi, (), generator=gen)) // g * g
        dtype = (torch.float32, torch.bfloat16, torch.float16)[case % 3]
        x = _fuzz_tensor(gen, n).to(dtype)
        checks = [
            ("w-int4", q4.fake_quantize_weight(x, group_size=g), R.fake_weight_int4(x, g)),
            ("w-fp4", q4.fake_quantize_weight(x, fmt="fp4", group_size=g), R.fake_fp4(x, g)),
        ]
        ga = g + 5  # activations: with a shorter tail group
        checks += [
            ("a-int4", q4.fake_quantize_activation(x, group_size=ga), R.fake_act_int4(x, ga)),
            ("a-fp4", q4.fake_quantize_activation(x, fmt="fp4", group_size=ga), R.fake_fp4(x, ga)),
        ]
        if g % 2 == 0 and n and bool(x.isfinite().all()):
            for fmt in ("int4", "fp4"):
                if fmt == "fp4" and g > q4.FP4_MAX_GROUP:
                    continue
                p = q4.pack_weight(x, fmt=fmt, group_size=g)
                ref = R.pack(x, fmt, g)
                for name, t in p.tensors().items():
                    checks.append((f"pack-{fmt}-{name}", t, ref[name]))
                checks.append((f"unpack-{fmt}", q4.unpack_weight(p, dtype=dtype), R.unpack(ref, fmt, g, (n,), dtype)))
        for name, a, b in checks:
            if not _same(a, b):
                mismatches.append((case, name, n, g, str(dtype)))
    assert not mismatches, mismatches[:10]


# --------------------------------------------------------------------------- group size
def test_huge_group_size_is_bounded_by_the_tensor() -> None:
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    for fmt in ("int4", "fp4"):
        want = R.fake_act_int4(x, 100) if fmt == "int4" else R.fake_fp4(x, 100)
        brute = torch.tensor(brute_act_finite(x.tolist(), fmt))
        assert torch.equal(want, brute)
        for g in (101, 2**31, 2**63, 2**80):  # 2**31 used to abort with std::bad_alloc
            assert torch.equal(q4.fake_quantize_activation(x, fmt=fmt, group_size=g), want)
    # the C++ entry point itself allocates by the real group length, not the requested one
    module = _backend.module_for(x.device)
    out = torch.empty_like(x)
    module.q4_fake_act_int4(to_dlpack(x), to_dlpack(out), 2**40)
    assert torch.equal(out, R.fake_act_int4(x, 100))
    module.q4_fake_weight_int4(to_dlpack(x), to_dlpack(out), 2**40)
    assert torch.equal(out, R.fake_weight_int4(x, 100))
    for bad, err in ((0, ValueError), (-4, ValueError), (2.0, TypeError), (True, TypeError), ("8", TypeError)):
        with pytest.raises(err, match="group_size"):
            q4.fake_quantize_activation(x, group_size=bad)  # type: ignore[arg-type]
    assert q4.fake_quantize_activation(torch.empty(0), group_size=2**31).numel() == 0


# --------------------------------------------------------------------------- corrupt checkpoints
def _fp4_layer() -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear(32, 8, fmt="fp4", group_size=32, storage="packed")


@pytest.mark.parametrize("bad", [32, 40, -1, 32767, -32768])
def test_load_rejects_outlier_index_outside_the_group(bad: int) -> None:
    layer = _fp4_layer()
    sd = layer.state_dict()
    sd["weight_outlier_idx"] = sd["weight_outlier_idx"].clone()
    sd["weight_outlier_idx"][3, 1] = bad
    fresh = _fp4_layer()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="weight_outlier_idx"):
        fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():  # nothing was copied
        assert torch.equal(v, before[k]), k
    x = torch.randn(3, 32)
    with torch.no_grad():
        fresh(x)  # still usable


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("weight_outlier_idx", lambda t: t.to(torch.int32) + 65536, "dtype"),  # would wrap in int16
        ("weight_outlier_idx", lambda t: t[:-1], "shape"),
        ("weight_outlier_val", lambda t: t.double(), "dtype"),
        ("weight_codes", lambda t: t[:-2], "shape"),
        ("weight_scale", lambda t: t.half(), "dtype"),
        ("weight_sr_state", lambda t: t.float(), "weight_sr_state"),
    ],
)
def test_load_rejects_wrong_dtype_or_size(key: str, value, match: str) -> None:  # type: ignore[no-untyped-def]
    sd = _fp4_layer().state_dict()
    sd[key] = value(sd[key])
    with pytest.raises(ValueError, match=match) as info:
        _fp4_layer().load_state_dict(sd)
    assert key in str(info.value)


def test_load_rejects_int4_zero_point_above_15() -> None:
    layer = QuantLinear(32, 8, group_size=32, storage="packed")
    sd = layer.state_dict()
    sd["weight_zero"] = sd["weight_zero"].clone()
    sd["weight_zero"][0] = 200
    with pytest.raises(ValueError, match="weight_zero"):
        QuantLinear(32, 8, group_size=32, storage="packed").load_state_dict(sd)


def test_kernel_checks_outlier_index_it_dereferences() -> None:
    layer = _fp4_layer()
    with torch.no_grad():
        layer(torch.randn(2, 32))
        layer.weight_outlier_idx[2, 0] = 1000  # past load-time validation: edited in place
    with pytest.raises(RuntimeError, match="outlier_idx"), torch.no_grad():
        layer(torch.randn(2, 32))  # used to write out of bounds and crash the process
    p = layer.packed_weight()
    p.outlier_idx[2, 0] = -7
    with pytest.raises(RuntimeError, match="outside the group"):
        q4.unpack_weight(p)


def test_good_state_dict_still_loads_bit_for_bit() -> None:
    layer = _fp4_layer()
    fresh = QuantLinear(32, 8, fmt="fp4", group_size=32, storage="packed")
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    with pytest.raises(RuntimeError, match="size mismatch"):  # a dense layer refuses the codes
        nn.Linear(32, 8).load_state_dict(layer.state_dict(), strict=False)


# --------------------------------------------------------------------------- transformers round trip
def _tiny_llama():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers, cfg


@pytest.mark.parametrize("fmt, storage", [("int4", "packed"), ("fp4", "packed"), ("int4", "fake")])
def test_save_pretrained_load_quantized_round_trip(tmp_path, fmt: str, storage: str) -> None:  # type: ignore[no-untyped-def]
    transformers, cfg = _tiny_llama()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sl.quantize_model(model, fmt=fmt, group_size=64, storage=storage)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    other = transformers.LlamaForCausalLM(cfg)  # shares cfg: must not have been marked quantised
    assert not any(isinstance(m, QuantLinear) for m in other.modules())
    assert not getattr(other.config, "spam_lowmem_quantization", None)

    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)
    assert loaded.model.layers[1].mlp.down_proj.storage == storage
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)  # bit for bit
    again = load_quantized(transformers.LlamaForCausalLM(cfg), tmp_path)  # into a given model
    with torch.no_grad():
        assert torch.equal(again.eval()(ids).logits, want)
    if storage == "packed":
        # the plain loader must not hand back random projection weights
        with pytest.raises(RuntimeError):
            transformers.LlamaForCausalLM.from_pretrained(tmp_path)
        src, dst = model.model.layers[0].self_attn.q_proj, loaded.model.layers[0].self_attn.q_proj
        assert src._sr_step == dst._sr_step and src._sr_seed == dst._sr_seed


def test_load_quantized_refuses_an_unquantised_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    transformers, cfg = _tiny_llama()
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="spam_lowmem_quantization"):
        load_quantized(tmp_path)


def test_quantize_model_without_config_still_works() -> None:
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(16, 16))
    quantize_model(model, group_size=16, storage="packed")
    assert isinstance(model.q_proj, QuantLinear) and not hasattr(model, "config")
