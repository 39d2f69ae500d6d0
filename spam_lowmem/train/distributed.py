"""How one process takes part in training: alone, or as one rank of a DDP or FSDP2 job.

``spam-lowmem train`` runs as one process (:data:`SINGLE`) unless it was started by torchrun
(``python -m torch.distributed.run ... -m spam_lowmem.cli train``, or ``train --nproc N``, which
re-launches itself that way). Under torchrun :func:`start` joins the process group (gloo on CPU,
NCCL on CUDA) and returns a :class:`Runtime` that:

* wraps the model: ``--fsdp`` applies FSDP2's ``fully_shard`` to every transformer block and to
  the root, so parameters, gradients and optimizer state become ``Shard(0)`` DTensors; without
  ``--fsdp`` the model is replicated with DDP;
* hands each rank its slice of every batch: rank ``r`` of ``W`` takes rows ``r*B/W ..
  (r+1)*B/W - 1`` of the global batch of ``B`` sequences. Every slice has as many tokens, so the
  mean of the ranks' losses is the loss of the global batch and the averaged gradient is its
  gradient: a run at world size W trains on the same data as at world size 1 and agrees with
  it up to the float rounding of the gradient reduction;
* reduces the few figures the loop reports (loss, eval sums, state bytes) across ranks.

Only rank 0 writes the run folder's files (:attr:`Runtime.is_main`); every rank runs the
collectives (forward/backward, ``step()``, checkpoints, evaluation, the summary's byte counts).
DCP checkpoint I/O lives in :mod:`.checkpoint_dcp`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UsageError
from .launch import launched_by_torchrun

__all__ = [
    "Runtime",
    "SINGLE",
    "MODES",
    "FSDP_UNSUPPORTED",
    "start",
    "check_batch",
]

#: "single": one process; "ddp": replicated model, all-reduced gradients; "fsdp": FSDP2 shards
MODES = ("single", "ddp", "fsdp")
#: baselines that step whole matrices (GaLore's projection, Adam-mini's blocks, bitsandbytes'
#: 8-bit state) and do not accept FSDP2's DTensor shards; they run under DDP
FSDP_UNSUPPORTED = ("galore", "adam-mini", "bnb-adamw8bit")


def check_batch(batch_size: int, world_size: int) -> int:
    """Per-rank batch size; UsageError unless ``batch_size`` divides evenly over the ranks."""
    if batch_size % world_size:
        raise UsageError(
            f"--batch-size {batch_size} is the global batch and must divide evenly over the "
            f"{world_size} ranks (each rank takes batch/world sequences); use a multiple of {world_size}"
        )
    return batch_size // world_size


@dataclass
class Runtime:
    """This process's part in the run (see the module docstring)."""

    mode: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the run's --device decides (single process)

    @property
    def distributed(self) -> bool:
        return self.mode != "single"

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes metrics, logs, the progress bar and the summary."""
        return self.rank == 0

    # ---------------------------------------------------------------- model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model this process trains: itself (single), DDP around it, or it FSDP2-sharded
        in place (every block, then the root, so that one block is gathered at a time)."""
        if self.mode == "single":
            return model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        assert self.device is not None
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        blocks = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise UsageError(f"--fsdp: cannot find the transformer blocks (model.layers) of {type(model).__name__}")
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose parameters the optimizer takes (DDP's inner module; FSDP2 shards in
        place, so there it is the model itself)."""
        return model.module if self.mode == "ddp" else model  # type: ignore[return-value]

    # ---------------------------------------------------------------- data
    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (its rows ``r*b .. r*b+b-1``)."""
        if self.world_size == 1:
            return batch
        b = check_batch(batch.shape[0], self.world_size)
        return batch[self.rank * b : (self.rank + 1) * b]

    # ---------------------------------------------------------------- collectives
    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64), the values themselves alone."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; rank 0 passes it, the others anything)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _comm_device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo only CPU ones
        return self.device if self.device is not None and self.device.type == "cuda" else torch.device("cpu")


SINGLE = Runtime()


def start(fsdp: bool, device_name: str) -> Runtime:
    """Join the process group torchrun prepared and return this rank's :class:`Runtime`.

    ``device_name`` is the run's ``--device`` (auto/cpu/cuda): CUDA ranks take the GPU of their
    local rank and talk over NCCL, CPU ranks over gloo.
    """
    if not launched_by_torchrun():
        raise UsageError("not started by torchrun")  # callers check first; this is a guard
    if not torch.distributed.is_available():
        raise UsageError("this torch build has no torch.distributed; it cannot run a distributed job")
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: this torch build sees no CUDA GPU; use --device cpu")
        if local >= torch.cuda.device_count():
            raise UsageError(
                f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Runtime("fsdp" if fsdp else "ddp", rank, world, local, device)
