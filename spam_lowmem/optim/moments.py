"""Adam moments in either precision, behind one interface for the optimizers.

Dense (``state_bits=32``): ``exp_avg``, ``exp_avg_sq`` in the parameter dtype (torch's
convention). 8-bit (``state_bits=8``): blockwise codes and absmax (spam_lowmem/qmap.py), for a
parameter of shape ``[R, ...]`` (row length ``L = numel / R``)::

    exp_avg_codes     uint8   [R, ...]  (shaped like the parameter)   signed dynamic map
    exp_avg_absmax    float32 [R, ceil(L/256)]
    exp_avg_sq_codes  uint8   [R, ...]                                unsigned dynamic map
    exp_avg_sq_absmax float32 [R, ceil(L/256)]

Blocks of 256 restart at each row (the last block of a row may be partial), so any split of
the rows between ranks (FSDP2's ``Shard(0)``) is block-aligned and each shard's state is the
slice of the whole's. A [3, 600] parameter, per row: | 256 | 256 | 88 |, absmax [3, 3]. 1-D
parameters keep the flat layout (codes ``[numel]``, absmax ``[ceil(numel/256)]``), as do the
compact arrays of sparse momentum. docs/algorithms.md §13.2.

Parameters under ``min_8bit_size`` elements keep dense moments even when 8-bit is asked for
(their state is negligible and their statistics noisy); :meth:`memory_report` lists them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..qmap import absmax_shape, num_blocks, quant_map
from . import sharding

__all__ = [
    "CODE_KEYS",
    "DENSE_KEYS",
    "FP32_KEYS",
    "INDEX_KEYS",
    "QUANT_KEYS",
    "conform_loaded_layout",
    "dequantized_moments",
    "init_compact_moments",
    "init_moments",
    "init_sharded_moments",
    "is_quantized",
    "loaded_layout_problem",
    "memory_report",
    "moment_args",
    "shard_loaded_state",
    "sharded_memory_report",
    "state_bytes",
]

DENSE_KEYS = ("exp_avg", "exp_avg_sq")
QUANT_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
FP32_KEYS = ("exp_avg_absmax", "exp_avg_sq_absmax")
CODE_KEYS = ("exp_avg_codes", "exp_avg_sq_codes")
#: sparse momentum (spam_lowmem/sparse_subset.py): the subset rule and the compact block starts
INDEX_KEYS = ("subset", "compact_block_starts")


def wants_8bit(p: torch.Tensor, group: dict[str, Any], numel: int | None = None) -> bool:
    """Whether ``p`` gets 8-bit moments; ``numel``: the size to hold against ``min_8bit_size``
    when ``p`` is a shard (the whole parameter's, so that every shard decides alike)."""
    size = p.numel() if numel is None else numel
    return group.get("state_bits", 32) == 8 and size >= group.get("min_8bit_size", 4096)


def init_moments(p: torch.Tensor, state: dict[str, Any], quantized: bool) -> None:
    """Zero moments for ``p`` in the chosen precision (codes of 0.0, absmax 0)."""
    if not quantized:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return
    blocks = absmax_shape(p.shape)  # [R, blocks per row], or flat for 1-D
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        zero = quant_map(signed).zero_code
        state[f"{key}_codes"] = torch.full(p.shape, zero, dtype=torch.uint8, device=p.device)
        state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


def init_sharded_moments(p: torch.Tensor, state: dict[str, Any], quantized: bool, info: sharding.ShardInfo) -> None:
    """Zero moments for a DTensor parameter: made for its local shard, then wrapped as DTensors
    with its mesh and placements (global shapes: the parameter's for moments and codes,
    ``[R, blocks_per_row]`` for 8-bit absmax), so that DCP saves and reshards them.

    8-bit blocks restart at each row (docs/algorithms.md §13.2), so any dim-0 split of a 2-D
    parameter is block-aligned. A 1-D parameter has flat blocks: sharded, every shard must
    start on a block (ceil(numel / world) a multiple of 256), else ValueError on every rank
    (the test reads only global facts)."""
    local = sharding.local_tensor(p.detach())
    made: dict[str, Any] = {}
    init_moments(local, made, quantized)
    for key, value in made.items():
        if key in FP32_KEYS:
            if value.dim() == 2:  # row blocks [R, blocks_per_row]: dim 0 splits like the parameter's
                shape: tuple[int, ...] = (info.global_shape[0], value.shape[1])
            elif info.sharded and p.dim() <= 1:
                world = info.mesh.size(info.shard_dim)
                chunk = -(-info.global_numel // world)
                if chunk % 256 and info.global_numel > chunk:
                    raise ValueError(
                        f"spam_lowmem: 8-bit moments of a 1-D parameter of {info.global_numel} "
                        f"elements sharded over {world} ranks: its shards ({chunk} elements) do "
                        "not start on 256-element blocks, so the blocks would depend on the world "
                        "size. Raise min_8bit_size above its size (32-bit moments for it), or use "
                        "a world size that divides it into multiples of 256"
                    )
                shape = (num_blocks(info.global_numel),)
            else:
                shape = tuple(value.shape)
            state[key] = sharding.distribute_like(value, info, shape)
        else:
            state[key] = sharding.distribute_like(value, info)


def shard_loaded_state(p: torch.Tensor, state: dict[str, Any], info: sharding.ShardInfo) -> None:
    """After a load into a DTensor parameter: give every moment tensor the parameter's layout.

    A DTensor (what DCP loads, already resharded to this mesh) is redistributed if its
    placements differ; a plain full-size tensor (a state saved without sharding, or a
    ``full_state_dict``) is cut to this rank's rows and wrapped. Other entries (counts, the
    Stable-SPAM statistics, a subset rule) are the same on every rank and stay plain."""
    if "subset" in state:  # sparse momentum: compact local moments (SPAM.load_state_dict)
        return
    for key in (*DENSE_KEYS, *QUANT_KEYS):
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if sharding.is_dtensor(value):
            if tuple(value.placements) != info.placements or value.device_mesh != info.mesh:
                value = value.redistribute(info.mesh, info.placements)
            state[key] = value
            continue
        if key in FP32_KEYS and value.dim() == 1 and len(info.global_shape) >= 1 and value.numel() > 0:
            per_block = 256
            first = info.flat_offset // per_block
            count = num_blocks(info.local_rows * info.row_numel) if info.local_rows else 0
            local = value[first : first + count]
        else:
            local = value[info.row_offset : info.row_offset + info.local_rows] if value.dim() else value
        state[key] = sharding.distribute_like(
            local.contiguous(), info, tuple(value.shape) if key in FP32_KEYS else None
        )


def loaded_layout_problem(p: torch.Tensor, saved: dict[str, Any]) -> str | None:
    """Why the saved 8-bit dense moments of ``p`` cannot be loaded, or None. Codes need one uint8
    per element; absmax the layout's shape (:func:`spam_lowmem.qmap.absmax_shape`), or, for a
    state saved by a version whose blocks ran over the flattened tensor (absmax 1-D of
    ``ceil(numel/256)``), rows of a multiple of 256 elements, whose blocks are the same."""
    for key in CODE_KEYS:
        if saved[key].dtype != torch.uint8 or saved[key].numel() != p.numel():
            return (
                f"loaded '{key}' does not hold one uint8 code per element (got {saved[key].dtype}, "
                f"{saved[key].numel()} entries)"
            )
    want = absmax_shape(p.shape)
    for key in FP32_KEYS:
        got = tuple(saved[key].shape)
        if got == want:
            continue
        if p.dim() >= 2 and got == (num_blocks(p.numel()),):
            row_len = math.prod(p.shape[1:])
            if row_len % 256 == 0 or p.numel() == 0:
                continue  # the old flat blocks are these blocks (or none): reshaped on load
            return (
                f"loaded '{key}' was saved with the flat 8-bit block layout of an earlier "
                "spam_lowmem version (blocks of 256 over the flattened tensor); this version's "
                f"blocks restart at each row (docs/algorithms.md §13.2), and rows of {row_len} "
                "elements are no multiple of 256, so the saved blocks cannot be loaded into the row "
                "layout (re-create the 8-bit state, e.g. by loading without optimizer state)"
            )
        return f"loaded '{key}' has shape {list(got)}; the 8-bit blocks need absmax of shape {list(want)}"
    return None


def conform_loaded_layout(p: torch.Tensor, state: dict[str, Any]) -> None:
    """Give checked, loaded 8-bit dense moments of ``p`` the layout's shapes (codes shaped like
    ``p``, absmax :func:`~spam_lowmem.qmap.absmax_shape`): an old flat state of rows of whole
    blocks holds the same data, reshaped. Contiguous, as the core needs."""
    if not is_quantized(state) or "subset" in state:  # sparse: compact arrays stay flat
        return
    for key in CODE_KEYS:
        state[key] = state[key].reshape(p.shape).contiguous()
    for key in FP32_KEYS:
        state[key] = state[key].reshape(absmax_shape(p.shape)).contiguous()


def init_compact_moments(p: torch.Tensor, state: dict[str, Any], compact: int, quantized: bool) -> None:
    """Zero moments for ``compact`` selected entries of ``p`` (sparse momentum): 1-D arrays of
    ``compact`` values in ``p``'s dtype, or ``compact`` codes and ``ceil(compact/256)`` absmax."""
    for key in (*DENSE_KEYS, *QUANT_KEYS):
        state.pop(key, None)
    if not quantized:
        state["exp_avg"] = torch.zeros(compact, dtype=p.dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(compact, dtype=p.dtype, device=p.device)
        return
    blocks = num_blocks(compact)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        zero = quant_map(signed).zero_code
        state[f"{key}_codes"] = torch.full((compact,), zero, dtype=torch.uint8, device=p.device)
        state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


def is_quantized(state: dict[str, Any]) -> bool:
    return "exp_avg_codes" in state


def moment_args(states: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The moment lists (and maps, when any tensor is 8-bit) a core step call takes."""
    empty = torch.empty(0, dtype=torch.float32, device=device)
    m, v, am, av = [], [], [], []
    for st in states:
        if is_quantized(st):
            m.append(st["exp_avg_codes"])
            v.append(st["exp_avg_sq_codes"])
            am.append(st["exp_avg_absmax"])
            av.append(st["exp_avg_sq_absmax"])
        else:
            m.append(st["exp_avg"])
            v.append(st["exp_avg_sq"])
            am.append(empty)
            av.append(empty)
    return {"exp_avgs": m, "exp_avg_sqs": v, "absmax_m": am, "absmax_v": av}


def dequantized_moments(p: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) as float32 tensors shaped like ``p`` (for inspection and tests)."""
    if not is_quantized(state):
        return state["exp_avg"].float(), state["exp_avg_sq"].float()
    from ..functional import dequantize_blockwise

    out = []
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        out.append(
            dequantize_blockwise(
                state[f"{key}_codes"], state[f"{key}_absmax"], signed=signed, dtype=torch.float32
            ).view(p.shape)
        )
    return out[0], out[1]


def state_bytes(state: dict[str, Any]) -> dict[str, int]:
    """Bytes of a parameter's state by kind: moment values, absmax, sparse-subset indices
    (``INDEX_KEYS``), everything else."""
    kinds = {"values": 0, "indices": 0, "absmax": 0, "other": 0}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        nbytes = value.numel() * value.element_size()
        if key in DENSE_KEYS or key.endswith("_codes"):
            kinds["values"] += nbytes
        elif key in INDEX_KEYS:
            kinds["indices"] += nbytes
        elif key.endswith("_absmax"):
            kinds["absmax"] += nbytes
        else:
            kinds["other"] += nbytes
    return kinds


def memory_report(param_groups: list[dict[str, Any]], state: Any) -> dict[str, Any]:
    """Bytes of optimizer state, per parameter and in total, measured from ``state`` (an
    optimizer's ``self.state``) for its ``param_groups``.

    Each entry: ``index`` (position in ``param_groups``), ``shape``, ``numel``,
    ``state_bits`` (of its moments), ``fallback`` (8-bit asked for but kept dense because
    it is under ``min_8bit_size``), ``density`` (of its group; < 1: sparse momentum),
    ``moment_numel`` (values per moment: ``numel``, or the subset size when sparse), and bytes
    of ``values``, ``indices`` (sparse subset rule + compact block starts), ``absmax``,
    ``other``, ``total``; ``ratio_to_adamw32`` compares a total with 32-bit AdamW state
    (8 bytes/element), per entry and overall.
    """
    entries, total, numel = [], 0, 0
    index = 0
    for group in param_groups:
        for p in group["params"]:
            tensor_state = state.get(p, {})
            kinds = state_bytes(tensor_state)
            quant = is_quantized(tensor_state)
            moment = tensor_state.get("exp_avg_codes", tensor_state.get("exp_avg"))
            entry = {
                "index": index,
                "shape": tuple(p.shape),
                "numel": p.numel(),
                "initialised": bool(tensor_state),
                "state_bits": 8 if quant else (32 if tensor_state else None),
                "fallback": bool(tensor_state) and not quant and group.get("state_bits", 32) == 8,
                "density": group.get("density", 1.0),
                "moment_numel": moment.numel() if isinstance(moment, torch.Tensor) else 0,
                **kinds,
                "total": sum(kinds.values()),
                "ratio_to_adamw32": sum(kinds.values()) / (8 * p.numel()) if p.numel() else 0.0,
            }
            entries.append(entry)
            total += entry["total"]
            numel += p.numel()
            index += 1
    return {
        "params": entries,
        "total_bytes": total,
        "numel": numel,
        "bytes_per_param": total / numel if numel else 0.0,
        "ratio_to_adamw32": total / (8 * numel) if numel else 0.0,
        "fallbacks": [e["index"] for e in entries if e["fallback"]],
    }


#: state entries of a sharded parameter that differ between ranks (its shard's moments, and the
#: compact block starts of sparse momentum); everything else (counts, Stable-SPAM statistics, a
#: subset rule) is the same on every rank and counted once
PER_RANK_KEYS = (*DENSE_KEYS, *QUANT_KEYS, "compact_block_starts")


def sharded_memory_report(param_groups: list[dict[str, Any]], state: Any) -> dict[str, Any]:
    """:func:`memory_report` with global figures for DTensor parameters: the bytes of each
    sharded parameter's per-rank state (``PER_RANK_KEYS``) are summed over its process group
    (one all-reduce per group), its replicated state counted once, and ``local_total_bytes``
    keeps this rank's share. Without DTensors it is :func:`memory_report` plus
    ``local_total_bytes`` (= ``total_bytes``) and ``world_size`` 1."""
    params = [p for group in param_groups for p in group["params"]]
    local_state = {p: sharding.local_view_of_state(state[p]) for p in params if p in state}
    report = memory_report(param_groups, local_state)
    report["local_total_bytes"] = report["total_bytes"]
    report["world_size"] = 1
    by_group: dict[Any, list[int]] = {}
    for index, p in enumerate(params):
        info = sharding.shard_info(p)
        if info is not None and info.sharded:
            by_group.setdefault(info.group(), []).append(index)
            report["world_size"] = max(report["world_size"], info.mesh.size(info.shard_dim))
    if not by_group:
        return report
    kinds = ("values", "indices", "absmax", "other")
    entries = report["params"]
    for shard_group, indices in by_group.items():
        rows, replicated = [], []
        for i in indices:
            st = local_state.get(params[i], {})
            once = state_bytes({k: v for k, v in st.items() if k not in PER_RANK_KEYS})
            replicated.append(once)
            rows.append([entries[i][k] - once[k] for k in kinds] + [entries[i]["moment_numel"]])
        summed = torch.tensor(rows, dtype=torch.int64, device=params[indices[0]].device)
        torch.distributed.all_reduce(summed, group=shard_group)
        for row, once, i in zip(summed.cpu().tolist(), replicated, indices):
            entry = entries[i]
            entry.update({k: row[j] + once[k] for j, k in enumerate(kinds)}, moment_numel=row[-1])
            entry["total"] = sum(entry[k] for k in kinds)
            entry["ratio_to_adamw32"] = entry["total"] / (8 * entry["numel"]) if entry["numel"] else 0.0
    total = sum(e["total"] for e in entries)
    numel = report["numel"]
    report.update(
        total_bytes=total,
        bytes_per_param=total / numel if numel else 0.0,
        ratio_to_adamw32=total / (8 * numel) if numel else 0.0,
    )
    return report
