"""SPAM sparse momentum (docs/algorithms.md §3): the hash-defined subset, the C++ kernel against the
reference, the schedule of subset changes, memory accounting, state dicts and bad input."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

import spam_lowmem as sl
from spam_lowmem import _C
from spam_lowmem import sparse_subset as S
from spam_lowmem.reference import ReferenceSPAM
from spam_lowmem.testing import assert_close, gradient_stream

SHAPES = [(64, 96), (33, 129), (300, 17)]
KW: dict[str, Any] = dict(
    lr=1e-2, threshold=20.0, reset_interval=40, warmup_steps=10, clip_delay=5, weight_decay=0.01, min_8bit_size=0
)


def make_params(dtype: torch.dtype, shapes: list[tuple[int, int]] = SHAPES) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clone(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def feed(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


# --------------------------------------------------------------------------- the subset
def test_python_and_cpp_hash_agree_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    idx = torch.cat(
        [
            torch.arange(70_000),
            torch.randint(0, 2**32 - 1, (70_000,), generator=gen),
            torch.tensor([2**32 - 1, 2**31, 2**31 - 1]),
        ]
    )
    for seed in (0, 1, 0x9E3779B1, 2**32 - 1, 123456789):
        out = torch.empty_like(idx)
        _C.subset_hash(seed, idx, out)
        assert torch.equal(out, S.subset_hash(seed, idx)), seed
    # a pinned value, so both definitions cannot drift together
    assert S.subset_hash(1, torch.tensor([0, 1])).tolist() == [1364076727, 2789948889]


@pytest.mark.parametrize("density", [0.01, 0.25, 0.43, 0.999])
def test_initial_subset_size_is_exact(density: float) -> None:
    for seed, numel in ((1, 1000), (2, 4097), (3, 512 * 300)):
        rule = S.exact_rule(seed, numel, density)
        assert int(S.subset_mask(rule).sum()) == math.floor(density * numel)


def test_exact_rule_breaks_hash_ties_by_index() -> None:
    # numel > 2^16 with many duplicate-free hashes is the common case; force ties by checking
    # that the rule equals the k smallest (hash, index) pairs computed by a full sort.
    numel, k = 5000, 1234
    rule = S.exact_rule(77, numel, k / numel)
    h = S.subset_hash(77, torch.arange(numel))
    order = sorted(range(numel), key=lambda i: (int(h[i]), i))[:k]
    expected = torch.zeros(numel, dtype=torch.bool)
    expected[order] = True
    assert torch.equal(S.subset_mask(rule), expected)


def test_subset_after_reset_is_binomial_and_uniform() -> None:
    p = nn.Parameter(torch.zeros(256, 384))
    d = 0.25
    opt = sl.SPAM([{"params": [p], "density": d}], reset_interval=2, subset_seed=11)
    n = p.numel()
    sizes = []
    for _ in range(5):  # resets at calls 2 and 4
        p.grad = torch.ones_like(p)
        opt.step()
        mask = S.subset_mask(opt.state[p]["subset"]).view(p.shape)
        sizes.append(int(mask.sum()))
        assert opt.state[p]["exp_avg"].numel() == sizes[-1]
        # uniformity: chi-square of the per-row and per-column counts against their binomial
        # variance e(1-d) (seeded, so deterministic; tolerance: 5 standard deviations of the
        # chi-square distribution around its mean)
        for dim in (0, 1):
            counts = mask.sum(dim=dim).double()
            expected = counts.mean()
            chi2 = float(((counts - expected) ** 2 / (expected * (1 - d))).sum())
            dof = counts.numel() - 1
            assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), (dim, chi2, dof)
    assert sizes[0] == math.floor(d * n)
    sd = math.sqrt(n * d * (1 - d))
    for k in sizes[1:]:
        assert abs(k - d * n) < 6 * sd, (k, d * n, sd)


def test_subset_changes_exactly_on_reset_calls() -> None:
    p = nn.Parameter(torch.randn(40, 50))
    opt = sl.SPAM([{"params": [p], "density": 0.3}], reset_interval=7, subset_seed=5)
    seen = []
    for _ in range(30):
        p.grad = torch.randn_like(p)
        opt.step()
        seen.append(tuple(opt.state[p]["subset"].tolist()))
    changed = [n for n in range(2, 31) if seen[n - 1] != seen[n - 2]]
    assert changed == [7, 14, 21, 28]
    assert seen[0][2] >= 0 and all(s[2] == -1 for s in seen[6:])  # exact first, Bernoulli after


def test_unselected_entries_frozen_bit_for_bit() -> None:
    p = nn.Parameter(torch.randn(96, 80).bfloat16())
    opt = sl.SPAM(
        [{"params": [p], "density": 0.2}],
        lr=1e-2,
        reset_interval=10,
        warmup_steps=2,
        weight_decay=0.1,
        state_bits=8,
        min_8bit_size=0,
        subset_seed=2,
    )
    for period in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
        mask = S.subset_mask(opt.state[p]["subset"]).view(p.shape)
        start = p.detach().clone()
        for _ in range(8):
            p.grad = torch.randn_like(p)
            opt.step()
        assert torch.equal(p.detach()[~mask].view(torch.int16), start[~mask].view(torch.int16)), period
        assert (p.detach()[mask] != start[mask]).float().mean() > 0.5
        for _ in range(10 - 9):
            p.grad = torch.randn_like(p)
            opt.step()


# --------------------------------------------------------------------------- kernel vs reference
@pytest.mark.parametrize(
    ("dtype", "bits", "decay"),
    [(torch.float32, 32, False), (torch.float32, 8, True), (torch.bfloat16, 32, True), (torch.bfloat16, 8, False)],
    ids=["fp32-32-wdnoop", "fp32-8-wdclean", "bf16-32-wdclean", "bf16-8-wdnoop"],
)
def test_kernel_matches_reference_over_resets(dtype: torch.dtype, bits: int, decay: bool) -> None:
    steps = 110  # resets at calls 40 and 80
    ours_p = make_params(dtype)
    ref_p = clone(ours_p)
    kw = dict(KW, state_bits=bits, sparse_weight_decay=decay, subset_seed=42)
    ours = sl.SPAM([{"params": ours_p, "density": 0.3}], **kw)
    ref = ReferenceSPAM([{"params": ref_p, "density": 0.3}], **kw)
    clipped = 0
    for step, grads in enumerate(gradient_stream([p.shape for p in ours_p], steps, dtype=dtype)):
        feed(ours_p, grads)
        feed(ref_p, grads)
        ours.step()
        ref.step()
        clipped += ref.last_counts["clipped"]
        for a, b in zip(ours_p, ref_p):
            assert torch.equal(ours.state[a]["subset"], ref.state[b]["subset"])
        if step % 10 == 9:
            for a, b in zip(ours_p, ref_p):
                assert_close(a.detach(), b.detach(), msg=f"{dtype} {bits} step {step + 1}")
                if bits == 32:
                    assert_close(ours.state[a]["exp_avg"], ref.state[b]["exp_avg"], msg="m")
                    assert_close(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], msg="v")
                else:
                    codes = (ours.state[a]["exp_avg_codes"] != ref.state[b]["exp_avg_codes"]).float()
                    assert codes.mean() < 0.01
    assert clipped > 0
    assert ours.spike_stats()["clipped"] == clipped


def test_dense_and_sparse_groups_together_and_density_one_is_dense() -> None:
    params = make_params(torch.float32)
    bias = nn.Parameter(torch.randn(33))
    twin = clone(params) + [nn.Parameter(bias.detach().clone())]
    a = sl.SPAM([{"params": params, "density": 0.5}, {"params": [bias]}], **KW, subset_seed=1)
    b = ReferenceSPAM([{"params": twin[:3], "density": 0.5}, {"params": [twin[3]]}], **KW, subset_seed=1)
    dense = clone(params)
    c, d = sl.SPAM(dense, **KW, density=1.0), sl.SPAM(clone(params), **KW)
    for grads in gradient_stream([p.shape for p in params] + [bias.shape], 42):
        feed(params + [bias], grads)
        feed(twin, grads)
        feed(dense, grads[:3])
        feed(d.param_groups[0]["params"], grads[:3])
        for opt in (a, b, c, d):
            opt.step()
    for x, y in zip(params + [bias], twin):
        assert_close(x.detach(), y.detach())
    for x, y in zip(dense, d.param_groups[0]["params"]):
        assert torch.equal(x, y)
    assert "subset" not in c.state[dense[0]]


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("bits", [32, 8])
def test_memory_report_matches_formula_and_tensors(bits: int) -> None:
    params = make_params(torch.bfloat16, [(512, 384), (256, 100)])
    bias = nn.Parameter(torch.randn(100).bfloat16())
    opt = sl.SPAM(
        [{"params": params, "density": 0.25}, {"params": [bias]}], state_bits=bits, min_8bit_size=0, subset_seed=9
    )
    feed(params + [bias], [torch.randn_like(p) for p in params + [bias]])
    opt.step()
    report = opt.memory_report()
    for entry, p in zip(report["params"], params):
        k = math.floor(0.25 * p.numel())
        blocks = (k + 255) // 256
        assert entry["moment_numel"] == k and entry["density"] == 0.25
        assert entry["values"] == (2 * k if bits == 8 else 2 * 2 * k)
        assert entry["absmax"] == (8 * blocks if bits == 8 else 0)
        assert entry["indices"] == 8 * blocks + 4 * 8
        assert entry["ratio_to_adamw32"] == entry["total"] / (8 * p.numel())
    measured = sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
    )
    assert report["total_bytes"] == measured
    if bits == 8:  # 8-bit values at d = 0.25: about 0.5 + 0.016 + 0.008 bytes per element
        big = report["params"][0]
        assert big["total"] / big["numel"] < 0.55


# --------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_resume_is_bit_identical_including_next_subset(bits: int) -> None:
    params = make_params(torch.bfloat16)
    kw = dict(KW, reset_interval=10, state_bits=bits, subset_seed=4)
    opt = sl.SPAM([{"params": params, "density": 0.3}], **kw)
    stream = list(gradient_stream([p.shape for p in params], 30, dtype=torch.bfloat16))
    for g in stream[:15]:
        feed(params, g)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed_p = clone(params)
    resumed = sl.SPAM([{"params": resumed_p, "density": 0.3}], **dict(kw, subset_seed=999))
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for g in stream[15:]:  # crosses the reset at call 20 and 30
        feed(params, g)
        feed(resumed_p, g)
        opt.step()
        resumed.step()
        for a, b in zip(params, resumed_p):
            assert torch.equal(a, b)
            assert torch.equal(opt.state[a]["subset"], resumed.state[b]["subset"])
            for key, value in opt.state[a].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, resumed.state[b][key]), key


def test_mismatched_state_dict_is_rejected() -> None:
    p = nn.Parameter(torch.randn(40, 60))
    opt = sl.SPAM([{"params": [p], "density": 0.3}], subset_seed=1)
    p.grad = torch.randn_like(p)
    opt.step()
    good = opt.state_dict()

    def load_into(shape: tuple[int, int], density: float, sd: dict[str, Any]) -> None:
        q = nn.Parameter(torch.randn(shape))
        sl.SPAM([{"params": [q], "density": density}]).load_state_dict(sd)

    load_into((40, 60), 0.3, good)  # the untouched state loads
    with pytest.raises(ValueError, match="2400"):
        load_into((60, 41), 0.3, good)  # numel mismatch
    with pytest.raises(ValueError, match="dense"):
        load_into((40, 60), 1.0, good)
    bad = opt.state_dict()
    bad["state"][0] = dict(bad["state"][0], exp_avg=bad["state"][0]["exp_avg"][:-1].clone())
    with pytest.raises(ValueError, match="selects"):
        load_into((40, 60), 0.3, bad)
    bad = opt.state_dict()
    st = dict(bad["state"][0])
    st["subset"] = st["subset"].clone()
    st["subset"][0] += 1  # another seed: another subset
    bad["state"][0] = st
    with pytest.raises(ValueError):
        load_into((40, 60), 0.3, bad)
    dense_opt = sl.SPAM([p])
    p.grad = torch.randn_like(p)
    dense_opt.step()
    with pytest.raises(ValueError, match="lacks"):
        load_into((40, 60), 0.3, dense_opt.state_dict())


def test_matrix_with_no_selected_entry_steps() -> None:
    # floor(0.01 * 7) = 0: empty compact moments and block starts (an empty strided slice).
    tiny, big = nn.Parameter(torch.randn(1, 7)), nn.Parameter(torch.randn(40, 40))
    before = tiny.detach().clone()
    opt = sl.SPAM([{"params": [tiny, big], "density": 0.01}], subset_seed=1)
    for _ in range(2):
        feed([tiny, big], [torch.randn(1, 7), torch.randn(40, 40)])
        opt.step()
    assert opt.state[tiny]["exp_avg"].numel() == 0
    assert torch.equal(tiny.detach(), before)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.1, float("nan"), True])
def test_invalid_density(density: Any) -> None:
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="density"):
        sl.SPAM([p], density=density)
    with pytest.raises(ValueError, match="density"):
        ReferenceSPAM([p], density=density)


def test_non_2d_parameter_in_density_group() -> None:
    w, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        sl.SPAM([{"params": [w, b], "density": 0.5}])
    with pytest.raises(ValueError, match=r"\(4,\)"):
        ReferenceSPAM([{"params": [w, b], "density": 0.5}])
    sl.SPAM([{"params": [w], "density": 0.5}, {"params": [b]}])  # fine


# --------------------------------------------------------------------------- grouping helpers
class TinyLlama(nn.Module):
    def __init__(self, hidden: int = 512, ffn: int = 1376, layers: int = 8, vocab: int = 32000) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, nn.Linear(hidden, hidden, bias=False))
            layer.mlp = nn.Module()
            layer.mlp.gate_proj = nn.Linear(hidden, ffn, bias=False)
            layer.mlp.up_proj = nn.Linear(hidden, ffn, bias=False)
            layer.mlp.down_proj = nn.Linear(ffn, hidden, bias=False)
            layer.input_layernorm = nn.LayerNorm(hidden)
            self.layers.append(layer)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def test_sparse_param_groups_and_galore_density() -> None:
    with torch.device("meta"):
        big = TinyLlama()
    assert sl.density_for_galore_rank(big, 128) == pytest.approx(0.3225388601, abs=1e-10)
    with torch.device("meta"):
        big130 = TinyLlama(hidden=768, ffn=2048, layers=12)
    assert sl.density_for_galore_rank(big130, 256) == pytest.approx(0.4305555556, abs=1e-10)
    model = TinyLlama(hidden=16, ffn=24, layers=2, vocab=50)
    groups = sl.sparse_param_groups(model, density=0.25, lr=1e-3)
    assert len(groups[0]["params"]) == 14 and groups[0]["density"] == 0.25 and groups[0]["lr"] == 1e-3
    assert "density" not in groups[1] and len(groups[1]["params"]) == 2 + 2 * 2
    assert all(p.dim() == 2 for p in groups[0]["params"])
    opt = sl.SPAM(groups)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert "subset" in opt.state[model.layers[0].mlp.up_proj.weight]
    assert "subset" not in opt.state[model.lm_head.weight]


def test_density_for_shapes_formula_clamp_and_errors() -> None:
    from spam_lowmem.sparse import density_for_shapes

    assert density_for_shapes([(8, 4)], 2) == (2 * 2 * 8 + 2 * 4) / (2 * 8 * 4)  # 0.625
    assert density_for_shapes([(4, 4)], 100) == 1.0  # rank clamped to 4, density capped at 1
    with pytest.raises(ValueError, match="rank"):
        density_for_shapes([(8, 4)], 0)
    with pytest.raises(ValueError, match=r"no nn.Linear"):
        sl.density_for_galore_rank(torch.nn.Sequential(torch.nn.LayerNorm(4)), 8)
