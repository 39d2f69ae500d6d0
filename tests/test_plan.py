"""spam_lowmem.plan (spam_lowmem/planner.py): budget parsing, preset choice, exact predicted == measured state bytes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import spam_lowmem as sl
from spam_lowmem.planner import PRESETS, Preset, galore_state_bytes, parse_budget


class Attn(nn.Module):
    def __init__(self, hidden: int, kv: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)  # 2048 < min_8bit_size: 8-bit fallback
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=True)  # 1-D bias stays in the dense group


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class Layer(nn.Module):
    def __init__(self, hidden: int, kv: int, inter: int) -> None:
        super().__init__()
        self.self_attn = Attn(hidden, kv)
        self.mlp = MLP(hidden, inter)
        self.input_layernorm = nn.Parameter(torch.ones(hidden))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 100, hidden: int = 64, kv: int = 32, inter: int = 176, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(hidden, kv, inter) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(hidden))


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return TinyLlama().to(dtype)


def _step(opt: torch.optim.Optimizer, model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ exact predictions
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_predicted_equals_measured(name: str) -> None:
    model = _model()
    p = sl.plan(model, preset=name)
    assert p.preset.name == name
    opt = p.build(lr=1e-3, subset_seed=0) if p.preset.sparse else p.build(lr=1e-3)
    assert isinstance(opt, sl.SPAM)
    _step(opt, model)
    cmp = p.compare_measured(opt)
    assert cmp["match"], cmp
    assert cmp["measured_total"] == p.predicted_total == opt.memory_report()["total_bytes"]
    assert cmp["uninitialised"] == 0
    assert len(p.predicted_bytes) == len(p.param_groups) == len(opt.param_groups)
    # per parameter too
    measured = [e["total"] for e in opt.memory_report()["params"]]
    assert measured == [b for group in p.predicted_param_bytes for b in group]
    assert name in p.report() and str(p.predicted_total) in p.report()


def test_predictions_shrink_along_the_preset_order() -> None:
    totals = [sl.plan(_model(), preset=n).predicted_total for n in PRESETS]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)


@pytest.mark.parametrize("optimizer,cls", [("stable-spam", sl.StableSPAM), ("adamw", sl.AdamW)])
@pytest.mark.parametrize("name", ["full-32", "8bit"])
def test_other_optimizers_predicted_equals_measured(optimizer: str, cls: type, name: str) -> None:
    model = _model()
    p = sl.plan(model, preset=name, optimizer=optimizer)
    opt = p.build(lr=1e-3)
    assert isinstance(opt, cls)
    _step(opt, model)
    cmp = p.compare_measured(opt)
    assert cmp["match"], cmp
    if optimizer == "stable-spam":  # grad_stats: 12 bytes per tensor
        spam = sl.plan(_model(), preset=name).predicted_total
        assert p.predicted_total == spam + 12 * len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["stable-spam", "adamw"])
def test_sparse_presets_only_for_spam(optimizer: str) -> None:
    model = _model()
    with pytest.raises(ValueError, match="only for optimizer='spam'"):
        sl.plan(model, preset="8bit-sparse-0.25", optimizer=optimizer)
    # automatic choice skips them: the smallest feasible is then 8bit
    eight = sl.plan(model, preset="8bit", optimizer=optimizer).predicted_total
    assert sl.plan(model, budget=eight, optimizer=optimizer).preset.name == "8bit"
    with pytest.raises(ValueError, match=f"smallest feasible budget is {eight} bytes"):
        sl.plan(model, budget=eight - 1, optimizer=optimizer)


def test_bf16_parameters_and_dtype_override() -> None:
    model = _model(torch.bfloat16)
    p = sl.plan(model, preset="full-32")
    assert p.predicted_total == 2 * 2 * _numel(model)  # moments in the parameter dtype
    opt = p.build(lr=1e-3)
    _step(opt, model)
    assert p.compare_measured(opt)["match"]
    # planning a float32 model that will be cast to bf16
    assert sl.plan(_model(), preset="full-32", dtype=torch.bfloat16).predicted_total == p.predicted_total


def test_min_8bit_size_and_build_guards() -> None:
    model = _model()
    p = sl.plan(model, preset="8bit", min_8bit_size=0)  # no fallback: every tensor 8-bit
    opt = p.build(lr=1e-3)
    _step(opt, model)
    assert p.compare_measured(opt)["match"]
    assert opt.memory_report()["fallbacks"] == []
    with pytest.raises(ValueError, match="state layout"):
        p.build(state_bits=32)


def test_sparse_plan_groups_and_kwargs() -> None:
    model = _model()
    p = sl.plan(model, preset="8bit-sparse-0.25")
    assert p.optimizer_kwargs == {"state_bits": 8, "min_8bit_size": 4096, "density": 0.25}
    sparse, dense = p.param_groups
    assert sparse["density"] == 0.25 and dense["density"] == 1.0
    assert all(t.dim() == 2 for t in sparse["params"]) and len(sparse["params"]) == 14
    # building twice works (torch mutates group dicts; the plan keeps its own)
    p.build(lr=1e-3)
    p.build(lr=1e-3)


# ------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    "text,expected",
    [
        (123456, 123456),
        ("123456B", 123456),
        ("2e9B", 2_000_000_000),
        ("1.5GB", 1_500_000_000),
        ("800MiB", 800 * 2**20),
        ("1GiB", 2**30),
        ("3 kB", 3000),
        (" 2 GiB ", 2 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        (2e9, 2_000_000_000),
        ("512b", 512),
        ("1.5gb", 1_500_000_000),
        ("1.3MiB", 1363148),  # 1363148.8: a larger unit rounds down to whole bytes (a budget is a ceiling)
        ("1.001kB", 1001),
        ("4.1MB", 4_100_000),  # decimal arithmetic: in floats 1.001 * 1000 is 1000.99...
        (".5 GiB", 2**29),
        ("+2GB", 2_000_000_000),
        (np.int64(4096), 4096),
        (np.float64(4096.0), 4096),
    ],
)
def test_parse_budget_bytes(text: object, expected: int) -> None:
    got = parse_budget(text)
    assert got == expected and type(got) is int


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "lots",
        "1.5XB",
        "-3GB",
        "0",
        "galore:",
        "galore:x",
        "%",
        True,
        1.5,
        None,
        "25%%",
        # no unit: "1.5" used to read as 1 byte, "2e9" and "123456" as bytes
        "1.5",
        "2e9",
        "123456",
        " 7 ",
        "0GB",
        "-1.5GiB",
        "nan",
        "nanGB",
        "inf GB",
        "-inf",
        "0.5B",
        "1.5B",
        "0.0001kB",
        "1e999999999GB",
        "16777217TiB",
        "galore:0",
        "0%",
        "-5%",
        "1e400%",
        0,
        -1,
        0.0,
        0.5,
        float("nan"),
        float("inf"),
        2**40 + 0.5 - 0.25,
        [1],
    ],
)
def test_parse_budget_rejects_with_the_input_named(bad: object) -> None:
    with pytest.raises(
        ValueError,
        match=repr(bad)
        .replace("(", r"\(")
        .replace("[", r"\[")
        .replace(".", r"\.")
        .replace("%", "%")
        .replace("*", r"\*"),
    ):
        parse_budget(bad, _model())


@pytest.mark.parametrize(
    "bad,why",
    [
        ("1.5", "no unit (a bare number is ambiguous: bytes? GB?); write e.g. '1.5GB' or '1.5GiB'"),
        ("2XB", "unknown unit 'XB'"),
        ("-3GB", "the size must be positive"),
        ("0GB", "the size must be positive"),
        ("nan GB", "the size must be a finite number"),
        ("1.5B", "a fractional number of bytes"),
        (1.5, "a fractional number of bytes"),
        (float("nan"), "the number of bytes must be finite and >= 1"),
        (0, "the number of bytes must be >= 1"),
        ("galore:0", "the GaLore rank must be >= 1"),
        ("0%", "the fraction must be a positive, finite percentage"),
    ],
)
def test_bad_budgets_say_why_and_list_the_accepted_forms(bad: object, why: str) -> None:
    model = _model()
    with pytest.raises(ValueError) as err:
        sl.plan(model, budget=bad)
    message = str(err.value)
    assert message.startswith(f"cannot parse budget {bad!r}: {why}"), message
    for form in (
        "an int of bytes",
        "'1.5GB'",
        "'800MiB'",
        "'512B'",
        "'25%'",
        "'galore:RANK'",
        "'adam-mini'",
        "KiB/MiB/GiB/TiB or K/M/G/T (powers of 1024)",
        "kB/MB/GB/TB (powers of 1000)",
    ):
        assert form in message, (form, message)


def test_a_bare_number_string_is_not_bytes() -> None:
    # a whole number of bytes is an int (or a string with B); a bare string is refused, not read as bytes
    model = _model()
    assert sl.plan(model, budget="10GB").preset.name == "full-32"
    with pytest.raises(ValueError, match="no unit"):
        sl.plan(model, budget="10")
    assert parse_budget(10**10) == parse_budget("10GB") == parse_budget("10000000000B") == 10**10


def test_relative_budgets_need_a_model() -> None:
    with pytest.raises(ValueError, match="model"):
        parse_budget("25%")


def test_fraction_budget() -> None:
    model = _model()
    adamw32 = 8 * _numel(model)
    assert parse_budget("100%", model) == adamw32
    assert parse_budget("25%", model) == adamw32 // 4
    assert sl.plan(model, budget="100%").preset.name == "full-32"
    assert sl.plan(model, budget="99%").preset.name == "8bit"
    cand = sl.plan(model).candidates
    # 8bit needs ~25.7% here (k/v projections and 1-D tensors fall back to dense)
    assert cand["8bit"] / adamw32 > 0.25
    assert sl.plan(model, budget="25%").preset.name == "8bit-sparse-0.43"
    assert sl.plan(model, budget="10%").preset.name == "8bit-sparse-0.25"
    assert sl.plan(model, budget="6%").preset.name == "8bit-sparse-0.05"


def test_galore_budget() -> None:
    model = _model()
    # formula: 4 bytes x sum_W [2 r max + r min] on the 7 projections per layer + 8 B/elem elsewhere
    r = 8
    proj = 2 * 4 * (2 * (2 * r * 64 + r * 64) + 2 * (2 * r * 64 + r * 32) + 3 * (2 * r * 176 + r * 64))
    rest = 8 * (100 * 64 + 64 + 2 * (64 + 64))
    assert galore_state_bytes(model, r) == parse_budget("galore:8", model) == proj + rest
    # consistency with density_for_galore_rank: proj bytes / (8 bytes x projection elements)
    proj_numel = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176)
    assert proj / (8 * proj_numel) == pytest.approx(sl.density_for_galore_rank(model, r))
    assert sl.plan(model, budget="galore:8").preset.name == "8bit-sparse-0.43"
    assert sl.plan(model, budget="galore:2").preset.name == "8bit-sparse-0.25"
    assert sl.plan(model, budget="galore:1").preset.name == "8bit-sparse-0.05"
    assert sl.plan(model, budget="galore:16").preset.name == "8bit"
    assert sl.plan(model, budget="galore:64").preset.name == "full-32"  # rank not clamped, as the formula


def test_adam_mini_budget() -> None:
    model = _model()
    n_tensors = len(list(model.parameters()))
    assert parse_budget("adam-mini", model) == 4 * _numel(model) + 4 * n_tensors
    # about half of AdamW: full-32 does not fit, 8-bit does
    assert sl.plan(model, budget="adam-mini").preset.name == "8bit"


def test_impossible_budget_names_the_smallest_feasible() -> None:
    model = _model()
    smallest = sl.plan(model, preset="smallest").predicted_total
    assert sl.plan(model, budget=smallest).preset.name == "smallest"
    with pytest.raises(ValueError, match=f"smallest feasible budget is {smallest} bytes") as err:
        sl.plan(model, budget=smallest - 1)
    assert "kB" in str(err.value) and "KiB" in str(err.value)


def test_budget_picks_the_most_accurate_fit_exactly_at_the_boundary() -> None:
    model = _model()
    totals = sl.plan(model).candidates
    names = list(PRESETS)
    for i, name in enumerate(names):
        assert sl.plan(model, budget=totals[name]).preset.name == name
        if i + 1 < len(names):
            assert sl.plan(model, budget=totals[name] - 1).preset.name == names[i + 1]


def test_presets_by_name_and_errors() -> None:
    model = _model()
    assert sl.plan(model).preset.name == "full-32"  # no budget: most accurate
    assert sl.plan(model, budget="1GB", preset="8bit").preset.name == "8bit"
    custom = Preset("d0.5", 8, 0.5)
    assert sl.plan(model, preset=custom).optimizer_kwargs["density"] == 0.5
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        sl.plan(model, preset="nope")
    with pytest.raises(ValueError, match="unknown optimizer"):
        sl.plan(model, optimizer="sgd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["8bit"].density = 0.5  # type: ignore[misc]


def test_trainer_planned_kwargs() -> None:
    from spam_lowmem.train.optimizers import planned_kwargs

    model = _model()
    assert planned_kwargs(model, 10**9) == {"state_bits": 32, "min_8bit_size": 4096}
    smallest = sl.plan(model, preset="smallest").predicted_total
    assert planned_kwargs(model, smallest)["density"] == 0.01
