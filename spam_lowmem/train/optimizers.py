"""Optimizer factory: SPAM, Stable-SPAM and the baselines as configured in docs/algorithms.md §6.

* ``adamw``: ``torch.optim.AdamW`` (weight decay 0, as all the papers' runs).
* ``spam`` / ``stable-spam``: :class:`spam_lowmem.SPAM` / :class:`spam_lowmem.StableSPAM` with the
  class defaults (Stable-SPAM gets ``total_steps`` = the run's steps, as its harness). The
  ``state_bits=`` / ``density=`` keywords are passed only when the user gives them. With a
  density, the 7 projection matrices per layer take it and every other tensor is given
  ``density=1.0`` in its own param group (sparse momentum only on the projections, §3).
* ``galore``: ``galore_torch.GaLoreAdamW``; projection weights in the GaLore group (``rank``,
  ``update_proj_gap``, ``scale``, ``proj_type="std"``), everything else plain AdamW.
* ``adam-mini``: ``adam_mini.Adam_mini(named_parameters, lr, dim=hidden, n_heads=heads)``.
* ``bnb-adamw8bit``: ``bitsandbytes.optim.AdamW8bit`` (steps on CPU too).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..sparse import density_for_shapes
from .errors import UsageError
from .model import PROJECTIONS, ModelSpec, projection_shapes

__all__ = [
    "OPTIMIZER_NAMES",
    "SPAM_FAMILY",
    "split_projection_params",
    "density_for_galore_rank",
    "density_from_shapes",
    "accepts_keyword",
    "supports_density",
    "build_optimizer",
    "parse_budget",
    "planned_kwargs",
]

OPTIMIZER_NAMES = ("adamw", "spam", "stable-spam", "galore", "adam-mini", "bnb-adamw8bit")
SPAM_FAMILY = ("spam", "stable-spam")
_INSTALL = {"galore": "galore-torch", "adam-mini": "adam-mini", "bnb-adamw8bit": "bitsandbytes"}


def split_projection_params(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(projection weights, all other parameters), in model order."""
    proj: list[torch.nn.Parameter] = []
    rest: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        is_proj = p.dim() == 2 and any(name.endswith(f"{s}.weight") for s in PROJECTIONS)
        (proj if is_proj else rest).append(p)
    return proj, rest


def density_from_shapes(shapes: Iterable[tuple[int, int]], rank: int) -> float:
    """:func:`spam_lowmem.sparse.density_for_shapes`, with bad input as a UsageError."""
    try:
        return density_for_shapes(shapes, rank)
    except ValueError as exc:
        raise UsageError(f"GaLore-matched density: {exc}") from exc


def density_for_galore_rank(model: torch.nn.Module | ModelSpec, rank: int) -> float:
    """SPAM density with the optimizer-state memory of GaLore at ``rank`` on the same matrices.

    ``model`` is a built model or a :class:`ModelSpec` (shapes from the config, nothing built).
    60M at r = 128 gives 0.3225388601, 130M at r = 256 gives 0.4305555556.
    """
    if isinstance(model, ModelSpec):
        return density_from_shapes(projection_shapes(model), rank)
    proj, _ = split_projection_params(model)
    return density_from_shapes(((p.shape[0], p.shape[1]) for p in proj), rank)


def accepts_keyword(cls: type, key: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``key`` (by name or through ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def supports_density() -> bool:
    """True once :class:`spam_lowmem.SPAM` accepts ``density=`` (sparse momentum)."""
    from .. import SPAM

    return accepts_keyword(SPAM, "density")


def _import(name: str, module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise UsageError(
            f"--optimizer {name} needs the {_INSTALL[name]} package: pip install {_INSTALL[name]}"
        ) from exc


def _spam_family(
    name: str, model: torch.nn.Module, lr: float, total_steps: int, extra: Mapping[str, Any]
) -> torch.optim.Optimizer:
    from .. import SPAM, StableSPAM

    cls = SPAM if name == "spam" else StableSPAM
    for key in extra:
        if not accepts_keyword(cls, key):
            raise UsageError(
                f"{cls.__name__} in this build of spam_lowmem does not accept {key}= "
                f"(the option is not implemented yet); drop --{key.replace('_', '-')}"
            )
    kwargs: dict[str, Any] = {"lr": lr, **extra}
    if name == "stable-spam":
        kwargs["total_steps"] = total_steps
    params: Any = model.parameters()
    if "density" in extra:
        proj, rest = split_projection_params(model)
        params = [{"params": proj}] + ([{"params": rest, "density": 1.0}] if rest else [])
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError, NotImplementedError) as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise UsageError(f"{cls.__name__} rejected its settings ({shown or 'defaults'}): {exc}") from exc


def build_optimizer(
    name: str,
    model: torch.nn.Module,
    spec: ModelSpec,
    *,
    lr: float,
    total_steps: int,
    extra: Mapping[str, Any] | None = None,
    galore_rank: int | None = None,
    galore_gap: int = 200,
    galore_scale: float = 0.25,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`) for ``model``; weight decay 0.

    ``extra`` holds SPAM/Stable-SPAM keywords (``state_bits``, ``density``, planner output);
    giving it to another optimizer is a UsageError.
    """
    extra = dict(extra or {})
    if name not in OPTIMIZER_NAMES:
        raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    if extra and name not in SPAM_FAMILY:
        raise UsageError(
            f"{', '.join('--' + k.replace('_', '-') for k in extra)} only apply to "
            f"{' and '.join(SPAM_FAMILY)}, not to {name}"
        )
    if name in SPAM_FAMILY:
        return _spam_family(name, model, lr, total_steps, extra)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if name == "galore":
        galore = _import(name, "galore_torch")
        proj, rest = split_projection_params(model)
        rank = galore_rank if galore_rank is not None else spec.galore_rank
        groups = [
            {"params": rest},
            {"params": proj, "rank": rank, "update_proj_gap": galore_gap, "scale": galore_scale, "proj_type": "std"},
        ]
        opt: torch.optim.Optimizer = galore.GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)
        return opt
    if name == "adam-mini":
        mini = _import(name, "adam_mini")
        opt = mini.Adam_mini(
            model.named_parameters(),
            lr=lr,
            weight_decay=0.0,
            dim=spec.hidden,
            n_heads=spec.heads,
            n_kv_heads=spec.heads,
            verbose=False,
        )
        return opt
    bnb = _import(name, "bitsandbytes")
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)
    return opt


def parse_budget(text: str) -> int:
    """Bytes from a size with its unit: ``"2GiB"``, ``"1.5G"``, ``"800MB"``, ``"123456B"``.

    The grammar of :func:`spam_lowmem.plan`'s absolute budgets (one set of units for both):
    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, kB/MB/GB/TB powers of 1000, B bytes. A
    number without a unit is refused: ``--budget 1.5`` is far more likely GB than 1 byte.
    """
    from ..planner import SIZE_UNITS, _size_bytes

    try:
        return _size_bytes(text)
    except ValueError as exc:
        raise UsageError(
            f"cannot parse --budget {text!r}: {exc}; use a size with its unit such as 2GiB, "
            f"800MB, 1.5G or 123456B (units {SIZE_UNITS})"
        ) from None


def planned_kwargs(model: torch.nn.Module, budget: int, optimizer: str = "spam") -> dict[str, Any]:
    """Optimizer keywords from ``spam_lowmem.plan(model, budget=...)``: the returned
    :class:`spam_lowmem.Plan`'s ``optimizer_kwargs`` (``state_bits``, ``min_8bit_size`` and, for
    sparse presets, ``density``), the form ``extra=`` of :func:`build_optimizer` takes. A plain
    mapping (a stand-in planner) is taken as is. ``optimizer`` other than "spam" is passed on
    (Stable-SPAM has no sparse presets)."""
    import spam_lowmem

    plan = getattr(spam_lowmem, "plan", None)
    if plan is None:
        raise UsageError(
            "--budget needs the memory planner spam_lowmem.plan(), which is not available "
            "in this build of spam_lowmem; use --state-bits / --density instead"
        )
    try:
        result = plan(model, budget=budget) if optimizer == "spam" else plan(model, budget=budget, optimizer=optimizer)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"spam_lowmem.plan(model, budget={budget}) failed: {exc}") from exc
    if isinstance(result, spam_lowmem.Plan):
        return dict(result.optimizer_kwargs)
    if not isinstance(result, Mapping):
        raise UsageError(
            f"spam_lowmem.plan() returned {type(result).__name__}, which the trainer "
            "cannot turn into optimizer keywords"
        )
    return dict(result)
