"""One call from a model (and an optional memory budget) to a ready optimizer.

Frameworks that take a built optimizer (Hugging Face ``Trainer(optimizers=(opt, None))``,
Lightning's ``configure_optimizers``, a plain loop) need the parameter groups, the planner's
memory choice and the usual weight-decay split done in one place; this module does that and
imports nothing beyond torch, so it is usable without transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..optim import SPAM, AdamW, StableSPAM
from ..planner import _MEMORY_KEYS, Preset, plan
from ..sparse import sparse_param_groups

__all__ = ["OPTIMIZER_CLASSES", "build_optimizer", "split_weight_decay"]

#: the names :func:`build_optimizer` takes, as :func:`spam_lowmem.plan` spells them
OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {"spam": SPAM, "stable-spam": StableSPAM, "adamw": AdamW}


def split_weight_decay(groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Each group split into its matrices (``weight_decay``) and its 1-D tensors (0).

    Decaying a bias or a norm gain towards 0 only fights the model (a norm gain of 0 switches
    its features off), so, as transformers' own Trainer does, they are left out; the rule here
    is the shape (1-D and scalar tensors: biases, norm weights), which needs no layer names.
    Other group keys (``density``) are kept on both halves; empty halves are dropped.
    """
    out: list[dict[str, Any]] = []
    for group in groups:
        matrices = [p for p in group["params"] if p.dim() >= 2]
        vectors = [p for p in group["params"] if p.dim() < 2]
        if matrices:
            out.append({**group, "params": matrices, "weight_decay": weight_decay})
        if vectors:
            out.append({**group, "params": vectors, "weight_decay": 0.0})
    return out


def _default(cls: type, key: str) -> Any:
    return inspect.signature(cls).parameters[key].default


def _memory_groups(
    model: nn.Module, optimizer: str, budget: Any, preset: str | Preset | None, kwargs: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(param groups, memory keywords): the planner's when a budget or a preset is given, else
    the caller's ``state_bits`` / ``min_8bit_size`` / ``density`` (sparse groups as
    :func:`spam_lowmem.sparse_param_groups` when ``density`` < 1)."""
    given = [k for k in _MEMORY_KEYS if k in kwargs]
    if budget is not None or preset is not None:
        if given:
            raise ValueError(
                f"build_optimizer: {given} conflict with budget=/preset=, which choose the state layout; "
                "give one or the other"
            )
        chosen = plan(model, budget=budget, preset=preset, optimizer=optimizer)
        memory = {k: v for k, v in chosen.optimizer_kwargs.items() if k != "density"}  # density is per group
        return [{**g, "params": list(g["params"])} for g in chosen.param_groups], memory
    memory = {k: kwargs.pop(k) for k in given}
    density = memory.pop("density", 1.0)
    if density < 1.0:
        if optimizer != "spam":
            raise ValueError(f"build_optimizer: density= (sparse momentum) exists only for 'spam', not {optimizer!r}")
        return sparse_param_groups(model, density), memory
    return [{"params": list(model.parameters())}], memory


def build_optimizer(
    model: nn.Module,
    optimizer: str = "spam",
    budget: Any = None,
    *,
    preset: str | Preset | None = None,
    weight_decay: float | None = None,
    decay_vectors: bool = False,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """A :class:`spam_lowmem.SPAM`, :class:`~spam_lowmem.StableSPAM` or
    :class:`~spam_lowmem.AdamW` over ``model``'s parameters, ready for
    ``transformers.Trainer(..., optimizers=(opt, None))`` or any training loop.

    Args:
        model: the module whose parameters are optimised (shared parameters once).
        optimizer: ``"spam"``, ``"stable-spam"`` or ``"adamw"``.
        budget: optimizer-state memory budget, any form :func:`spam_lowmem.plan` takes
            (``"1.5GB"``, ``"25%"``, ``"galore:128"``, ``"adam-mini"``, an int of bytes): the
            planner picks ``state_bits`` and the sparse-momentum density that fit, with the
            exact predicted bytes ``spam_lowmem.plan(model, budget=...)`` reports.
        preset: a planner preset by name (``"8bit"``, ``"8bit-sparse-0.25"``, ...) instead of
            a budget.
        weight_decay: the class default when None (SPAM and Stable-SPAM 0, as the papers;
            AdamW 0.01, as torch). When it is > 0, biases and other 1-D tensors (norm gains)
            get 0 unless ``decay_vectors`` (:func:`split_weight_decay`).
        **kwargs: other keywords of the optimizer class (``lr``, ``betas``, ``threshold``,
            ``reset_interval``, Stable-SPAM's ``total_steps`` ...). Without a budget or a
            preset, ``state_bits``, ``min_8bit_size`` and ``density`` are accepted here too;
            with one they raise ValueError (the planner chooses them).

    Raises ValueError for an unknown optimizer, a budget nothing fits (the planner's message
    names the smallest feasible one) or conflicting memory keywords.
    """
    if optimizer not in OPTIMIZER_CLASSES:
        raise ValueError(f"build_optimizer: unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZER_CLASSES)}")
    cls = OPTIMIZER_CLASSES[optimizer]
    kwargs = dict(kwargs)
    groups, memory = _memory_groups(model, optimizer, budget, preset, kwargs)
    decay = _default(cls, "weight_decay") if weight_decay is None else weight_decay
    if decay > 0 and not decay_vectors:
        groups = split_weight_decay(groups, decay)
    return cls(groups, weight_decay=decay, **memory, **kwargs)
