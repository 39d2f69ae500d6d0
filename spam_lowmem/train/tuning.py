"""``compare --tune-lr`` / ``--seeds``: the learning-rate grid, the pick, and the seed statistics.

The protocol (why each piece is there):

* every grid rate trains at the first seed and is scored on the **validation** split
  (:func:`.data.split_validation`, carved from the training text), never on the held-out split,
  so the held-out numbers of the report are not the ones the rate was chosen on;
* the rate with the lowest finite validation loss wins (a diverged run or one without a
  validation loss cannot win); ties go to the smaller rate, the safer one;
* each optimizer then runs at its chosen rate once per seed, and the report gives the mean and
  spread (min, max, sample std) of the held-out loss over the seeds, so a difference smaller
  than the seed spread reads as such.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .errors import UsageError

__all__ = [
    "DEFAULT_GRID_FACTORS",
    "DEFAULT_VAL_FRACTION",
    "parse_lr_grid",
    "parse_seeds",
    "default_grid",
    "pick_best",
    "seed_stats",
    "comparison_sentence",
]

#: the default grid: each optimizer's own rate and a factor of 3 either side (half a decade)
DEFAULT_GRID_FACTORS = (1 / 3, 1.0, 3.0)
#: validation share of the packed training sequences under --tune-lr
DEFAULT_VAL_FRACTION = 0.05
_SEED_MAX = 2**32 - 1


def parse_lr_grid(text: str) -> list[float]:
    """``"1e-3,3e-3,1e-2"`` -> sorted distinct positive rates; UsageError on anything else."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or "" in items:
        raise UsageError(f"--lr-grid {text!r}: give a comma-separated list of learning rates such as 1e-3,3e-3,1e-2")
    rates: list[float] = []
    for item in items:
        try:
            lr = float(item)
        except ValueError:
            raise UsageError(f"--lr-grid {text!r}: {item!r} is not a number") from None
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"--lr-grid {text!r}: {item!r} is not a positive learning rate")
        rates.append(lr)
    return sorted(set(rates))


def parse_seeds(text: str) -> list[int]:
    """``"0,1"`` -> distinct seeds in the given order; UsageError on empty, non-integer or out-of-range."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or "" in items:
        raise UsageError(f"--seeds {text!r}: give a comma-separated list of integer seeds such as 0,1")
    seeds: list[int] = []
    for item in items:
        try:
            seed = int(item)
        except ValueError:
            raise UsageError(f"--seeds {text!r}: {item!r} is not an integer") from None
        if not 0 <= seed <= _SEED_MAX:
            raise UsageError(f"--seeds {text!r}: {seed} is outside [0, {_SEED_MAX}]")
        if seed in seeds:
            raise UsageError(f"--seeds {text!r}: seed {seed} is given twice")
        seeds.append(seed)
    return seeds


def default_grid(center: float) -> list[float]:
    """The rates of :data:`DEFAULT_GRID_FACTORS` around ``center`` (rounded to 3 significant digits)."""
    return [float(f"{center * f:.3g}") for f in DEFAULT_GRID_FACTORS]


def pick_best(grid_rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The grid run with the lowest finite ``final_val_loss`` (smaller lr on a tie); None if none qualifies."""
    ok = [
        r
        for r in grid_rows
        if not r.get("diverged") and isinstance(r.get("final_val_loss"), float) and math.isfinite(r["final_val_loss"])
    ]
    return min(ok, key=lambda r: (r["final_val_loss"], r["lr"])) if ok else None


def seed_stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, min, max and sample std (None for one value) of the finite ``values``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": None, "min": None, "max": None, "std": None}
    return {
        "n": len(finite),
        "mean": statistics.fmean(finite),
        "min": min(finite),
        "max": max(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else None,
    }


def _spread(s: dict[str, Any]) -> str:
    if s["n"] == 1:
        return f"{s['mean']:.4f} (one seed, no spread)"
    return f"{s['mean']:.4f} (min {s['min']:.4f}, max {s['max']:.4f}, std {s['std']:.4f} over {s['n']} seeds)"


def comparison_sentence(label: str, stats: dict[str, Any], base_label: str, base: dict[str, Any]) -> str:
    """One measured sentence: does ``label`` reach a lower mean held-out loss than ``base_label``?

    "Beats" needs a lower mean; the sentence adds whether the seed ranges overlap, since a lower
    mean inside overlapping ranges is not a separation at this number of seeds.
    """
    if not stats["n"] or not base["n"]:
        missing = label if not stats["n"] else base_label
        return f"{label} vs {base_label}: no comparison, {missing} has no finished run."
    diff = stats["mean"] - base["mean"]
    what = f"{label} {_spread(stats)} vs {base_label} {_spread(base)}"
    if diff >= 0:
        return f"{label} does not beat {base_label} here: mean held-out loss {what}; {label} is {diff:.4f} nats higher."
    overlap = stats["max"] >= base["min"]
    tail = (
        "the seed ranges overlap, so the difference is within the seed spread"
        if overlap and min(stats["n"], base["n"]) > 1
        else "a single seed each: no spread to judge the difference against"
        if min(stats["n"], base["n"]) == 1
        else "the seed ranges do not overlap"
    )
    return f"{label} beats {base_label} on the mean by {-diff:.4f} nats: {what}; {tail}."
