"""Memory planner: pick the most accurate optimizer preset whose state fits a byte budget.

    p = spam_lowmem.plan(model, budget="1.5GB")        # or "25%", "galore:128", "adam-mini"
    print(p.report())
    opt = p.build(lr=1e-3)
    ...one step...
    print(p.compare_measured(opt))

Predictions are exact: they follow the same layout rules as the optimizers' state
(:mod:`spam_lowmem.optim.moments`, :class:`spam_lowmem.SPAM` sparse groups) and equal
``opt.memory_report()["total_bytes"]`` once every parameter has taken a step (state is created
lazily, so a parameter that never had a gradient measures 0). For sparse presets the prediction
is the first, exact subset of ``floor(d * numel)`` entries; a subset drawn at a momentum reset is
Bernoulli(d) per entry, so its size (and the state) then varies slightly around that value.

Sparse presets exist only for ``optimizer="spam"`` (StableSPAM and AdamW have no sparse
momentum) and only on CPU and CUDA (the devices with a sparse kernel): automatic selection skips
them elsewhere, and asking for one by name raises ValueError.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import torch
from torch import nn

from .qmap import block_layout, num_blocks
from .sparse import DEFAULT_TARGETS, _target_linears, sparse_param_groups

__all__ = ["PRESETS", "Plan", "Preset", "format_bytes", "parse_budget", "plan", "predict_param_bytes"]

OPTIMIZERS = ("spam", "stable-spam", "adamw")
#: keys whose change would invalidate a plan's prediction (not accepted by Plan.build overrides)
_MEMORY_KEYS = ("state_bits", "min_8bit_size", "density")
_STABLE_SPAM_EXTRA = 12  # grad_stats: 3 x float32 per parameter tensor
_SUBSET_RULE_BYTES = 32  # int64 [seed, t_hash, t_index, numel]


@dataclass(frozen=True)
class Preset:
    """A named optimizer-state configuration.

    ``density`` < 1: the weights of the ``nn.Linear`` modules named like attention / MLP
    projections (:data:`spam_lowmem.sparse.DEFAULT_TARGETS`) keep sparse momentum with that
    density; every other parameter is dense. ``state_bits`` applies to all groups.
    """

    name: str
    state_bits: int
    density: float = 1.0
    description: str = ""

    @property
    def sparse(self) -> bool:
        return self.density < 1.0


#: Presets from the most accurate (largest state) to the smallest; automatic selection takes
#: the first one that fits.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("full-32", 32, 1.0, "SPAM, moments in the parameter dtype"),
        Preset("8bit", 8, 1.0, "blockwise 8-bit moments"),
        Preset("8bit-sparse-0.43", 8, 0.43, "8-bit, sparse momentum d=0.43 on attn/mlp weights"),
        Preset("8bit-sparse-0.25", 8, 0.25, "8-bit, sparse momentum d=0.25 on attn/mlp weights"),
        Preset("8bit-sparse-0.05", 8, 0.05, "8-bit, sparse momentum d=0.05 on attn/mlp weights"),
        Preset("smallest", 8, 0.01, "8-bit, sparse momentum d=0.01 on attn/mlp weights"),
    )
}


# ---------------------------------------------------------------------------------- formatting
def format_bytes(n: int) -> str:
    """``"1234567890 B (1.23 GB, 1.15 GiB)"``."""
    n = int(n)
    if n < 1000:
        return f"{n} B"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            dec = f"{n / size:.3g} {unit}"
            break
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            binary = f"{n / size:.3g} {unit}"
            break
    else:
        binary = f"{n} B"
    return f"{n} B ({dec}, {binary})"


# ---------------------------------------------------------------------------------- budgets
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
#: a number as a person writes it, then the unit: "1.5GB", "2e9 B", ".5 GiB", "-3GB", "nan GB"
_SIZE = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?|[+-]?(?:nan|inf(?:inity)?))\s*([a-z]*)", re.IGNORECASE)
_NUMBER = r"(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
_MAX_SIZE = 2**64
SIZE_UNITS = "B, kB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB or K/M/G/T (powers of 1024)"
_ACCEPTED = (
    "use an int of bytes (2_000_000_000), a size with its unit ('1.5GB', '800MiB', '512B'; units "
    f"{SIZE_UNITS}), a fraction of 32-bit AdamW state ('25%'), 'galore:RANK' or 'adam-mini'"
)


def _size_bytes(text: str) -> int:
    """Whole bytes from a size with its unit (``"1.5GB"``, ``"800 MiB"``, ``"512B"``, case-blind).

    Raises ValueError saying what is wrong (the caller names the input). A number without a
    unit is refused: ``"1.5"`` is far more likely a size in GB than 1 byte. Sizes in a larger
    unit are rounded down to whole bytes (a budget is a ceiling: ``"1.3MiB"`` is 1363148 bytes);
    a size in bytes must be whole already. Arithmetic is decimal, so ``"1.001kB"`` is 1001
    (in binary floats 1.001 * 1000 is 1000.99..., which would round down to 1000).
    """
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError("not a number followed by a unit")
    number, unit_as_given = m.groups()
    unit = unit_as_given.lower()
    value = Decimal(number)
    if not value.is_finite():
        raise ValueError("the size must be a finite number")
    if value <= 0:
        raise ValueError("the size must be positive")
    if not unit:
        raise ValueError(f"no unit (a bare number is ambiguous: bytes? GB?); write e.g. '{number}GB' or '{number}GiB'")
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit_as_given!r}")
    # more than 2**64 bytes even in bytes: refused before the product can overflow the decimal context
    nbytes = value * _UNITS[unit] if value.adjusted() < 20 else Decimal(_MAX_SIZE + 1)
    if unit == "b" and nbytes != nbytes.to_integral_value():
        raise ValueError("a fractional number of bytes; give whole bytes or a larger unit")
    if nbytes < 1:
        raise ValueError("less than one byte")
    if nbytes > _MAX_SIZE:  # no memory is that large; also keeps int() from building a huge number
        raise ValueError("more than 2**64 bytes")
    return int(nbytes)  # truncates toward zero: rounds down, the value being positive


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # torch de-duplicates shared parameters


def galore_state_bytes(model: nn.Module, rank: int, targets: tuple[str, ...] = DEFAULT_TARGETS) -> int:
    """Optimizer-state bytes of GaLore at ``rank``: on each targeted projection weight (m x n)
    ``2 r max(m, n) + r min(m, n)`` float32 values (the numerator of
    :func:`spam_lowmem.density_for_galore_rank`: two projected Adam moments plus the projector),
    and 32-bit AdamW state (8 bytes/element) on every other parameter."""
    if rank <= 0:
        raise ValueError(f"Invalid GaLore rank: {rank} (expected > 0)")
    seen: set[int] = set()
    total = 0
    for lin in _target_linears(model, targets):
        if id(lin.weight) in seen:
            continue
        seen.add(id(lin.weight))
        m, n = lin.weight.shape
        total += 4 * (2 * rank * max(m, n) + rank * min(m, n))
    if not seen:
        raise ValueError(f"galore budget: the model has no nn.Linear matching the targets {targets}")
    total += sum(8 * p.numel() for p in _unique_params(model) if id(p) not in seen)
    return total


def adam_mini_state_bytes(model: nn.Module) -> int:
    """Approximate optimizer-state bytes of Adam-mini: a full float32 first moment (4 bytes per
    element) plus one float32 second moment per block, counting one block per parameter tensor.
    (Adam-mini's real partition uses one block per head of q/k and per output row elsewhere;
    those few extra floats are ignored, so this slightly under-estimates its state.)"""
    params = _unique_params(model)
    return sum(4 * p.numel() for p in params) + 4 * len(params)


def parse_budget(budget: Any, model: nn.Module | None = None) -> int:
    """Bytes from a budget.

    * an ``int`` of bytes (``2_000_000_000``; a float only if it is whole, such as ``2e9``:
      ``1.5`` bytes is refused rather than rounded, it is most likely meant in GB);
    * a string with a unit: ``"1.5GB"``, ``"800MiB"``, ``"2e9B"``, ``"512 B"`` (kB/MB/GB/TB are
      powers of 1000, KiB/MiB/GiB/TiB and bare K/M/G/T powers of 1024, as the CLI's
      ``--budget``; case-blind). A number without a unit (``"1.5"``) is refused as ambiguous.
      A size in a unit larger than B is rounded down to whole bytes;
    * ``"25%"``: that fraction of 32-bit AdamW state (8 bytes per parameter element);
    * ``"galore:128"``: GaLore's state at rank 128 (:func:`galore_state_bytes`);
    * ``"adam-mini"``: Adam-mini's state, approximately (:func:`adam_mini_state_bytes`).

    The last three need ``model``. Anything else (no or an unknown unit, zero, negative, NaN or
    infinite sizes, less than one byte) raises ValueError naming the input and the accepted forms.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f"cannot parse budget {budget!r}: {why}; {_ACCEPTED}")

    if isinstance(budget, bool):  # an int subclass, but never meant as 0 or 1 byte
        raise bad("a bool is not a size")
    if isinstance(budget, numbers.Integral):  # int, numpy integers
        if budget < 1:
            raise bad("the number of bytes must be >= 1")
        return int(budget)
    if isinstance(budget, numbers.Real):  # float, numpy floats
        value = float(budget)
        if not math.isfinite(value) or value < 1:
            raise bad("the number of bytes must be finite and >= 1")
        if not value.is_integer():
            raise bad("a fractional number of bytes (pass an int, or a string with its unit such as '1.5GB')")
        return int(value)
    if not isinstance(budget, str):
        raise bad(f"expected bytes (int) or a string, got {type(budget).__name__}")
    text = budget.strip().lower()

    def need_model() -> nn.Module:
        if model is None:
            raise ValueError(f"budget {budget!r} is relative to a model; pass the model")
        return model

    if m := re.fullmatch(_NUMBER + r"\s*%", text):
        frac = float(m.group(1)) / 100.0
        if not (math.isfinite(frac) and frac > 0):
            raise bad("the fraction must be a positive, finite percentage")
        nbytes = int(frac * 8 * sum(p.numel() for p in _unique_params(need_model())))
        if nbytes < 1:
            raise bad("less than one byte of this model's AdamW state")
        return nbytes
    if m := re.fullmatch(r"galore\s*:\s*(\d+)", text):
        if int(m.group(1)) < 1:
            raise bad("the GaLore rank must be >= 1")
        return galore_state_bytes(need_model(), int(m.group(1)))
    if text in ("adam-mini", "adam_mini", "adammini"):
        return adam_mini_state_bytes(need_model())
    try:
        return _size_bytes(budget)  # as given: an unknown unit is quoted in the user's case
    except ValueError as exc:
        raise bad(str(exc)) from None


# ---------------------------------------------------------------------------------- prediction
def _moment_bytes(count: int, quantized: bool, element_size: int, blocks: int | None = None) -> int:
    """Two moments of ``count`` values; 8-bit: codes and ``blocks`` absmax each (flat blocks,
    ``num_blocks(count)``, unless given)."""
    if quantized:
        return 2 * count + 2 * 4 * (num_blocks(count) if blocks is None else blocks)
    return 2 * count * element_size


def predict_param_bytes(
    p: torch.Tensor,
    *,
    state_bits: int = 32,
    density: float = 1.0,
    min_8bit_size: int = 4096,
    optimizer: str = "spam",
    dtype: torch.dtype | None = None,
) -> int:
    """Exact optimizer-state bytes of one parameter once initialised (the optimizers' rules).

    Dense: two moments in the parameter dtype (``2 numel element_size``), or 8-bit when
    ``state_bits == 8`` and ``numel >= min_8bit_size``: ``2 numel`` codes +
    ``2 * 4 R ceil(L/256)`` absmax bytes (blocks restart at each of the ``R`` rows of ``L``
    elements of a ``dim() >= 2`` parameter; ``ceil(numel/256)`` for 1-D). Sparse (SPAM,
    ``density < 1``): the same over the ``k = floor(d numel)`` selected entries (flat blocks;
    8-bit decided by the full ``numel``), plus the subset rule (32 bytes) and
    ``compact_block_starts`` (``8 ceil(k/256)``). Stable-SPAM adds ``grad_stats`` (12 bytes per
    tensor).
    """
    numel = p.numel()
    element_size = torch.empty((), dtype=dtype or p.dtype).element_size()
    quantized = state_bits == 8 and numel >= min_8bit_size
    if density < 1.0:
        k = math.floor(density * numel)  # as sparse_subset.exact_rule
        blocks = num_blocks(k)
        total = _moment_bytes(k, quantized, element_size) + _SUBSET_RULE_BYTES + 8 * blocks
    else:
        rows, per_row = block_layout(p.shape)
        total = _moment_bytes(numel, quantized, element_size, rows * per_row)
    if optimizer == "stable-spam":
        total += _STABLE_SPAM_EXTRA
    return total


def _optimizer_class(name: str) -> type:
    from .optim import SPAM, AdamW, StableSPAM

    return {"spam": SPAM, "stable-spam": StableSPAM, "adamw": AdamW}[name]


def _preset_problem(preset: Preset, optimizer: str, model: nn.Module) -> str | None:
    """Why ``preset`` cannot be used here, or None."""
    if not preset.sparse:
        return None
    if optimizer != "spam":
        return f"sparse momentum (preset {preset.name!r}) exists only for optimizer='spam', not {optimizer!r}"
    devices = {p.device.type for p in _unique_params(model)}
    if devices - {"cpu", "cuda"}:
        return f"sparse momentum (preset {preset.name!r}) runs on CPU and CUDA only; the model is on {sorted(devices)}"
    return None


# ---------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """A chosen preset, ready to build, with its exact predicted optimizer-state bytes.

    ``optimizer_kwargs`` are the memory keywords (``state_bits``, ``min_8bit_size`` and, for
    sparse presets, ``density``: the form the CLI's ``extra=`` takes); ``param_groups`` are
    ready for the optimizer class (each group carries its own ``density`` when sparse).
    ``predicted_bytes`` holds one total per group, ``predicted_param_bytes`` one list per group.
    """

    preset: Preset
    optimizer: str
    optimizer_kwargs: dict[str, Any]
    param_groups: list[dict[str, Any]]
    predicted_bytes: list[int]
    predicted_param_bytes: list[list[int]]
    budget: int | None = None
    candidates: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def predicted_total(self) -> int:
        return sum(self.predicted_bytes)

    def to_kwargs(self) -> dict[str, Any]:
        return dict(self.optimizer_kwargs)

    def _group_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.optimizer_kwargs.items() if k != "density"}

    def build(self, **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer over :attr:`param_groups`; ``overrides`` are other keywords (``lr``, ...).

        Keywords that change the state layout (state_bits, min_8bit_size, density) are refused:
        make a new plan instead, so the prediction stays true.
        """
        bad = [k for k in overrides if k in _MEMORY_KEYS]
        if bad:
            raise ValueError(
                f"Plan.build: {bad} would change the planned state layout; call "
                "spam_lowmem.plan(...) with another preset instead"
            )
        groups = [{**g, "params": list(g["params"])} for g in self.param_groups]  # torch mutates groups
        return _optimizer_class(self.optimizer)(groups, **self._group_kwargs(), **overrides)

    def report(self) -> str:
        """Markdown table of the predicted state bytes per group."""
        lines = [
            f"plan: preset `{self.preset.name}` ({self.preset.description}), optimizer `{self.optimizer}`",
            "",
            "| group | tensors | elements | density | state_bits | predicted bytes |",
            "|---|---|---|---|---|---|",
        ]
        bits = self.optimizer_kwargs.get("state_bits", 32)
        for i, (g, b) in enumerate(zip(self.param_groups, self.predicted_bytes)):
            numel = sum(p.numel() for p in g["params"])
            lines.append(
                f"| {i} | {len(g['params'])} | {numel} | {g.get('density', 1.0)} | {bits} | {format_bytes(b)} |"
            )
        lines.append(f"| total | | | | | {format_bytes(self.predicted_total)} |")
        if self.budget is not None:
            lines += ["", f"budget: {format_bytes(self.budget)}"]
        return "\n".join(lines)

    def compare_measured(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """Measured (``opt.memory_report()``) against predicted bytes, per group and in total.

        ``match`` is True when every group's bytes equal the prediction. Parameters not yet
        initialised (no step with a gradient) measure 0 and are counted in ``uninitialised``.
        ``cuda_max_memory_allocated`` is added when CUDA is available.
        """
        report = opt.memory_report()  # type: ignore[attr-defined]
        entries = report["params"]
        groups, start = [], 0
        for i, g in enumerate(opt.param_groups):
            part = entries[start : start + len(g["params"])]
            start += len(g["params"])
            measured = sum(e["total"] for e in part)
            predicted = self.predicted_bytes[i] if i < len(self.predicted_bytes) else None
            groups.append(
                {
                    "group": i,
                    "measured": measured,
                    "predicted": predicted,
                    "difference": None if predicted is None else measured - predicted,
                }
            )
        out: dict[str, Any] = {
            "preset": self.preset.name,
            "measured_total": report["total_bytes"],
            "predicted_total": self.predicted_total,
            "difference": report["total_bytes"] - self.predicted_total,
            "groups": groups,
            "uninitialised": sum(not e["initialised"] for e in entries),
        }
        out["match"] = len(groups) == len(self.predicted_bytes) and all(g["difference"] == 0 for g in groups)
        if torch.cuda.is_available():
            out["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        return out


def _make_plan(
    model: nn.Module, preset: Preset, optimizer: str, dtype: torch.dtype | None, min_8bit_size: int, budget: int | None
) -> Plan:
    kwargs: dict[str, Any] = {"state_bits": preset.state_bits, "min_8bit_size": min_8bit_size}
    if preset.sparse:
        kwargs["density"] = preset.density
        groups = sparse_param_groups(model, preset.density)
        for g in groups:
            g.setdefault("density", 1.0)
    else:
        groups = [{"params": _unique_params(model)}]
    per_param = [
        [
            predict_param_bytes(
                p,
                state_bits=preset.state_bits,
                density=g.get("density", 1.0),
                min_8bit_size=min_8bit_size,
                optimizer=optimizer,
                dtype=dtype,
            )
            for p in g["params"]
        ]
        for g in groups
    ]
    return Plan(
        preset=preset,
        optimizer=optimizer,
        optimizer_kwargs=kwargs,
        param_groups=groups,
        predicted_bytes=[sum(b) for b in per_param],
        predicted_param_bytes=per_param,
        budget=budget,
    )


def plan(
    model: nn.Module,
    budget: Any = None,
    *,
    preset: str | Preset | None = None,
    optimizer: str = "spam",
    dtype: torch.dtype | None = None,
    min_8bit_size: int = 4096,
) -> Plan:
    """Plan the optimizer state of ``model`` under ``budget`` (see :func:`parse_budget`).

    With ``preset`` (a name in :data:`PRESETS` or a :class:`Preset`) that preset is used
    (``budget``, if given, is only recorded). Otherwise the first preset of :data:`PRESETS`
    (most accurate first) whose predicted state fits the budget is chosen; no budget chooses
    ``"full-32"``. ``optimizer``: ``"spam"``, ``"stable-spam"`` or ``"adamw"`` (the last two
    have no sparse presets: automatic selection only considers ``full-32`` and ``8bit``, naming
    a sparse preset raises ValueError). ``dtype``: the parameter dtype the optimizer will see,
    if the model is to be cast later (default: each parameter's own).

    Raises ValueError when nothing fits, naming the smallest feasible budget.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    budget_bytes = parse_budget(budget, model) if budget is not None else None
    if preset is not None:
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
            preset = PRESETS[preset]
        problem = _preset_problem(preset, optimizer, model)
        if problem:
            raise ValueError(problem)
        return _make_plan(model, preset, optimizer, dtype, min_8bit_size, budget_bytes)
    plans = [
        _make_plan(model, p, optimizer, dtype, min_8bit_size, budget_bytes)
        for p in PRESETS.values()
        if _preset_problem(p, optimizer, model) is None
    ]
    candidates = {p.preset.name: p.predicted_total for p in plans}
    for p in plans:
        p.candidates = candidates
    if budget_bytes is None:
        return plans[0]
    for p in plans:
        if p.predicted_total <= budget_bytes:
            return p
    smallest = min(plans, key=lambda p: p.predicted_total)
    raise ValueError(
        f"no preset fits the budget {format_bytes(budget_bytes)} for optimizer {optimizer!r}; "
        f"the smallest feasible budget is {smallest.predicted_total} bytes "
        f"({format_bytes(smallest.predicted_total)}, preset {smallest.preset.name!r})"
    )
