"""Checkpoints of distributed runs, through ``torch.distributed.checkpoint`` (DCP).

A distributed run (DDP or FSDP2, any world size, 1 included) keeps its checkpoint in the folder
``OUT/checkpoint_dcp/``:

* the DCP files (``.metadata``, ``__R_0.distcp``): the model and optimizer state dicts of
  ``get_model_state_dict`` / ``get_optimizer_state_dict``, keyed by parameter name, each rank
  writing its own shards. DCP reshards on load, so a run saved at world size 2 resumes at 1 and
  the reverse, and a DDP checkpoint resumes under FSDP2 and the reverse;
* ``train_state.pt`` (rank 0): step, batches consumed, scheduler state, configuration, and the
  world size and parallelism that saved it;
* ``rng_rankR.pt`` (one per rank): that rank's RNG states. They are restored only at the same
  world size: at another one rank R's stream has no counterpart. Nothing in training draws
  from them (no dropout; the batch order is a function of seed and step, see
  :class:`.data.BatchStream`), so the trajectory does not depend on them.

A save is written to ``checkpoint_dcp.tmp/`` and renamed into place when every rank has
finished (the old folder is moved to ``checkpoint_dcp.old/`` for the moment of the swap, and
used by :func:`find` if an interruption left only it). Non-distributed runs keep the single
file ``checkpoint.pt`` of :mod:`.loop`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .distributed import Runtime

__all__ = ["DIR_NAME", "TRAIN_STATE", "find", "save", "load", "remove"]

DIR_NAME = "checkpoint_dcp"
TRAIN_STATE = "train_state.pt"
_FORMAT = 1


def find(out: Path) -> Path | None:
    """The complete DCP checkpoint in run folder ``out``, or None."""
    for name in (DIR_NAME, DIR_NAME + ".old"):
        path = out / name
        if (path / TRAIN_STATE).is_file() and (path / ".metadata").is_file():
            return path
    return None


def remove(out: Path) -> None:
    """Delete the DCP checkpoint folders of ``out`` (``--overwrite``); rank 0 only."""
    for name in (DIR_NAME, DIR_NAME + ".tmp", DIR_NAME + ".old"):
        shutil.rmtree(out / name, ignore_errors=True)


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _write(path: Path, obj: Any) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save(
    out: Path,
    runtime: Runtime,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    train_state: dict[str, Any],
    rng: dict[str, Any],
) -> None:
    """Write the checkpoint (every rank calls this at the same step; it runs collectives)."""
    import torch.distributed.checkpoint as dcp

    final, tmp, old = (out / (DIR_NAME + suffix) for suffix in ("", ".tmp", ".old"))
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        tmp.mkdir(parents=True)
    runtime.barrier()  # the folder exists before any rank writes into it
    dcp.save(_state(model, opt), checkpoint_id=str(tmp))  # fsyncs every file it writes
    _write(tmp / f"rng_rank{runtime.rank}.pt", rng)
    if runtime.is_main:
        meta = {"world_size": runtime.world_size, "parallel": runtime.mode}
        _write(tmp / TRAIN_STATE, {"format": _FORMAT, **train_state, **meta})
    runtime.barrier()  # every rank's files are on disk before the swap
    if runtime.is_main:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()  # no rank reads or rewrites the folder before the swap is done


def load(
    path: Path, runtime: Runtime, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load model and optimizer state from ``path`` (resharded to this run's world size) and
    return (train state, this rank's RNG states or None when saved at another world size).
    Every rank calls it; the scheduler and RNG are the caller's to restore."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    train_state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=False)
    if train_state.get("format") != _FORMAT:
        raise ValueError(f"unknown checkpoint format {train_state.get('format')!r} in {path / TRAIN_STATE}")
    # get_optimizer_state_dict creates the state it returns: on an optimizer without any yet it
    # steps once with zero gradients, which must find no stale gradients from this process
    opt.zero_grad(set_to_none=True)
    state = _state(model, opt)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    rng_file = path / f"rng_rank{runtime.rank}.pt"
    same_world = train_state.get("world_size") == runtime.world_size
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if same_world and rng_file.is_file() else None
    return train_state, rng
