"""Robustness of sl.SPAM / sl.StableSPAM / sl.AdamW against what a demanding user does:
tensor subclasses (DTensor), copies and pickles, foreign or corrupted state dicts, overflowed
moments, steps the core rejects, named parameters, bad subset seeds and several processes."""

from __future__ import annotations

import copy
import io
import math
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spam_lowmem as sl
from spam_lowmem import functional as F
from spam_lowmem.nn import QuantLinear, attach_packed_requant
from spam_lowmem.optim.base import KIND_KEY

CLASSES = {"spam": sl.SPAM, "stable": sl.StableSPAM, "adamw": sl.AdamW}
KW: dict[str, dict[str, Any]] = {
    "spam": dict(lr=1e-2, threshold=20.0, reset_interval=4, warmup_steps=2, clip_delay=1),
    "stable": dict(lr=1e-2, reset_interval=4, total_steps=20),
    "adamw": dict(lr=1e-2),
}
SHAPES = [(6, 5), (7,), (300,)]


def make_params(shapes: list[tuple[int, ...]] = SHAPES, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def feed(params: list[torch.Tensor], step: int, scale: float = 1.0) -> None:
    """Gradients depending only on the step number: two optimizers fed alike must agree."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        feed(params, step)
        opt.step()


def opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of everything load_state_dict / step may change (state, groups, params)."""
    return copy.deepcopy({"sd": opt.state_dict(), "params": [p.detach().clone() for p in opt_params(opt)]})


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


# ---------------------------------------------------------------------------------- 1. subclasses
class _Sub(torch.Tensor):
    pass


class _Wrapper(torch.Tensor):
    """A __torch_dispatch__ wrapper subclass: no storage of its own (stepping it used to crash)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> _Wrapper:
        out = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, requires_grad=True)
        out.inner = inner
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        unwrap = lambda t: t.inner if isinstance(t, _Wrapper) else t  # noqa: E731
        return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def _subclass_params() -> list[torch.Tensor]:
    return [torch.Tensor._make_subclass(_Sub, torch.randn(3, 4), True), _Wrapper(torch.randn(3, 4))]


@pytest.mark.parametrize("name", list(CLASSES))
def test_tensor_subclass_parameters_are_rejected(name: str) -> None:
    cls = CLASSES[name]
    for bad in _subclass_params():
        with pytest.raises(TypeError, match=r"subclass.*DTensor"):
            cls([bad])
        opt = cls([nn.Parameter(torch.zeros(2))])
        with pytest.raises(TypeError, match=r"Shard\(0\) or Replicate"):
            opt.add_param_group({"params": [bad]})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", list(CLASSES))
def test_tensor_subclass_gradient_is_rejected_at_step(name: str) -> None:
    p = nn.Parameter(torch.ones(3, 4))
    opt = CLASSES[name]([p])
    p.grad = torch.Tensor._make_subclass(_Sub, torch.ones(3, 4))
    with pytest.raises(TypeError, match=r"gradient .*subclass"):
        opt.step()
    assert not opt.state[p]
    assert torch.equal(p.detach(), torch.ones(3, 4))
    p.grad = torch.ones(3, 4)  # a plain parameter with a plain gradient still steps
    opt.step()
    assert opt.state[p]["step"] == 1 and not torch.equal(p.detach(), torch.ones(3, 4))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DTensor parameters (accepted placements and refused ones): tests/test_distributed.py


# ---------------------------------------------------------------------------------- 2. copies
def _copy_deepcopy(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return copy.deepcopy(opt)


def _copy_pickle(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return pickle.loads(pickle.dumps(opt))


def _copy_torch_save(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"deepcopy": _copy_deepcopy, "pickle": _copy_pickle, "torch.save": _copy_torch_save}
VARIANTS = {"32bit": {}, "8bit": dict(state_bits=8, min_8bit_size=0)}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(CLASSES))
def test_copy_steps_exactly_like_the_original(name: str, variant: str, how: str) -> None:
    params = make_params()
    opt = CLASSES[name](params, **KW[name], **VARIANTS[variant])
    run(opt, params, range(3))
    twin = COPIES[how](opt)
    twin_params = opt_params(twin)
    assert all(a is not b for a, b in zip(params, twin_params))
    run(opt, params, range(3, 9))  # crosses a momentum reset
    run(twin, twin_params, range(3, 9))
    for a, b in zip(params, twin_params):
        assert torch.equal(a.detach(), b.detach())
    assert_same(opt.state_dict()["state"], twin.state_dict()["state"])
    assert twin.spike_stats()["nonfinite"] == 0  # the copy's telemetry works (counts from zero)


@pytest.mark.parametrize("how", list(COPIES))
def test_copy_of_sparse_spam_draws_the_same_next_subsets(how: str) -> None:
    params = make_params([(20, 30), (16, 16)])
    opt = sl.SPAM([{"params": params, "density": 0.3}], **KW["spam"], subset_seed=7)
    run(opt, params, range(3))
    twin = COPIES[how](opt)
    twin_params = opt_params(twin)
    run(opt, params, range(3, 10))  # resets at calls 4 and 8 draw fresh subsets
    run(twin, twin_params, range(3, 10))
    for a, b in zip(params, twin_params):
        assert torch.equal(a.detach(), b.detach())
    assert_same(opt.state_dict(), twin.state_dict())


def test_copy_with_packed_weights_attached_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(64, 48, fmt="int4", group_size=32, storage="packed"))
    opt = sl.AdamW(model.parameters(), lr=1e-2)
    assert attach_packed_requant(opt, model).fused
    for how in COPIES.values():
        with pytest.raises(RuntimeError, match="packed 4-bit weight"):
            how(opt)
    opt.detach_packed(model[0].weight)
    assert not opt.is_packed(model[0].weight)
    copy.deepcopy(opt)  # nothing attached any more: copies fine


# ---------------------------------------------------------------------------------- 3. foreign kinds
PAIRS = [(a, b) for a in CLASSES for b in CLASSES if a != b]


@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_state_of_another_optimizer_kind_is_rejected_at_load(src: str, dst: str, tagged: bool) -> None:
    params = make_params()
    source = CLASSES[src](params, **KW[src])
    run(source, params, range(2))
    sd = copy.deepcopy(source.state_dict())
    if not tagged:  # a state dict saved before the kind was recorded
        for group in sd["param_groups"]:
            del group[KIND_KEY]
    target_params = make_params(seed=1)
    target = CLASSES[dst](target_params, **KW[dst])
    run(target, target_params, range(1))
    before = snapshot(target)
    match = f"saved by a {CLASSES[src].KIND} optimizer; this is a {CLASSES[dst].KIND}" if tagged else "hyper-parameters"
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    assert_same(snapshot(target), before)
    run(target, target_params, range(1, 3))  # still steps


@pytest.mark.parametrize("name", list(CLASSES))
def test_untagged_state_dict_of_the_same_kind_still_loads(name: str) -> None:
    params = make_params()
    opt = CLASSES[name](params, **KW[name])
    run(opt, params, range(3))
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group[KIND_KEY]
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = CLASSES[name](resumed_params, **KW[name])
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0][KIND_KEY] == CLASSES[name].KIND
    run(opt, params, range(3, 8))
    run(resumed, resumed_params, range(3, 8))
    for a, b in zip(params, resumed_params):
        assert torch.equal(a.detach(), b.detach())


# ---------------------------------------------------------------------------------- 4. corrupted state
def _set(key: str, value: Callable[[Any], Any], index: int = 2) -> Callable[[dict[str, Any]], None]:
    """Corrupt ``state[index][key]`` (the last parameter by default, so that the valid earlier
    ones show that nothing is loaded before everything was checked)."""

    def corrupt(sd: dict[str, Any]) -> None:
        sd["state"][index][key] = value(sd["state"][index][key])

    return corrupt


def _poke(value: float, at: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    def poke(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[at] = value
        return t

    return poke


def _set_group(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def corrupt(sd: dict[str, Any]) -> None:
        sd["param_groups"][0][key] = value

    return corrupt


EIGHT = dict(state_bits=8, min_8bit_size=0)
CORRUPTIONS: dict[str, tuple[str, dict[str, Any], Callable[[dict[str, Any]], None], str]] = {
    "negative absmax": ("spam", EIGHT, _set("exp_avg_absmax", _poke(-1.0)), "exp_avg_absmax.*negative"),
    "nan absmax v": ("adamw", EIGHT, _set("exp_avg_sq_absmax", _poke(math.nan)), "exp_avg_sq_absmax.*non-finite"),
    "inf absmax": ("stable", EIGHT, _set("exp_avg_absmax", _poke(math.inf)), "exp_avg_absmax.*non-finite"),
    "codes int16": ("spam", EIGHT, _set("exp_avg_codes", lambda t: t.to(torch.int16)), "exp_avg_codes.*uint8"),
    "codes float": ("adamw", EIGHT, _set("exp_avg_sq_codes", lambda t: t.float()), "exp_avg_sq_codes"),
    "absmax int": ("spam", EIGHT, _set("exp_avg_absmax", lambda t: t.to(torch.int32)), "exp_avg_absmax.*dtype"),
    "step -5": ("spam", {}, _set("step", lambda _: -5), "'step'.*-5"),
    "step float": ("adamw", {}, _set("step", lambda _: 2.5), "'step'.*2.5"),
    "step bool": ("stable", {}, _set("step", lambda _: True), "'step'"),
    "stat_step -1": ("stable", {}, _set("stat_step", lambda _: -1), "'stat_step'"),
    "nan stats": ("stable", {}, _set("grad_stats", _poke(math.nan, 1)), "grad_stats.*non-finite"),
    "inf stats": ("stable", {}, _set("grad_stats", _poke(math.inf, 0)), "grad_stats.*non-finite"),
    "negative nu": ("stable", {}, _set("grad_stats", _poke(-3.0, 2)), "grad_stats.*negative"),
    "stats shape": ("stable", {}, _set("grad_stats", lambda t: t[:2].clone()), "grad_stats.*shape"),
    "negative v": ("adamw", {}, _set("exp_avg_sq", _poke(-1e-3)), "exp_avg_sq.*negative"),
    "nan m": ("spam", {}, _set("exp_avg", _poke(math.nan)), "'exp_avg'.*non-finite"),
    "inf v": ("stable", {}, _set("exp_avg_sq", _poke(math.inf)), "exp_avg_sq.*non-finite"),
    "int moments": ("adamw", {}, _set("exp_avg", lambda t: t.to(torch.int64)), "'exp_avg'.*dtype"),
    "moment not a tensor": ("spam", {}, _set("exp_avg_sq", lambda t: t.tolist()), "exp_avg_sq.*not a tensor"),
    "group lr": ("spam", {}, _set_group("lr", -1.0), "param group 0.*learning rate"),
    "group betas": ("stable", {}, _set_group("betas", (0.9, 1.5)), "param group 0.*beta2"),
    "group calls": ("adamw", {}, _set_group("calls", -2), "param group 0.*calls"),
    "group state_bits": ("adamw", {}, _set_group("state_bits", 4), "state_bits"),
    "group lacks key": ("spam", {}, lambda sd: sd["param_groups"][0].pop("threshold"), "lacks.*threshold"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_state_is_rejected_and_nothing_changes(case: str) -> None:
    name, extra, corrupt, match = CORRUPTIONS[case]
    params = make_params()
    source = CLASSES[name](params, **KW[name], **extra)
    run(source, params, range(3))
    good = copy.deepcopy(source.state_dict())
    bad = copy.deepcopy(good)
    corrupt(bad)
    target_params = make_params(seed=1)
    target = CLASSES[name](target_params, **KW[name], **extra)
    run(target, target_params, range(1))
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(bad)
    assert_same(snapshot(target), before)
    target.load_state_dict(good)  # the uncorrupted dict loads and steps finitely
    run(target, target_params, range(3, 5))
    assert all(p.isfinite().all() for p in target_params)


def _sparse_source() -> tuple[list[nn.Parameter], sl.SPAM]:
    params = make_params([(20, 30), (16, 16)])
    opt = sl.SPAM([{"params": params, "density": 0.3}], **KW["spam"], subset_seed=3)
    run(opt, params, range(2))
    return params, opt


def _rule(i: int, value: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(rule: torch.Tensor) -> torch.Tensor:
        rule = rule.clone()
        rule[i] = value
        return rule

    return change


SPARSE_CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "t_index past numel": (_set("subset", _rule(2, 10**6), 1), "out of range"),
    "negative seed": (_set("subset", _rule(0, -4), 1), "out of range"),
    "subset int32": (_set("subset", lambda r: r.to(torch.int32), 1), "int64"),
    "block starts": (_set("compact_block_starts", lambda t: t + 1, 1), "compact_block_starts"),
    "compact moment size": (_set("exp_avg_sq", lambda t: t[1:].clone(), 1), "selects"),
    "negative compact v": (_set("exp_avg_sq", _poke(-1.0), 1), "exp_avg_sq.*negative"),
    "nan compact m": (_set("exp_avg", _poke(math.nan), 1), "'exp_avg'.*non-finite"),
    "no subset drawn yet": (_set("subset_draws", lambda _: 0, 1), "'subset_draws'.*>= 1"),
    "draws float": (_set("subset_draws", lambda _: 2.0, 1), "'subset_draws'"),
    "negative base seed": (_set_group("subset_base_seed", -1), "subset_seed"),
    "base seed None": (_set_group("subset_base_seed", None), "subset_base_seed"),
}


@pytest.mark.parametrize("case", list(SPARSE_CORRUPTIONS))
def test_corrupted_sparse_state_is_rejected_and_nothing_changes(case: str) -> None:
    corrupt, match = SPARSE_CORRUPTIONS[case]
    _, source = _sparse_source()
    bad = copy.deepcopy(source.state_dict())
    corrupt(bad)
    target_params = make_params([(20, 30), (16, 16)], seed=1)
    target = sl.SPAM([{"params": target_params, "density": 0.3}], **KW["spam"], subset_seed=11)
    run(target, target_params, range(1))
    before = snapshot(target)  # the groups' base seeds and the states' draw counts included
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(bad)
    assert_same(snapshot(target), before)


def test_state_dict_of_generator_era_loads_and_continues_deterministically() -> None:
    # State dicts saved when subset seeds came from a torch.Generator have a top-level
    # "subset_generator", no 'subset_draws' and no group base seed: they load (the generator
    # is ignored, docs/algorithms.md §3) and continue alike in every optimizer they load into.
    params, source = _sparse_source()
    old = copy.deepcopy(source.state_dict())
    old["subset_generator"] = torch.zeros(5056, dtype=torch.uint8)
    for st in old["state"].values():
        del st["subset_draws"]
    for group in old["param_groups"]:
        del group["subset_base_seed"]
    twins = []
    for _ in range(2):
        target_params = [nn.Parameter(p.detach().clone()) for p in params]
        target = sl.SPAM([{"params": target_params, "density": 0.3}], **KW["spam"], subset_seed=3)
        target.load_state_dict(old)
        assert "subset_generator" not in target.state_dict()
        assert target.param_groups[0]["subset_base_seed"] == 3  # this optimizer's
        run(target, target_params, range(2, 10))  # resets at calls 4 and 8
        twins.append((target, target_params))
    (a, a_params), (b, b_params) = twins
    for p, q in zip(a_params, b_params):
        assert torch.equal(p, q)
        assert a.state[p]["subset_draws"] == 3  # assumed 1 at call 2, then two resets
        assert torch.equal(a.state[p]["subset"], b.state[q]["subset"])


# ---------------------------------------------------------------------------------- 5. overflowed moments
@pytest.mark.parametrize("name", ["spam", "adamw"])
def test_overflowed_32bit_moment_is_reported(name: str) -> None:
    params = make_params([(4, 5), (600,)])
    # SPAM would clip the 1e30 spike (clip_delay=1 makes step 1 a clipping step): clipping off here
    extra = {"spike_clipping": False} if name == "spam" else {}
    opt = CLASSES[name](
        [{"params": params[:1]}, {"params": params[1:], "state_bits": 8, "min_8bit_size": 0}], **KW[name], **extra
    )
    feed(params, 0)
    params[0].grad[1, 2] = 1e30  # finite; (1 - beta2) * g**2 = 1e57 overflows float32
    opt.step()
    assert opt.spike_stats()["nonfinite"] == 0  # the gradient was finite: the old counter misses it
    state = opt.state[params[0]]
    brute = sum(int((~state[k].isfinite()).sum()) for k in ("exp_avg", "exp_avg_sq"))
    assert brute == 1 and math.isinf(float(state["exp_avg_sq"][1, 2]))
    stats = opt.spike_stats()
    assert stats["nonfinite_state_entries"] == brute
    assert [g["nonfinite_state_entries"] for g in stats["groups"]] == [brute, 0]
    assert stats["nonfinite_state_blocks"] == 0  # the 8-bit group is fine


def test_nonfinite_state_entries_counts_every_32bit_moment() -> None:
    params = make_params()
    opt = sl.StableSPAM(params, **KW["stable"])
    run(opt, params, range(2))
    assert opt.spike_stats()["nonfinite_state_entries"] == 0
    opt.state[params[0]]["exp_avg"][0, 0] = math.nan
    opt.state[params[2]]["exp_avg_sq"][:3] = math.inf
    opt.state[params[2]]["exp_avg"][5] = -math.inf
    brute = sum(int((~opt.state[p][k].isfinite()).sum()) for p in params for k in ("exp_avg", "exp_avg_sq"))
    assert brute == 5
    assert opt.spike_stats()["nonfinite_state_entries"] == brute
    assert opt.spike_stats()["nonfinite_state_entries"] == brute  # a snapshot, not reset by reading


def test_nonfinite_state_entries_in_sparse_groups() -> None:
    params, opt = _sparse_source()
    opt.state[params[1]]["exp_avg_sq"][0] = math.inf
    assert opt.spike_stats()["nonfinite_state_entries"] == 1


# ---------------------------------------------------------------------------------- 6. rejected steps
@pytest.mark.parametrize("name", list(CLASSES))
def test_step_rejected_by_the_core_changes_nothing(name: str) -> None:
    cls = CLASSES[name]
    params, twin_params = make_params(), make_params()
    fresh, twin_fresh = nn.Parameter(torch.ones(5)), nn.Parameter(torch.ones(5))
    opt = cls([{"params": params}, {"params": [fresh]}], **KW[name])
    twin = cls([{"params": twin_params}, {"params": [twin_fresh]}], **KW[name])
    for o, ps in ((opt, params), (twin, twin_params)):
        run(o, ps, range(2))
    # a float64 moment: the core rejects the call after the checks in Python passed
    good_moment = opt.state[params[2]]["exp_avg"]
    opt.state[params[2]]["exp_avg"] = good_moment.double()
    feed(params, 2)
    fresh.grad = torch.ones(5)
    before = snapshot(opt)
    with pytest.raises(TypeError, match="exp_avgs"):
        opt.step()
    after = snapshot(opt)
    assert_same(after["params"], before["params"])
    assert [s["step"] for s in after["sd"]["state"].values()] == [2, 2, 2]
    assert_same(after["sd"], before["sd"])
    assert not opt.state.get(fresh)  # group 1 was not stepped, nor its state created
    assert [g["calls"] for g in opt.param_groups] == [2, 2]  # calls count step() calls, grads or not
    # with the moment repaired the same step gives what a twin that never failed gives
    opt.state[params[2]]["exp_avg"] = good_moment
    for o, ps, f in ((opt, params, fresh), (twin, twin_params, twin_fresh)):
        feed(ps, 2)
        f.grad = torch.ones(5)
        o.step()
    for a, b in zip([*params, fresh], [*twin_params, twin_fresh]):
        assert torch.equal(a.detach(), b.detach())
    assert_same(opt.state_dict(), twin.state_dict())


@pytest.mark.parametrize("name", list(CLASSES))
def test_bad_gradient_in_a_later_group_steps_no_group(name: str) -> None:
    params = make_params()
    opt = CLASSES[name]([{"params": params[:2]}, {"params": params[2:]}], **KW[name])
    run(opt, params, range(1))
    before = snapshot(opt)
    feed(params, 1)
    params[2].grad_dtype = None  # torch >= 2.10 refuses a grad of another dtype unless told
    params[2].grad = params[2].grad.double()
    with pytest.raises(RuntimeError, match="does not match"):
        opt.step()
    assert_same(snapshot(opt), before)


def test_rejected_sparse_reset_call_keeps_subsets_and_draw_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    params, opt = _sparse_source()
    twin_params, twin = _sparse_source()
    run(opt, params, range(2, 3))
    run(twin, twin_params, range(2, 3))  # the next call (4) is a reset: new subsets are drawn
    before = snapshot(opt)  # 'subset_draws' included
    real = F.sparse_spam_step

    def rejecting(*args: Any, **kwargs: Any) -> None:
        raise TypeError("the core rejects this call")

    monkeypatch.setattr(F, "sparse_spam_step", rejecting)
    feed(params, 3)
    with pytest.raises(TypeError, match="core rejects"):
        opt.step()
    assert_same(snapshot(opt), before)
    monkeypatch.setattr(F, "sparse_spam_step", real)
    run(opt, params, range(3, 6))
    run(twin, twin_params, range(3, 6))
    for a, b in zip(params, twin_params):
        assert torch.equal(a.detach(), b.detach())
    assert_same(opt.state_dict(), twin.state_dict())


# ---------------------------------------------------------------------------------- 7. named parameters
def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("name", list(CLASSES))
def test_named_parameters_and_state_dict_round_trip(name: str) -> None:
    cls = CLASSES[name]
    named, plain = _model(), _model()
    opt = cls(named.named_parameters(), **KW[name])
    ref = cls(plain.parameters(), **KW[name])
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    run(opt, list(named.parameters()), range(3))
    run(ref, list(plain.parameters()), range(3))
    for a, b in zip(named.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    resumed_model = _model()
    resumed_model.load_state_dict(named.state_dict())
    resumed = cls(resumed_model.named_parameters(), **KW[name])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["param_names"] == sd["param_groups"][0]["param_names"]
    run(opt, list(named.parameters()), range(3, 8))
    run(resumed, list(resumed_model.parameters()), range(3, 8))
    for a, b in zip(named.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CLASSES))
def test_named_param_groups_like_torch(name: str) -> None:
    cls = CLASSES[name]
    model = _model()
    named = list(model.named_parameters())
    opt = cls([{"params": named[:2]}, {"params": named[2:], "lr": 3e-3}], **KW[name])
    torch_opt = torch.optim.AdamW([{"params": named[:2]}, {"params": named[2:], "lr": 3e-3}])
    assert [g["param_names"] for g in opt.param_groups] == [g["param_names"] for g in torch_opt.param_groups]
    assert opt.param_groups[1]["lr"] == 3e-3
    with pytest.raises(ValueError, match="with/without names"):
        cls([named[0], model[2].bias], **KW[name])
    with pytest.raises(ValueError, match="with/without names"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})  # unnamed into a named optimizer
    assert len(opt.param_groups) == 2
    opt.add_param_group({"params": [("extra", nn.Parameter(torch.zeros(2)))]})
    assert opt.param_groups[2]["param_names"] == ["extra"]


# ---------------------------------------------------------------------------------- 8. subset seeds
@pytest.mark.parametrize(
    ("seed", "error"),
    [(2**70, ValueError), (2**64, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), ("7", TypeError)],
)
def test_bad_subset_seed_is_rejected_at_construction(seed: Any, error: type) -> None:
    with pytest.raises(error, match="subset_seed"):
        sl.SPAM([{"params": [nn.Parameter(torch.zeros(8, 8))], "density": 0.5}], subset_seed=seed)


def test_largest_subset_seed_steps() -> None:
    p = nn.Parameter(torch.zeros(8, 8))
    opt = sl.SPAM([{"params": [p], "density": 0.5}], subset_seed=2**64 - 1)
    p.grad = torch.ones(8, 8)
    opt.step()
    assert int(opt.state[p]["exp_avg"].numel()) == 32


# ---------------------------------------------------------------------------------- 9. several processes
def _rank_subsets(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.manual_seed(100 + rank)  # ranks commonly seed their global RNG apart (data order, dropout)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        params = make_params([(20, 30), (16, 16)])
        opt = sl.SPAM([{"params": params, "density": 0.3}], reset_interval=2)  # subset_seed=None
        run(opt, params, range(3))  # the first subsets, then those of the reset at call 2
        for p in params:
            dist.all_reduce(p.detach())  # a collective: both ranks really ran together
        torch.save(
            {"rules": [opt.state[p]["subset"] for p in params], "params": [p.detach() for p in params]},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ranks_draw_the_same_subsets_without_a_seed(tmp_path: Path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("needs torch.distributed")
    # Two real processes. Not torch.multiprocessing.spawn: its children unpickle _rank_subsets by
    # module name, and this file is no importable module under pytest's importlib mode. Each
    # child loads this file by path and runs in tmp_path, so a source checkout in the working
    # directory cannot shadow the installed package.
    port = _free_port()
    loader = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('robustness', sys.argv[1]); "
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); "
        "mod._rank_subsets(int(sys.argv[2]), 2, int(sys.argv[3]), sys.argv[4])"
    )
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", loader, __file__, str(rank), str(port), str(tmp_path)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, proc in enumerate(ranks):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"rank {rank} failed:\n{out}"
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for a, b in zip(r0["rules"], r1["rules"]):
        assert torch.equal(a, b)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # same subsets and gradients: the replicas did not diverge
    # and it is the documented default seed
    params = make_params([(20, 30), (16, 16)])
    opt = sl.SPAM([{"params": params, "density": 0.3}], reset_interval=2, subset_seed=sl.optim.spam.DEFAULT_SUBSET_SEED)
    run(opt, params, range(3))
    for p, rule in zip(params, r0["rules"]):
        assert torch.equal(opt.state[p]["subset"], rule)
