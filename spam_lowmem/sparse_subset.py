"""The random coordinate subset of SPAM's sparse momentum, without stored indices.

docs/algorithms.md §3: in a ``density`` group each 2-D weight keeps Adam moments only for a random
subset of its entries. Here membership of flat index ``i`` is decided by a counter-based hash,
written identically in ``cpp/spam/sparse_subset.h`` (``SPAM_HD``)::

    h(seed, i) = fmix32((uint32(i) * 0x9E3779B1 + seed) mod 2^32)      # murmur3 finaliser
    selected(i) = h < t_hash  or  (h == t_hash and i <= t_index)

* the initial subset holds exactly ``k = floor(d * numel)`` entries: the ``k`` smallest
  ``(h, i)`` pairs, so ``(t_hash, t_index)`` is the k-th smallest pair;
* a subset drawn at a momentum reset is Bernoulli(d) per entry (the authors' ``rand < d``):
  ``t_hash = floor(d * 2^32)``, ``t_index = -1``.

A subset is stored as an int64 tensor ``[seed, t_hash, t_index, numel]`` (32 bytes), plus
``compact_block_starts``: the flat index of the first selected entry of each block of 256
compact values, so the kernel can start a block without scanning from 0.

Everything here is torch int64 arithmetic (products are split so they never overflow). The
functions that build a subset allocate full-size temporaries (the int64 hashes, a bool mask);
the optimizers call them only when a subset is drawn (first step, then once per
``reset_interval`` calls) and when a state dict is loaded, never in the step itself.
"""

from __future__ import annotations

import math

import torch

from .qmap import BLOCK_SIZE

__all__ = [
    "subset_hash",
    "exact_rule",
    "bernoulli_rule",
    "subset_mask",
    "block_starts",
    "subset_size",
    "draw_seed",
    "MAX_NUMEL",
]

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1
#: flat indices enter the hash as uint32
MAX_NUMEL = 2**32 - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 ``x`` in [0, 2^32) and a constant ``c < 2^32``, exactly."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def subset_hash(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """``h(seed, i)`` for int64 ``indices``, as int64 values in [0, 2^32)."""
    x = (_mul32(indices.to(torch.int64) & M32, GOLDEN) + (int(seed) & M32)) & M32
    return _fmix32(x)


def _all_hashes(seed: int, numel: int, device: torch.device | str) -> torch.Tensor:
    return subset_hash(seed, torch.arange(numel, dtype=torch.int64, device=device))


def _check_numel(numel: int) -> None:
    if numel > MAX_NUMEL:
        raise ValueError(f"sparse momentum supports parameters of fewer than 2^32 elements, got {numel}")


def exact_rule(seed: int, numel: int, density: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[seed, t_hash, t_index, numel]`` selecting exactly ``floor(density * numel)`` entries."""
    _check_numel(numel)
    k = math.floor(density * numel)
    if k <= 0:
        return torch.tensor([seed, 0, -1, numel], dtype=torch.int64)
    h = _all_hashes(seed, numel, device)
    t_hash = int(torch.kthvalue(h, k).values)
    less = int((h < t_hash).sum())
    ties = torch.nonzero(h == t_hash).flatten()  # ascending flat indices
    t_index = int(ties[k - less - 1])
    return torch.tensor([seed, t_hash, t_index, numel], dtype=torch.int64)


def bernoulli_rule(seed: int, numel: int, density: float) -> torch.Tensor:
    """``[seed, t_hash, -1, numel]``: each entry selected independently with probability ~d."""
    _check_numel(numel)
    t_hash = min(math.floor(density * 2**32), M32)
    return torch.tensor([seed, t_hash, -1, numel], dtype=torch.int64)


def subset_mask(rule: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Full-size flat bool mask of a rule (a temporary of 9 bytes per element while built)."""
    seed, t_hash, t_index, numel = (int(x) for x in rule.tolist())
    h = _all_hashes(seed, numel, device)
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    return (h < t_hash) | ((h == t_hash) & (idx <= t_index))


def block_starts(mask: torch.Tensor) -> torch.Tensor:
    """Flat index of the first selected entry of every block of 256 compact values."""
    return torch.nonzero(mask.flatten()).flatten()[::BLOCK_SIZE].clone()


def subset_size(rule: torch.Tensor) -> int:
    return int(subset_mask(rule).sum())


def draw_seed(generator: torch.Generator) -> int:
    """A 32-bit seed from the optimizer's own generator (saved in its state dict)."""
    return int(torch.randint(0, 2**32, (1,), generator=generator, dtype=torch.int64).item())
