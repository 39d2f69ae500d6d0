"""Helpers for SPAM's sparse momentum (docs/algorithms.md §3): the authors' parameter grouping and
their GaLore memory-matched density."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["sparse_param_groups", "density_for_galore_rank", "density_for_shapes"]

DEFAULT_TARGETS = ("attn", "mlp", "attention")


def _target_linears(model: nn.Module, targets: Iterable[str]) -> list[nn.Linear]:
    targets = tuple(targets)
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and any(t in name for t in targets)]


def sparse_param_groups(
    model: nn.Module, density: float, targets: Iterable[str] = DEFAULT_TARGETS, **group_kwargs: Any
) -> list[dict[str, Any]]:
    """Parameter groups the way the SPAM authors build them.

    The ``weight`` of every ``nn.Linear`` whose module name contains one of ``targets``
    (q/k/v/o, gate/up/down in a LLaMA) goes to a group with ``density``; every other parameter
    (embeddings, lm_head, norms, biases) to a dense group. ``group_kwargs`` go into both groups.
    Shared parameters appear once; empty groups are left out.

        opt = spam_lowmem.SPAM(sparse_param_groups(model, density=0.25), lr=1e-3)
    """
    sparse_ids = {id(m.weight) for m in _target_linears(model, targets)}
    sparse, dense, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (sparse if id(p) in sparse_ids else dense).append(p)
    groups = []
    if sparse:
        groups.append({"params": sparse, **group_kwargs, "density": density})
    if dense:
        groups.append({"params": dense, **group_kwargs})
    return groups


def density_for_shapes(shapes: Iterable[tuple[int, int]], rank: int) -> float:
    """The density whose optimizer state matches GaLore at ``rank`` on matrices of these shapes
    (docs/algorithms.md §3):

        d = sum_W [2 r max(m, n) + r min(m, n)] / sum_W [2 m n]

    GaLore's two projected Adam moments plus its projector, against two dense moments. ``r`` is
    clamped to ``min(m, n)`` per matrix (GaLore cannot project past it) and the result to 1.
    """
    if rank <= 0:
        raise ValueError(f"Invalid rank: {rank} (expected > 0)")
    num = den = 0
    for m, n in shapes:
        r = min(rank, m, n)
        num += 2 * r * max(m, n) + r * min(m, n)
        den += 2 * m * n
    if den == 0:
        raise ValueError("density_for_galore_rank: no projection matrices to match")
    return min(1.0, num / den)


def density_for_galore_rank(model: nn.Module, rank: int, targets: Iterable[str] = DEFAULT_TARGETS) -> float:
    """:func:`density_for_shapes` over the targeted projection weights of ``model`` (each shared
    weight once). r = 128 on LLaMA-60M gives 0.3225388601, r = 256 on LLaMA-130M 0.4305555556
    (the authors' logged values).
    """
    seen: dict[int, tuple[int, int]] = {}
    for lin in _target_linears(model, targets):
        seen.setdefault(id(lin.weight), tuple(lin.weight.shape))  # type: ignore[arg-type]
    if not seen and rank > 0:
        raise ValueError("density_for_galore_rank: the model has no nn.Linear matching the targets")
    return density_for_shapes(seen.values(), rank)
