"""The hyper-parameters of each optimizer kind, defined once for the core optimizers and the oracles.

A kind's settings dataclass (:class:`AdamWSettings`, :class:`SPAMSettings`,
:class:`StableSPAMSettings`) is the single definition of its constructor arguments: their
positional order, which are keyword-only, and their defaults. :func:`settings_constructor`
turns it into the ``__init__`` of an optimizer class, so :class:`spam_lowmem.SPAM` and
:class:`spam_lowmem.reference.ReferenceSPAM` cannot drift apart in what they accept. The
``check_group`` rules of a kind validate a param group (a dict, because a group may override
any default); they are plain Python, so the pure-PyTorch reference shares them without
touching the compiled core.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar

from . import sparse_subset as subsets

__all__ = [
    "NONFINITE_POLICIES",
    "AdamWSettings",
    "SPAMSettings",
    "Settings",
    "StableSPAMSettings",
    "check_count",
    "check_non_negative",
    "check_range",
    "check_subset_seed",
    "settings_constructor",
]

NONFINITE_POLICIES = ("skip", "propagate")
#: the base seed of the sparse subsets enters their seed derivation as two 32-bit words
#: (``sparse_subset.subset_seed``): seeds lie in [0, 2**64)
SUBSET_SEED_LIMIT = 2**64


def check_range(name: str, value: float, low: float, high: float, *, closed_high: bool = False) -> None:
    """``value`` in [low, high) (or [low, high]); NaN fails every comparison and is rejected."""
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"Invalid {name}: {value} (expected a value in [{low}, {high}{bracket})")


def check_non_negative(name: str, value: float) -> None:
    """``value >= 0``, written so that NaN is rejected too."""
    if not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value} (expected >= 0)")


def check_count(name: str, value: object) -> None:
    """A non-negative int (bools rejected): step counts and periods."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= 0)")


def check_subset_seed(seed: object) -> int | None:
    """None, or the seed as an int in [0, 2**64) (numpy ints accepted; bools and floats not)."""
    if seed is None:
        return None
    try:
        if isinstance(seed, bool):
            raise TypeError
        value = operator.index(seed)
    except TypeError:
        raise TypeError(f"Invalid subset_seed: {seed!r} (expected None or an int in [0, 2**64))") from None
    if not 0 <= value < SUBSET_SEED_LIMIT:
        raise ValueError(f"Invalid subset_seed: {value} (expected None or an int in [0, 2**64))")
    return value


def check_precision(group: dict[str, Any]) -> None:
    """``state_bits`` (8 or 32) and ``min_8bit_size`` (an int >= 0), which every kind has."""
    bits = group.get("state_bits", 32)
    if bits not in (8, 32) or isinstance(bits, bool):
        raise ValueError(f"Invalid state_bits: {bits!r} (expected 8 or 32)")
    size = group.get("min_8bit_size", 4096)
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"Invalid min_8bit_size: {size!r} (expected an int >= 0)")


def check_adam_group(group: dict[str, Any]) -> None:
    """The hyper-parameters every Adam-family group has: lr, betas, eps, weight decay, NaN policy."""
    check_non_negative("learning rate", group["lr"])
    beta1, beta2 = group["betas"]
    check_range("beta1", beta1, 0.0, 1.0)
    check_range("beta2", beta2, 0.0, 1.0)
    check_non_negative("eps", group["eps"])
    check_non_negative("weight_decay", group["weight_decay"])
    if group["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(f"Invalid nonfinite policy: {group['nonfinite']!r} (expected one of {NONFINITE_POLICIES})")


def check_density(group: dict[str, Any]) -> None:
    """Sparse momentum (density < 1) needs 2-D parameters of fewer than 2**32 elements."""
    d = group.get("density", 1.0)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0:
        raise ValueError(f"Invalid density: {d!r} (expected a number in (0, 1])")
    if d == 1.0:
        return
    for p in group.get("params", ()):
        if p.dim() != 2:
            raise ValueError(
                f"sparse momentum (density={d}) needs 2-D weights; got a parameter "
                f"of shape {tuple(p.shape)}: put it in a density=1 group "
                "(see spam_lowmem.sparse_param_groups)"
            )
        if p.numel() > subsets.MAX_NUMEL:
            raise ValueError(
                f"sparse momentum supports parameters of fewer than 2^32 elements; got shape {tuple(p.shape)}"
            )


@dataclass(frozen=True)
class Settings:
    """Fields every kind has (keyword-only, so they follow each kind's positional fields)."""

    #: fields that configure the optimizer object, not a param group
    OPTIMIZER_FIELDS: ClassVar[frozenset[str]] = frozenset()

    _: KW_ONLY
    nonfinite: str = "skip"
    state_bits: int = 32
    min_8bit_size: int = 4096

    @classmethod
    def group_keys(cls) -> frozenset[str]:
        """The keys this kind adds to every param group (its ``defaults``)."""
        return frozenset(f.name for f in dataclasses.fields(cls)) - cls.OPTIMIZER_FIELDS

    def group_defaults(self) -> dict[str, Any]:
        """The ``defaults`` dict of torch.optim: every group key, tuples as tuples."""
        keys = [f.name for f in dataclasses.fields(self) if f.name not in self.OPTIMIZER_FIELDS]
        values = {key: getattr(self, key) for key in keys}
        return {key: tuple(v) if key in ("betas", "gammas") else v for key, v in values.items()}

    @staticmethod
    def check_group(group: dict[str, Any]) -> None:  # pragma: no cover - every kind overrides it
        """Raise ValueError if a group's values break this kind's rules."""
        raise NotImplementedError


@dataclass(frozen=True)
class AdamWSettings(Settings):
    """``torch.optim.AdamW``'s arguments and defaults (see :class:`spam_lowmem.AdamW`)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    @staticmethod
    def check_group(group: dict[str, Any]) -> None:
        check_adam_group(group)
        check_precision(group)


@dataclass(frozen=True)
class SPAMSettings(Settings):
    """SPAM's arguments and defaults (see :class:`spam_lowmem.SPAM` for their meaning)."""

    OPTIMIZER_FIELDS: ClassVar[frozenset[str]] = frozenset({"subset_seed"})

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    threshold: float = 5000.0
    reset_interval: int = 500
    warmup_steps: int = 150
    clip_delay: int = 20
    _: KW_ONLY
    spike_clipping: bool = True
    reset_bias_correction: bool = False
    density: float = 1.0
    sparse_weight_decay: bool = False
    subset_seed: int | None = None

    @staticmethod
    def check_group(group: dict[str, Any]) -> None:
        check_adam_group(group)
        if group["spike_clipping"] and not group["threshold"] > 0.0:
            raise ValueError(
                f"Invalid threshold: {group['threshold']} (must be > 0 with "
                "spike_clipping=True; pass spike_clipping=False to turn clipping off)"
            )
        for key in ("reset_interval", "warmup_steps", "clip_delay"):
            check_count(key, group[key])
        check_density(group)
        check_precision(group)


@dataclass(frozen=True)
class StableSPAMSettings(Settings):
    """Stable-SPAM's arguments and defaults (see :class:`spam_lowmem.StableSPAM`)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    gammas: tuple[float, float, float] = (0.7, 0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    reset_interval: int = 1000
    total_steps: int | None = None
    eta_min: float = 0.5
    _: KW_ONLY
    stale_reset_step: bool = True
    restart_stat_counts: bool = True

    @staticmethod
    def check_group(group: dict[str, Any]) -> None:
        check_adam_group(group)
        gamma1, gamma2, gamma3 = group["gammas"]
        if gamma1 != -1:
            check_range("gamma1", gamma1, 0.0, 1.0)
        check_range("gamma2", gamma2, 0.0, 1.0)
        check_range("gamma3", gamma3, 0.0, 1.0)
        check_count("reset_interval", group["reset_interval"])
        total = group["total_steps"]
        if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total <= 0):
            raise ValueError(f"Invalid total_steps: {total!r} (expected None or an int > 0)")
        check_range("eta_min", group["eta_min"], 0.0, 1.0, closed_high=True)
        check_precision(group)


def settings_constructor(settings: type[Settings]) -> Callable[..., None]:
    """The ``__init__(self, params, ...)`` of an optimizer class whose arguments are the fields
    of ``settings`` (positional order, keyword-only fields, defaults): the call is checked
    against that signature (so a TypeError names the optimizer and counts its arguments), the
    dataclass binds the values, and the instance goes to ``self._setup(params, settings)``.
    The function carries the signature, so ``help()``, ``inspect.signature`` and
    :func:`spam_lowmem.train.optimizers.accepts_keyword` see the real arguments rather than
    ``*args, **kwargs``."""

    fields = list(inspect.signature(settings).parameters.values())
    head = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
        for name, annotation in (("self", inspect.Parameter.empty), ("params", "Iterable[Any]"))
    ]
    signature = inspect.Signature([*head, *fields], return_annotation=None)

    def __init__(self: Any, params: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        try:  # checked against the optimizer's own signature, so errors count its arguments
            signature.bind(self, params, *args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}(): {err}") from None
        self._setup(params, settings(*args, **kwargs))

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__doc__ = f"Bind the arguments defined by :class:`{settings.__qualname__}` and set up the optimizer."
    return __init__
