"""Sparse momentum on shards of a parameter (docs/algorithms.md §13.3): subsets defined on the
parameter's global flat indices, the kernels' ``offsets``, the exact initial subset found from
local hashes and sums across ranks, and the stateless per-parameter subset seeds (§3).

Oracles: the unsharded step of the whole parameter (rows split as FSDP2 splits dim 0, every
shard stepped in the same call with its offset, must give the same bits), the unsharded
``exact_rule`` (``torch.kthvalue`` over every hash), and an uninterrupted optimizer. Ranks are
simulated by threads whose ``reduce_sum`` adds the tensors of all ranks behind a barrier, as an
all-reduce does."""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import nn

import spam_lowmem as sl
from spam_lowmem import functional as F
from spam_lowmem import sparse_subset as S
from spam_lowmem.optim import moments

SHAPE = (129, 96)
SPLIT = 65 * 96  # rows [0, 65) and [65, 129)
HYPER: dict[str, Any] = dict(beta1=0.9, beta2=0.999, eps=1e-6, clip_threshold=20.0, weight_decay_scale=1e-3)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


# --------------------------------------------------------------------------- simulated ranks
class FakeRanks:
    """``world`` ranks in threads; ``reduce_sum(rank)`` is rank ``rank``'s all-reduce (sum)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def reduce_sum(self, rank: int) -> Callable[[torch.Tensor], None]:
        def reduce(t: torch.Tensor) -> None:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(s for s in self.slots if s is not None)
            self.barrier.wait()  # every rank has read every slot before any is overwritten
            t.copy_(total)
            self.calls[rank] += 1

        return reduce

    def run(self, work: Callable[[int], Any]) -> list[Any]:
        """``work(rank)`` on every rank at once; the results in rank order (errors re-raised)."""
        out: list[Any] = [None] * self.world
        errors: list[BaseException] = []

        def body(rank: int) -> None:
            try:
                out[rank] = work(rank)
            except BaseException as err:  # re-raised below, in the test's thread
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(rank,)) for rank in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


def row_ranges(shape: tuple[int, int], bounds: Sequence[int]) -> list[tuple[int, int]]:
    """(offset, count) of the row shards [bounds[r], bounds[r+1]) of a 2-D parameter."""
    cols = shape[1]
    return [(a * cols, (b - a) * cols) for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------- (a) kernel offsets
def _state(p: torch.Tensor, k: int, bits: int, gen: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {}
    moments.init_compact_moments(p, state, k, bits == 8)
    if bits == 32:  # a state mid-training: the moments the spike test and the update read
        state["exp_avg"].copy_(torch.randn(k, generator=gen) * 1e-2)
        state["exp_avg_sq"].copy_(torch.rand(k, generator=gen) * 1e-4)
    return state


def _sparse_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict[str, Any]],
    starts: list[torch.Tensor],
    rule: torch.Tensor,
    scale: float,
    reset: bool,
    counters: torch.Tensor,
    offsets: list[int] | None = None,
) -> None:
    F.sparse_spam_step(
        params,
        grads,
        **moments.moment_args(states, counters.device),
        block_starts=starts,
        subsets=[rule] * len(params),
        update_scales=[scale] * len(params),
        counters=counters,
        **HYPER,
        reset=F.MomentReset.BEFORE_UPDATE if reset else F.MomentReset.NONE,
        skip_nonfinite=True,
        offsets=offsets,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("kind", "bounds"),
    [("exact", (0, 65, 129)), ("bernoulli", (0, 65, 129)), ("exact", (0, 1, 1, 100, 129))],
    ids=["exact", "bernoulli", "exact-4-shards-one-empty"],
)
def test_row_shards_in_one_call_step_like_the_whole_parameter(
    device: str, bits: int, dtype: torch.dtype, kind: str, bounds: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(11)
    numel = SHAPE[0] * SHAPE[1]
    rule = S.exact_rule(2024, numel, 0.3) if kind == "exact" else S.bernoulli_rule(2024, numel, 0.3)
    mask = S.subset_mask(rule)
    ranges = row_ranges(SHAPE, bounds)
    masks = [S.subset_mask(rule, offset=o, count=c) for o, c in ranges]
    assert torch.equal(torch.cat(masks), mask)  # the local masks tile the global one
    sizes = [int(m.sum()) for m in masks]
    cuts = [0]
    for k in sizes:
        cuts.append(cuts[-1] + k)

    whole = torch.randn(numel, generator=gen).to(dtype)
    whole_state = _state(whole, int(mask.sum()), bits, gen)
    # the shards' compact moments are the slices of the whole one (32-bit: mid-training values)
    if bits == 32:
        shard_states = [
            {key: whole_state[key][a:b].clone() for key in moments.DENSE_KEYS} for a, b in itertools.pairwise(cuts)
        ]
    else:
        shard_states = [_state(whole, k, 8, gen) for k in sizes]
    sharded = whole.clone()
    whole, sharded = whole.to(device), sharded.to(device)
    for st in (whole_state, *shard_states):
        for key, value in st.items():
            st[key] = value.to(device)
    shard_params = [sharded[o : o + c] for o, c in ranges]  # contiguous views: stepped in place
    whole_starts = [S.block_starts(mask).to(device)]
    shard_starts = [S.block_starts(m).to(device) for m in masks]
    grule = rule.to(device)
    counters = [torch.zeros(2, dtype=torch.int64, device=device) for _ in range(2)]
    # 8-bit: one step from zero moments (the shards' 256-blocks of compact values are not the
    # whole parameter's, so later steps quantise differently); 32-bit: across a reset
    steps = 4 if bits == 32 else 1
    for step in range(steps):
        g = torch.randn(numel, generator=gen)
        g[:: 97 + step] *= 300.0  # spikes: the clipping path runs too
        g = g.to(dtype).to(device)
        scale, reset = 1e-2 * (step + 1), step == 2
        _sparse_step([whole], [g], [whole_state], whole_starts, grule, scale, reset, counters[0])
        shard_grads = [g[o : o + c] for o, c in ranges]
        offsets = [o for o, _ in ranges]
        _sparse_step(shard_params, shard_grads, shard_states, shard_starts, grule, scale, reset, counters[1], offsets)
        assert torch.equal(sharded, whole), step
    assert torch.equal(counters[0], counters[1])
    assert int(counters[0][0]) > 0  # some entries were clipped
    if bits == 32:
        for key in moments.DENSE_KEYS:
            assert torch.equal(torch.cat([st[key] for st in shard_states]), whole_state[key]), key


def test_offset_zero_is_the_default() -> None:
    gen = torch.Generator().manual_seed(3)
    rule = S.exact_rule(9, 40 * 50, 0.25)
    mask = S.subset_mask(rule)
    runs = []
    for offsets in (None, [0]):
        p = torch.randn(2000, generator=gen.manual_seed(3))
        g = torch.randn(2000, generator=gen)
        state = _state(p, int(mask.sum()), 32, gen)
        counters = torch.zeros(2, dtype=torch.int64)
        _sparse_step([p], [g], [state], [S.block_starts(mask)], rule, 1e-2, False, counters, offsets)
        runs.append((p, state["exp_avg"]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --------------------------------------------------------------------------- (d) range errors
def _shard_call(offsets: list[int] | None, rule: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """One 96-element tensor stepped with ``rule`` (no selected entry unless ``mask``)."""
    n = 96
    mask = torch.zeros(n, dtype=torch.bool) if mask is None else mask
    p = torch.zeros(n)
    state = _state(p, int(mask.sum()), 32, torch.Generator())
    counters = torch.zeros(2, dtype=torch.int64)
    _sparse_step([p], [torch.ones(n)], [state], [S.block_starts(mask)], rule, 1e-2, False, counters, offsets)


def test_kernel_range_errors_are_value_errors() -> None:
    rule = S.exact_rule(1, 960, 0.5)
    _shard_call([864], rule, S.subset_mask(rule, offset=864))  # the last 96 global entries: fine
    with pytest.raises(ValueError, match=r"offsets.*must lie in"):
        _shard_call([-1], rule)
    with pytest.raises(ValueError, match="drawn for 960 elements; the tensor holds 96 from global index 865"):
        _shard_call([865], rule)
    with pytest.raises(ValueError, match="offsets: 2 entries for 1 tensors"):
        _shard_call([0, 0], rule)
    with pytest.raises(ValueError, match=r"offsets.*2\^32"):
        _shard_call([2**32 - 50], S.bernoulli_rule(1, 2**32 - 1, 0.5))
    huge = torch.tensor([1, 2**31, -1, 2**32], dtype=torch.int64)  # a global numel of 2^32
    with pytest.raises(ValueError, match=r"numel 4294967296 must lie in \[0, 2\^32\)"):
        _shard_call([0], huge)


def test_subset_function_range_errors_are_value_errors() -> None:
    rule = S.bernoulli_rule(3, 100, 0.5)
    assert S.subset_mask(rule, offset=100).numel() == 0  # an empty shard at the end
    for offset, count in ((-1, None), (0, 101), (60, 41), (101, None), (5, -1)):
        with pytest.raises(ValueError, match="not inside the parameter's 100 global elements"):
            S.subset_mask(rule, offset=offset, count=count)
        with pytest.raises(ValueError, match="not inside"):
            S.exact_rule(3, 100, 0.5, offset=offset, count=count, reduce_sum=lambda t: None)
    with pytest.raises(ValueError, match="fewer than 2\\^32"):
        S.exact_rule(3, 2**32, 0.5, offset=0, count=10, reduce_sum=lambda t: None)
    with pytest.raises(ValueError, match="fewer than 2\\^32"):
        S.bernoulli_rule(3, 2**32, 0.5)
    with pytest.raises(ValueError, match=r"2 seeds, 1 numels"):
        S.exact_rules([1, 2], [10], 0.5)


def test_shards_that_do_not_cover_the_parameter_fail_alike_on_every_rank() -> None:
    ranks = FakeRanks(2)
    ranges = [(0, 50), (60, 40)]  # [50, 60) is held by nobody

    def work(rank: int) -> None:
        o, c = ranges[rank]
        with pytest.raises(ValueError, match="cover \\[90\\] entries"):
            S.exact_rules([4], [100], 0.5, offsets=[o], counts=[c], reduce_sum=ranks.reduce_sum(rank))

    ranks.run(work)


# --------------------------------------------------------------------------- (b) sharded exact_rule
def _sharded_rules(
    seeds: list[int], shapes: list[tuple[int, int]], bounds: list[Sequence[int]], density: float
) -> tuple[list[list[torch.Tensor]], list[int]]:
    """Every rank's exact_rules of the group (rank r holds rows [bounds[j][r], bounds[j][r+1]) of
    tensor j) and the number of sums each made."""
    world = len(bounds[0]) - 1
    ranks = FakeRanks(world)
    ranges = [row_ranges(shape, b) for shape, b in zip(shapes, bounds)]
    numels = [a * b for a, b in shapes]

    def work(rank: int) -> list[torch.Tensor]:
        offsets = [r[rank][0] for r in ranges]
        counts = [r[rank][1] for r in ranges]
        return S.exact_rules(seeds, numels, density, offsets=offsets, counts=counts, reduce_sum=ranks.reduce_sum(rank))

    return ranks.run(work), ranks.calls


GROUP_SHAPES = [(129, 96), (7, 5), (300, 17), (1, 40), (64, 64)]
GROUP_BOUNDS = {
    "two": [(0, 65, 129), (0, 3, 7), (0, 150, 300), (0, 0, 1), (0, 32, 64)],
    "three-with-empty": [(0, 40, 40, 129), (0, 0, 3, 7), (0, 100, 200, 300), (0, 1, 1, 1), (0, 1, 2, 64)],
}


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("split", list(GROUP_BOUNDS))
def test_sharded_exact_rule_equals_the_unsharded_one(density: float, split: str) -> None:
    seeds = [0, 1, 2024, 0x9E3779B1, 2**32 - 1]
    numels = [a * b for a, b in GROUP_SHAPES]
    want = [S.exact_rule(seed, n, density) for seed, n in zip(seeds, numels)]
    got, calls = _sharded_rules(seeds, GROUP_SHAPES, GROUP_BOUNDS[split], density)
    for rank_rules in got:
        for a, b in zip(rank_rules, want):
            assert torch.equal(a, b), (a.tolist(), b.tolist())
    # 8 sums for the whole group (4 digits of t_hash, 4 of t_index), not per tensor
    assert calls == [8] * len(calls)


def test_sharded_exact_rule_breaks_many_ties_like_the_unsharded_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hash with 2^6 values puts ~190 entries on every value, so the k-th pair is nearly always
    # tied and t_index decides: the second search (global indices among the ties) is exercised.
    real = S.subset_hash
    monkeypatch.setattr(S, "subset_hash", lambda seed, idx: real(seed, idx) & 0xE0000007)
    for density in (0.1, 0.5, 0.93):
        seeds = [5, 6, 7, 8, 9]
        numels = [a * b for a, b in GROUP_SHAPES]
        want = [S.exact_rule(seed, n, density) for seed, n in zip(seeds, numels)]
        assert any(int(r[2]) > 0 for r in want)
        got, _ = _sharded_rules(seeds, GROUP_SHAPES, GROUP_BOUNDS["three-with-empty"], density)
        for rank_rules in got:
            for a, b in zip(rank_rules, want):
                assert torch.equal(a, b), (a.tolist(), b.tolist())


def test_one_rank_search_equals_kthvalue() -> None:
    sums: list[torch.Tensor] = []
    for seed, numel, d in ((3, 10_000, 0.2), (4, 513, 0.77), (5, 1, 0.9), (6, 3, 0.2)):
        rule = S.exact_rule(seed, numel, d, reduce_sum=lambda t: sums.append(t.clone()))
        assert torch.equal(rule, S.exact_rule(seed, numel, d))
        assert int(S.subset_mask(rule).sum()) == int(d * numel)


# --------------------------------------------------------------------------- (c) subset seeds
def test_subset_seed_is_a_pure_function_distinct_per_parameter_and_draw() -> None:
    # pinned, so that the derivation cannot drift (docs/algorithms.md §13.3)
    assert [S.subset_seed(0, 0, n) for n in range(3)] == [S.subset_seed(0, 0, n) for n in range(3)]
    assert S.subset_seed(0, 0, 0) == PINNED[0]
    assert S.subset_seed(2**64 - 1, 7, 3) == PINNED[1]
    assert S.subset_seed(12345, 2**32 - 1, 2**32 - 1) == PINNED[2]
    for base in (0, 1, 2**32, 2**64 - 1):
        seeds = {S.subset_seed(base, i, n) for i in range(60) for n in range(30)}
        assert len(seeds) == 60 * 30
        assert all(0 <= s < 2**32 for s in seeds)
    assert S.subset_seed(0, 1, 2) != S.subset_seed(2**32, 1, 2)  # the high word of the base counts
    for bad in ((-1, 0, 0), (2**64, 0, 0), (0, -1, 0), (0, 2**32, 0), (0, 0, 2**32)):
        with pytest.raises(ValueError, match="subset_seed"):
            S.subset_seed(*bad)


PINNED = (3692971187, 929810021, 469147187)


def _params(shapes: list[tuple[int, int]], seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(shapes: list[tuple[int, int]], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


KW: dict[str, Any] = dict(lr=1e-2, reset_interval=4, warmup_steps=2, clip_delay=1, threshold=50.0)


def test_optimizer_seeds_follow_the_derivation() -> None:
    shapes = [(20, 30), (16, 16), (8, 9)]
    params = _params(shapes)
    dense = nn.Parameter(torch.zeros(5))
    opt = sl.SPAM([{"params": [dense]}, {"params": params, "density": 0.3}], **KW, subset_seed=77)
    for step, gs in enumerate(_grads(shapes, 9)):  # resets at calls 4 and 8
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
        draws = 1 + (step + 1) // 4
        for i, p in enumerate(params):
            st = opt.state[p]
            assert st["subset_draws"] == draws
            assert int(st["subset"][0]) == S.subset_seed(77, 1 + i, draws - 1)  # index 0 is the dense one
    assert opt.param_groups[1]["subset_base_seed"] == 77


def test_resumed_optimizer_draws_the_same_next_subsets_across_two_resets() -> None:
    shapes = [(20, 30), (16, 16)]
    grads = _grads(shapes, 11)
    a_params = _params(shapes)
    a = sl.SPAM([{"params": a_params, "density": 0.3}], **KW, subset_seed=5)
    b_params = _params(shapes)
    b = sl.SPAM([{"params": b_params, "density": 0.3}], **KW, subset_seed=5)
    for gs in grads[:3]:
        for p, q, g in zip(a_params, b_params, gs):
            p.grad, q.grad = g, g.clone()
        a.step()
        b.step()
    sd = b.state_dict()
    assert set(sd) == {"state", "param_groups"}  # nothing a tensor/int checkpoint would drop
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    c_params = [nn.Parameter(q.detach().clone()) for q in b_params]
    c = sl.SPAM([{"params": c_params, "density": 0.3}], **KW)  # another seed: the saved one wins
    c.load_state_dict(torch.load(buf, weights_only=True))
    seen = set()
    for gs in grads[3:]:  # resets at calls 4 and 8
        for p, q, g in zip(a_params, c_params, gs):
            p.grad, q.grad = g, g.clone()
        a.step()
        c.step()
        for p, q in zip(a_params, c_params):
            assert torch.equal(p, q)
            assert torch.equal(a.state[p]["subset"], c.state[q]["subset"])
            assert a.state[p]["subset_draws"] == c.state[q]["subset_draws"]
            seen.add(tuple(a.state[p]["subset"].tolist()))
    assert len(seen) == 2 * len(shapes)  # two resets: two fresh subsets per parameter


# --------------------------------------------------------------------------- optimizer hooks
class ShardedSPAM(sl.SPAM):
    """SPAM over the row shards one rank holds, through the two distributed hooks."""

    def set_shards(self, geometry: dict[int, tuple[int, int, int]], reduce_sum: Callable[[torch.Tensor], None]) -> None:
        self.geometry, self.reduce = geometry, reduce_sum

    def _shard_geometry(self, p: torch.Tensor) -> tuple[int, int, int]:
        return self.geometry[id(p)] if id(p) in self.geometry else super()._shard_geometry(p)

    def _subset_reduce_sum(self, group: dict[str, Any]) -> Callable[[torch.Tensor], None] | None:
        return self.reduce


SHARD_SHAPES = [(129, 96), (40, 33), (5, 64)]
SHARD_BOUNDS = [(0, 65, 129), (0, 20, 40), (0, 0, 5)]  # the last: rank 0 holds no row


def _rank_optimizers(ranks: FakeRanks, full: list[nn.Parameter], **kw: Any) -> list[tuple[ShardedSPAM, list]]:
    out = []
    for rank in range(ranks.world):
        shards, geometry = [], {}
        for p, b in zip(full, SHARD_BOUNDS):
            shard = nn.Parameter(p.detach()[b[rank] : b[rank + 1]].clone())
            geometry[id(shard)] = (p.numel(), b[rank] * p.shape[1], shard.numel())
            shards.append(shard)
        opt = ShardedSPAM([{"params": [nn.Parameter(torch.zeros(3))]}, {"params": shards, "density": 0.3}], **kw)
        opt.set_shards(geometry, ranks.reduce_sum(rank))
        out.append((opt, shards))
    return out


def test_sharded_optimizers_step_like_the_unsharded_one_across_resets() -> None:
    full = _params(SHARD_SHAPES, seed=4)
    kw = dict(KW, weight_decay=0.1, sparse_weight_decay=True, subset_seed=8)
    whole = sl.SPAM([{"params": [nn.Parameter(torch.zeros(3))]}, {"params": full, "density": 0.3}], **kw)
    ranks = FakeRanks(2)
    shard_opts = _rank_optimizers(ranks, full, **kw)
    grads = _grads(SHARD_SHAPES, 10, seed=6)

    def step_rank(rank: int, gs: list[torch.Tensor]) -> None:
        opt, shards = shard_opts[rank]
        for shard, g, b in zip(shards, gs, SHARD_BOUNDS):
            shard.grad = g[b[rank] : b[rank + 1]].clone()
        opt.step()

    for step, gs in enumerate(grads):  # the exact subsets at call 1 (8 sums), resets at 4 and 8
        for p, g in zip(full, gs):
            p.grad = g
        whole.step()
        ranks.run(lambda rank, gs=gs: step_rank(rank, gs))
        for j, p in enumerate(full):
            shards = [shard_opts[r][1][j] for r in range(2)]
            assert torch.equal(torch.cat([s.detach() for s in shards]), p.detach()), (step, j)
            st = whole.state[p]
            sts = [shard_opts[r][0].state[s] for r, s in enumerate(shards)]
            for key in moments.DENSE_KEYS:
                assert torch.equal(torch.cat([x[key] for x in sts]), st[key]), (step, j, key)
            for x in sts:
                assert torch.equal(x["subset"], st["subset"])
                assert x["subset_draws"] == st["subset_draws"]
    assert ranks.calls == [8, 8]  # one search for the whole group, at its first step


def test_sharded_state_dict_loads_only_into_the_same_shard() -> None:
    full = _params(SHARD_SHAPES, seed=4)
    ranks = FakeRanks(2)
    shard_opts = _rank_optimizers(ranks, full, **KW)
    gs = _grads(SHARD_SHAPES, 1)[0]

    def step_rank(rank: int) -> None:
        opt, shards = shard_opts[rank]
        for shard, g, b in zip(shards, gs, SHARD_BOUNDS):
            shard.grad = g[b[rank] : b[rank + 1]].clone()
        opt.step()

    ranks.run(step_rank)
    sd1 = shard_opts[1][0].state_dict()
    again = _rank_optimizers(FakeRanks(2), full, **KW)
    again[1][0].load_state_dict(sd1)  # the same rank's shards: checked against the local mask
    for a, b in zip(shard_opts[1][1], again[1][1]):
        assert torch.equal(
            shard_opts[1][0].state[a]["compact_block_starts"], again[1][0].state[b]["compact_block_starts"]
        )
    with pytest.raises(ValueError, match=r"selects|compact_block_starts"):
        again[0][0].load_state_dict(sd1)  # rank 0's shards: same global rule, other entries
    plain = sl.SPAM(
        [{"params": [nn.Parameter(torch.zeros(3))]}, {"params": again[1][1], "density": 0.3}], **KW
    )  # unsharded: the rule was drawn for the whole parameter
    with pytest.raises(ValueError, match=f"drawn for {129 * 96} elements"):
        plain.load_state_dict(sd1)
