"""Reading the spike telemetry of an optimizer (``SpikeAwareOptimizer.spike_stats``).

The counters are int64 device tensors the core adds to inside ``step()`` without a host sync;
here they are read (one sync per counter tensor), summed over the process group of sharded
tensors, and reset. The non-finite state snapshots are computed here too, never in ``step()``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import moments, sharding

__all__ = ["KEYS", "count_nonfinite", "read_spike_stats"]

KEYS = ("clipped", "nonfinite", "requant_nonfinite_groups", "nonfinite_state_blocks", "nonfinite_state_entries")


def read_spike_stats(
    param_groups: list[dict[str, Any]],
    state: Any,
    counters_by_batch: dict[tuple[int, torch.device, Any], torch.Tensor],
    bad_groups: dict[tuple[int, torch.device], torch.Tensor],
) -> dict[str, Any]:
    """The figures of :meth:`SpikeAwareOptimizer.spike_stats`, resetting the counters:
    ``counters_by_batch`` holds ``[clipped, nonfinite]`` per (group index, device, shard
    process group or None), ``bad_groups`` the packed 4-bit requantisation failures."""
    groups: list[dict[str, int]] = [dict.fromkeys(KEYS, 0) for _ in param_groups]
    for (index, _device, shard_group), counters in counters_by_batch.items():
        totals = counters.clone()
        if shard_group is not None:
            torch.distributed.all_reduce(totals, group=shard_group)
        clipped, nonfinite = totals.tolist()
        counters.zero_()
        if index < len(groups):
            groups[index]["clipped"] += int(clipped)
            groups[index]["nonfinite"] += int(nonfinite)
    for (index, _device), bad in bad_groups.items():
        n = int(bad.item())
        bad.zero_()
        if index < len(groups):
            groups[index]["requant_nonfinite_groups"] += n
    for index, group in enumerate(param_groups):
        groups[index]["nonfinite_state_blocks"] = count_nonfinite(group, state, moments.FP32_KEYS)
        groups[index]["nonfinite_state_entries"] = count_nonfinite(group, state, moments.DENSE_KEYS)
    return {**{key: sum(g[key] for g in groups) for key in KEYS}, "groups": groups}


def count_nonfinite(group: dict[str, Any], state: Any, state_keys: tuple[str, ...]) -> int:
    """NaN/inf entries of the given state tensors of the group (8-bit absmax: blocks; dense
    moments: entries), summed on each device first (one host sync per device) and, for
    sharded tensors, over their process group."""
    per_key: dict[tuple[torch.device, Any], Any] = {}
    for p in group["params"]:
        local = sharding.local_view_of_state(state.get(p, {}))
        info = sharding.shard_info(p)
        shard_group = info.group() if info is not None and info.sharded else None
        for key in state_keys:
            t = local.get(key)
            if isinstance(t, torch.Tensor):
                where = (t.device, shard_group)
                per_key[where] = per_key.get(where, 0) + (~t.isfinite()).sum()
    total = 0
    for (_device, shard_group), count in per_key.items():
        if shard_group is not None:
            count = count.clone()
            torch.distributed.all_reduce(count, group=shard_group)
        total += int(count)
    return total
