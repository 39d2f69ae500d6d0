"""Value checks of a loaded optimizer state: everything ``load_state_dict`` verifies before it
changes anything, beyond keys and shapes (which depend on the optimizer kind). A NaN or a
negative second moment loaded unchecked would NaN the parameter, or fail inside a later step,
far from its cause."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from . import moments

__all__ = ["bad_values", "check_tensors", "check_values"]


def bad_values(t: torch.Tensor, *, non_negative: bool) -> str | None:
    """Why the values of a loaded float tensor are unusable (NaN/inf, or negative where the
    quantity cannot be), or None."""
    values = t.detach().float()
    if not bool(values.isfinite().all()):
        n = int((~values.isfinite()).sum())
        return f"{n} non-finite value(s) (NaN or inf)"
    if non_negative and bool((values < 0).any()):
        return f"{int((values < 0).sum())} negative value(s) (it must be >= 0)"
    return None


def check_tensors(saved: dict[str, Any], keys: Iterable[str], where: str) -> None:
    """Each key is a tensor, and a float one unless it holds 8-bit codes."""
    for key in keys:
        value = saved.get(key)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"loaded '{key}' of {where} is a {type(value).__name__}, not a tensor")
        if not key.endswith("_codes") and not value.is_floating_point():
            raise ValueError(f"loaded '{key}' of {where} has dtype {value.dtype}; expected a floating-point tensor")


def check_values(saved: dict[str, Any], where: str, count_keys: Iterable[str], fp32_keys: Iterable[str]) -> None:
    """Counts (``count_keys``) are ints >= 0; moments, absmax and ``fp32_keys`` are finite, and
    those that cannot be negative are not. Non-finite moments can come from
    ``nonfinite="propagate"`` or an overflow; ``spike_stats()`` reports them before they are
    saved."""
    for key in count_keys:
        value = saved.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"loaded '{key}' of {where} is {value!r}; expected an int >= 0")
    checks = [(key, key != "exp_avg") for key in (*moments.DENSE_KEYS, *moments.FP32_KEYS)]
    checks += [(key, True) for key in fp32_keys]
    for key, non_negative in checks:
        if key in saved:
            reason = bad_values(saved[key], non_negative=non_negative)
            if reason is not None:
                raise ValueError(
                    f"loaded '{key}' of {where} has {reason}; the saved state is "
                    "corrupt or diverged (repair or drop it before loading)"
                )
