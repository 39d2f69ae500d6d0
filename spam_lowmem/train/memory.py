"""What the comparison measures about memory, and how.

* **Optimizer state** (:func:`optimizer_state_bytes`): bytes of the distinct tensor storages
  reachable from ``optimizer.state`` (dicts, lists, and attributes of objects such as GaLore's
  projector, whose ``ortho_matrix`` counts). A view counts its whole storage, since that is what
  it keeps alive (galore-torch 1.0 in float32 keeps ``Vh[:r]`` / ``U[:, :r]`` of the full SVD).
  Buffers an optimizer keeps outside ``state`` are not seen. A DTensor (FSDP2) counts the shard
  this process holds; the distributed loop sums those over the ranks.
* **Peak memory** (:class:`PeakMemory`), from just before the model is built to the end of
  training, so it covers weights, gradients, optimizer state, activations and temporaries:
  - CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``;
  - CPU (Linux): the process's peak resident set size (``VmHWM``, reset through
    ``/proc/self/clear_refs`` at the start) minus the resident size at the start. Allocator
    slack and page granularity are included, so it is an upper bound of what torch needed.
    Where ``VmHWM`` cannot be reset, the delta is taken against the start anyway and marked so.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["optimizer_state_bytes", "PeakMemory"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the distinct tensor storages held in ``optimizer.state`` (views counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(obj: Any, depth: int) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if hasattr(obj, "to_local"):  # a DTensor (FSDP2): the shard this process holds
                obj = obj.to_local()
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif depth > 4:
            return
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for value in vars(obj).values():
                visit(value, depth + 1)

    for state in optimizer.state.values():
        visit(state, 0)
    return total


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory from :meth:`start` to :meth:`peak_bytes` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = 0
            self.method = "CUDA torch.cuda.max_memory_allocated (weights+grads+state+activations)"
            return
        reset = False
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            reset = True
        except OSError:
            pass
        rss = _proc_status_kib("VmRSS")
        self.base = (rss or 0) * 1024
        if rss is None:
            self.method = "unavailable (no /proc/self/status)"
        elif reset:
            self.method = "CPU peak RSS (VmHWM, reset at start) minus RSS before the model was built"
        else:
            self.method = "CPU peak RSS (VmHWM, not resettable: may include earlier peaks) minus RSS at start"

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _proc_status_kib("VmHWM")
        if hwm is None:
            return None
        return max(0, hwm * 1024 - self.base)
