"""Distributed parameters: what a DTensor (FSDP2 ``fully_shard``, ``replicate``, tensor
parallelism) or an FSDP1 flat parameter is to the optimizers.

The core steps raw local buffers; this module says which local buffer a distributed parameter
has, where it sits in the parameter's global index space, and how its state is wrapped back
into DTensors so that ``torch.distributed.checkpoint`` (DCP) can save and reshard it.

Supported: a DTensor on one device mesh whose placements are each ``Replicate()`` or
``Shard(0)`` (at most one mesh dimension shards). FSDP2 gives ``Shard(0)`` on a 1-D mesh, HSDP
``(Replicate(), Shard(0))``. Under ``Shard(0)`` over ``W`` ranks, rank ``c`` holds the rows
``[c*ceil(R/W), ...)`` of dim 0 (torch.chunk's split, which FSDP2 and DTensor use), so its
local tensor is the global flat range ``[offset, offset + local_numel)``::

    global [R, L] (R = 129, W = 2)      rank 0: rows 0..64   -> flat [0, 65 L)
    +-----------------------------+     rank 1: rows 65..128 -> flat [65 L, 129 L)
    | rows 0..64   (rank 0)       |
    +-----------------------------+     8-bit blocks restart at each row (docs/algorithms.md
    | rows 65..128 (rank 1)       |     §13.2), so both halves are block-aligned; sparse
    +-----------------------------+     subsets hash the global flat index (§13.3)

Refused with a clear error: ``Shard(d > 0)``, ``Partial``, strided shards (``_StridedShard``),
two sharded mesh dimensions, other tensor subclasses, and FSDP1 flat parameters wherever a
flat shard would give wrong results (Stable-SPAM statistics, 8-bit blocks, sparse subsets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ShardInfo",
    "check_fsdp1",
    "distribute_like",
    "is_dtensor",
    "local_tensor",
    "local_view_of_state",
    "shard_info",
    "stats_reducer",
]


def _dtensor_types() -> tuple[type, ...]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return ()
    return (DTensor,)


def is_dtensor(t: Any) -> bool:
    types = _dtensor_types()
    return bool(types) and isinstance(t, types)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local buffer of a DTensor (a view: in-place writes reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class ShardInfo:
    """Where a DTensor parameter's local tensor sits in its global index space."""

    mesh: Any  # torch.distributed.DeviceMesh
    placements: tuple[Any, ...]
    global_shape: torch.Size
    global_stride: tuple[int, ...]
    shard_dim: int | None  # the mesh dimension that shards dim 0, None if fully replicated
    row_offset: int  # global row of local row 0
    local_rows: int

    @property
    def sharded(self) -> bool:
        """Whether the parameter is split over more than one rank (reductions are needed)."""
        return self.shard_dim is not None and self.mesh.size(self.shard_dim) > 1

    @property
    def global_numel(self) -> int:
        return self.global_shape.numel()

    @property
    def row_numel(self) -> int:
        """Elements per row of dim 0 (the whole tensor for a 0-d one)."""
        rows = self.global_shape[0] if len(self.global_shape) else 1
        return self.global_numel // rows if rows else 0

    @property
    def flat_offset(self) -> int:
        """Global flat index of local element 0."""
        return self.row_offset * self.row_numel

    def group(self) -> Any:
        """The process group over which dim 0 is sharded (None when replicated)."""
        return None if self.shard_dim is None else self.mesh.get_group(self.shard_dim)


def _placement_error(name: str, placements: Any) -> TypeError:
    return TypeError(
        f"spam_lowmem: {name} is a DTensor with placements {tuple(placements)}; the optimizers "
        "support Replicate() and Shard(0) (FSDP2 fully_shard, HSDP, replicate). Shard(d > 0) "
        "(tensor-parallel column shards), Partial and strided shards are not supported: "
        "redistribute the parameter to Shard(0) or Replicate(), or shard with FSDP2's "
        "default placement"
    )


def shard_info(p: torch.Tensor, name: str = "a parameter") -> ShardInfo | None:
    """The sharding of a DTensor parameter (None for a plain tensor); TypeError for placements
    the optimizers cannot step correctly (module docstring)."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    shard_dims = []
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Shard and placement.dim == 0:
            shard_dims.append(mesh_dim)
        elif type(placement) is not Replicate:
            raise _placement_error(name, placements)
    if len(shard_dims) > 1:
        raise _placement_error(name, placements)
    mesh = p.device_mesh
    local = p.to_local()
    shape = p.shape
    row_offset, local_rows = 0, (shape[0] if len(shape) else 1)
    if shard_dims:
        if len(shape) == 0:
            raise _placement_error(name, placements)
        size = mesh.size(shard_dims[0])
        coordinate = mesh.get_local_rank(shard_dims[0])
        chunk = -(-shape[0] // size)
        row_offset = min(coordinate * chunk, shape[0])
        local_rows = max(0, min(chunk, shape[0] - row_offset))
    expected = (local_rows, *shape[1:]) if len(shape) else ()
    if tuple(local.shape) != tuple(expected):
        raise TypeError(
            f"spam_lowmem: {name} is a DTensor whose local shard has shape {tuple(local.shape)}, "
            f"not the {tuple(expected)} of an even torch.chunk split of {tuple(shape)}; uneven "
            "custom shardings are not supported"
        )
    return ShardInfo(
        mesh=mesh,
        placements=placements,
        global_shape=shape,
        global_stride=tuple(p.stride()),
        shard_dim=shard_dims[0] if shard_dims else None,
        row_offset=row_offset,
        local_rows=local_rows,
    )


def check_grad_placements(p: torch.Tensor, grad: torch.Tensor) -> None:
    """A DTensor gradient must be laid out like its parameter (a Partial gradient, not yet
    reduced, would be stepped as if it were the full one)."""
    if is_dtensor(p) != is_dtensor(grad):
        raise TypeError(
            "spam_lowmem: a DTensor parameter has a plain-tensor gradient (or the reverse); "
            "both must be DTensors with the same placements"
        )
    if is_dtensor(p) and (tuple(grad.placements) != tuple(p.placements) or grad.device_mesh != p.device_mesh):
        raise TypeError(
            f"spam_lowmem: a gradient has placements {tuple(grad.placements)} but its parameter "
            f"{tuple(p.placements)}; reduce or redistribute the gradient to the parameter's "
            "placements before step()"
        )


def distribute_like(local: torch.Tensor, info: ShardInfo, global_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Wrap a local state tensor as a DTensor with the parameter's mesh and placements.

    ``global_shape`` defaults to the parameter's; a state tensor with another shape (8-bit
    absmax ``[R, blocks_per_row]``) gives its own, whose dim 0 is split like the parameter's."""
    from torch.distributed.tensor import DTensor

    shape = tuple(info.global_shape) if global_shape is None else tuple(global_shape)
    stride = info.global_stride if global_shape is None else _contiguous_stride(shape)
    return DTensor.from_local(
        local, info.mesh, info.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def local_view_of_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state with each DTensor replaced by its local buffer (views: the core's in-place
    writes reach the DTensors); the dict itself when nothing is distributed."""
    if not any(is_dtensor(v) for v in state.values()):
        return state
    return {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}


def check_fsdp1(p: torch.Tensor, group: dict[str, Any], kind: str, name: str = "a parameter") -> None:
    """Refuse FSDP1 (``FullyShardedDataParallel``) parameters where a flat shard gives wrong
    results: its parameters are 1-D slices of a flat concatenation, so per-tensor statistics
    (Stable-SPAM), blocks (8-bit moments) and 2-D subsets (sparse momentum) would be computed over
    the wrong elements. Elementwise 32-bit SPAM and AdamW are correct on them and allowed."""
    if not getattr(p, "_fsdp_flattened", False) and not getattr(p, "_is_flat_param", False):
        return
    reasons = []
    if kind == "StableSPAM":
        reasons.append("Stable-SPAM's per-tensor statistics")
    if group.get("state_bits", 32) == 8:
        reasons.append("8-bit moment blocks")
    if group.get("density", 1.0) < 1.0:
        reasons.append("sparse-momentum subsets")
    if reasons:
        raise NotImplementedError(
            f"spam_lowmem: {name} is an FSDP1 (FullyShardedDataParallel) flat parameter; "
            f"{' and '.join(reasons)} would be computed over its flat shard, which mixes "
            "parameters and splits rows, giving wrong results. Use FSDP2 "
            "(torch.distributed.fsdp.fully_shard), whose DTensor parameters are supported, or "
            "32-bit dense SPAM/AdamW under FSDP1"
        )


def stats_reducer(process_group: Any) -> Any:
    """The ``reduce_stats`` callback of a Stable-SPAM core step over tensors sharded on
    ``process_group`` (docs/algorithms.md §4.4 steps 3-4 need max|g| and ||g||^2 of the whole
    tensor): every row ``[max|g|, sum g^2]`` of the float64 ``stats`` becomes its value over all
    shards. One all-gather per call and phase for the whole batch (not one per tensor), folded
    in rank order, so the result does not depend on which rank finishes first, and differs from
    an unsharded sum only by float64 rounding (the kernels sum squares in double)."""
    import torch.distributed as dist

    world = dist.get_world_size(process_group)

    def reduce(stats: torch.Tensor, phase: int) -> None:
        gathered = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats.contiguous(), group=process_group)
        max_abs, sum_sq = gathered[0][:, 0].clone(), gathered[0][:, 1].clone()
        for part in gathered[1:]:
            max_abs = torch.maximum(max_abs, part[:, 0])  # NaN-propagating, like torch.amax
            sum_sq = sum_sq + part[:, 1]
        stats[:, 0] = max_abs
        stats[:, 1] = sum_sq

    return reduce
