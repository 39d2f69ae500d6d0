"""What the optimizers accept as parameters and how a group's tensors reach the core: plain
tensors and DTensors with supported placements (:mod:`spam_lowmem.optim.sharding`), no other
subclasses; torch.optim's named-parameter conventions; and the per-device batch of one step
(contiguous local views, with an explicit copy-back for non-contiguous ones)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..functional import PackedStep
from . import moments, sharding

__all__ = ["PLAIN_TENSOR_TYPES", "DeviceBatch", "check_plain_tensor", "split_named"]

#: the only parameter/gradient types the core can step (tensor subclasses are rejected)
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


@dataclass
class DeviceBatch:
    """The tensors of one group on one device, in the order the core receives them."""

    params: list[torch.Tensor] = field(default_factory=list)  # contiguous views or copies
    grads: list[torch.Tensor] = field(default_factory=list)
    owners: list[torch.Tensor] = field(default_factory=list)  # the user's parameters
    states: list[dict[str, Any]] = field(default_factory=list)
    copy_back: list[int] = field(default_factory=list)  # indices whose params are copies
    packed: list[PackedStep | None] = field(default_factory=list)  # fused 4-bit weights
    fresh: list[int] = field(default_factory=list)  # indices whose state this call created
    #: per tensor: its state with DTensors replaced by their local buffers (the state dict
    #: itself for a plain parameter); the core reads and writes these
    views: list[dict[str, Any]] = field(default_factory=list)
    #: per tensor: where a DTensor parameter's shard sits (None for a plain parameter)
    shards: list[sharding.ShardInfo | None] = field(default_factory=list)

    def moment_args(self, device: torch.device) -> dict[str, Any]:
        """Moment buffers (dense or 8-bit) of this batch, as the core step calls take them."""
        return moments.moment_args(self.views, device)

    @property
    def process_group(self) -> Any:
        """The process group over which this batch's tensors are sharded (None: not sharded).
        A batch holds tensors of one group only (``SpikeAwareOptimizer._gather``)."""
        for info in self.shards:
            if info is not None and info.sharded:
                return info.group()
        return None

    def write_back(self) -> None:
        """Copy the updated contiguous copies into non-contiguous parameters."""
        for i in self.copy_back:
            self.owners[i].detach().copy_(self.params[i])


def check_plain_tensor(what: str, t: torch.Tensor) -> None:
    """Reject tensor subclasses other than DTensor: the core steps raw storage, which a subclass
    may not have (a ``__torch_dispatch__`` wrapper often has none), so stepping one could crash
    the process instead of raising. A DTensor is stepped through its local shard, which must be
    a plain tensor, and its placements must be supported (:func:`sharding.shard_info`)."""
    if sharding.is_dtensor(t):
        sharding.shard_info(t, what)
        check_plain_tensor(f"the local shard of {what}", t.to_local())
        return
    if type(t) not in PLAIN_TENSOR_TYPES:
        kind = f"{type(t).__module__}.{type(t).__qualname__}"
        raise TypeError(
            f"spam_lowmem: {what} is a {kind}, a torch.Tensor subclass; only plain "
            "torch.Tensor / torch.nn.Parameter and DTensor (FSDP2 fully_shard, replicate; "
            "placements Shard(0) or Replicate()) are supported"
        )


def split_named(params: Any) -> tuple[list[torch.Tensor], list[str] | None]:
    """The tensors of a group's ``params`` and their names, with torch.optim's conventions: a
    single tensor, or an ordered iterable of tensors or of ``(name, tensor)`` tuples (all named
    or none)."""
    if isinstance(params, torch.Tensor):
        return [params], None
    if isinstance(params, set):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the "
            "ordering of tensors in sets will change between runs; use a list instead"
        )
    items = list(params)
    named = [isinstance(item, tuple) for item in items]
    if not any(named):
        return items, None
    if not all(named):
        raise ValueError(
            "all optimizer params should be with/without names; some param names are "
            "missing (pass either tensors or (name, tensor) tuples in one group)"
        )
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str):
            raise TypeError(
                f"a named parameter must be a (str, Tensor) tuple, got a tuple of {[torch.typename(x) for x in item]}"
            )
    return [item[1] for item in items], [item[0] for item in items]
