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

Indices are *global* (docs/algorithms.md §13.3): a shard that holds the flat indices
``[offset, offset + count)`` of a parameter of ``numel`` elements (the rows of dim 0 an FSDP2
rank steps) uses the rule of the whole parameter, with ``numel`` the global size, and tests
``selected(offset + i)`` for its local element ``i``; block starts and compact moments are local.
:func:`exact_rule` / :func:`exact_rules` find the global k-th smallest pair from a shard's own
hashes and a sum across ranks (``reduce_sum``), so no rank hashes the whole parameter.

Seeds are derived, not drawn (:func:`subset_seed`): the seed of a parameter's n-th subset is a
pure function of the optimizer's base seed, the parameter's position and n, so it needs no
generator state in checkpoints and every rank derives the same one.

Everything here is torch int64 arithmetic (products are split so they never overflow). The
functions that build a subset allocate full-size temporaries (the int64 hashes, a bool mask);
the optimizers call them only when a subset is drawn (first step, then once per
``reset_interval`` calls) and when a state dict is loaded, never in the step itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .qmap import BLOCK_SIZE

__all__ = [
    "subset_hash",
    "subset_seed",
    "exact_rule",
    "exact_rules",
    "bernoulli_rule",
    "subset_mask",
    "block_starts",
    "subset_size",
    "DEFAULT_SUBSET_SEED",
    "MAX_NUMEL",
]

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1
#: flat indices enter the hash as uint32
MAX_NUMEL = 2**32 - 1
#: the base seed of the optimizers when ``subset_seed=None``: fixed, so that all ranks of a
#: distributed run agree (a seed drawn from each process's global RNG would differ between
#: ranks, which would then update different entries of their replicas and diverge)
DEFAULT_SUBSET_SEED = 0
#: :func:`exact_rules` settles 8 bits of the k-th smallest key per sum across ranks
_DIGIT_BITS = 8
_BINS = 1 << _DIGIT_BITS
#: indices hashed at once when a shard is scanned (bounds the int64 temporaries to ~100 MB)
_SCAN_CHUNK = 1 << 22

#: ``reduce_sum(t)``: sum the int64 tensor ``t`` over all ranks in place (e.g.
#: ``torch.distributed.all_reduce``); every rank calls it with a tensor of the same shape
ReduceSum = Callable[[torch.Tensor], None]


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


def _fmix32_int(h: int) -> int:
    """murmur3's finaliser on a Python int (the same function as :func:`_fmix32`)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def subset_hash(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """``h(seed, i)`` for int64 ``indices``, as int64 values in [0, 2^32)."""
    x = (_mul32(indices.to(torch.int64) & M32, GOLDEN) + (int(seed) & M32)) & M32
    return _fmix32(x)


def subset_seed(base_seed: int, param_index: int, draw: int) -> int:
    """The hash seed of subset number ``draw`` (0: the initial exact subset, then 1, 2, ... at
    each momentum reset) of the parameter at position ``param_index`` of an optimizer (flattened
    over its param groups), for the optimizer's ``base_seed`` in [0, 2^64).

    A pure function (docs/algorithms.md §3, §13.3): fmix32 chained over the 32-bit words
    ``lo32(base_seed), hi32(base_seed), param_index, draw``, starting from ``0x9E3779B1``::

        s <- fmix32((s * 0x9E3779B1 + word) mod 2^32)

    Each link is a bijection of ``word`` for a fixed ``s``, so two draws of one parameter, or the
    same draw of two parameters, never share a seed by construction of the last links."""
    base_seed, param_index, draw = int(base_seed), int(param_index), int(draw)
    if not 0 <= base_seed < 2**64:
        raise ValueError(f"subset_seed: base_seed {base_seed} is not in [0, 2**64)")
    for name, value in (("param_index", param_index), ("draw", draw)):
        if not 0 <= value <= M32:
            raise ValueError(f"subset_seed: {name} {value} is not in [0, 2**32)")
    s = GOLDEN
    for word in (base_seed & M32, base_seed >> 32, param_index, draw):
        s = _fmix32_int((s * GOLDEN + word) & M32)
    return s


def _check_numel(numel: int) -> None:
    if numel > MAX_NUMEL:
        raise ValueError(f"sparse momentum supports parameters of fewer than 2^32 elements, got {numel}")
    if numel < 0:
        raise ValueError(f"sparse momentum: numel must be >= 0, got {numel}")


def _local_range(numel: int, offset: int, count: int | None) -> int:
    """Check that ``[offset, offset + count)`` lies in ``[0, numel)``; return ``count``."""
    _check_numel(numel)
    offset = int(offset)
    count = numel - offset if count is None else int(count)
    if offset < 0 or count < 0 or offset + count > numel:
        raise ValueError(
            f"sparse momentum: the local range [offset, offset + count) = [{offset}, {offset + count}) "
            f"is not inside the parameter's {numel} global elements"
        )
    return count


def _hashes(seed: int, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
    return subset_hash(seed, torch.arange(start, stop, dtype=torch.int64, device=device))


def _empty_rule(seed: int, numel: int) -> torch.Tensor:
    return torch.tensor([seed, 0, -1, numel], dtype=torch.int64)


def _exact_rule_whole(seed: int, numel: int, k: int, device: torch.device | str) -> torch.Tensor:
    """The k-th smallest (h, i) pair from all ``numel`` hashes (one process, no sums)."""
    h = _hashes(seed, 0, numel, device)
    t_hash = int(torch.kthvalue(h, k).values)
    less = int((h < t_hash).sum())
    ties = torch.nonzero(h == t_hash).flatten()  # ascending flat indices
    t_index = int(ties[k - less - 1])
    return torch.tensor([seed, t_hash, t_index, numel], dtype=torch.int64)


def exact_rule(
    seed: int,
    numel: int,
    density: float,
    device: torch.device | str = "cpu",
    *,
    offset: int = 0,
    count: int | None = None,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """``[seed, t_hash, t_index, numel]`` selecting exactly ``floor(density * numel)`` entries.

    ``reduce_sum=None``: from the hashes of all ``numel`` entries (``offset`` and ``count`` are
    only checked; the rule does not depend on them). Otherwise this process holds the global
    indices ``[offset, offset + count)`` (``count`` defaults to ``numel - offset``) and the other
    ranks the rest; every rank calls this with the same ``seed``, ``numel``, ``density`` and its
    own range, and ``reduce_sum`` sums across them (:func:`exact_rules`, of which this is the
    one-tensor case). The rule is the same either way."""
    return exact_rules([seed], [numel], density, device, offsets=[offset], counts=[count], reduce_sum=reduce_sum)[0]


def exact_rules(
    seeds: Sequence[int],
    numels: Sequence[int],
    density: float,
    device: torch.device | str = "cpu",
    *,
    offsets: Sequence[int] | None = None,
    counts: Sequence[int | None] | None = None,
    reduce_sum: ReduceSum | None = None,
) -> list[torch.Tensor]:
    """:func:`exact_rule` for several tensors (one group) at once: with ``reduce_sum``, all the
    tensors' searches advance together, 8 sums per call whatever the number of tensors.

    Sharded search (docs/algorithms.md §13.3): the k-th smallest ``(h, i)`` pair is found as
    the k-th smallest hash ``t_hash``, then the ``k'``-th smallest global index among the
    entries tied at ``t_hash`` (``k' = k - #{h < t_hash}``). Each is a 32-bit key found 8 bits
    at a time, most significant first (a bisection that splits 256 ways): every rank counts
    its candidate keys per value of the next digit, ``reduce_sum`` adds the [tensors, 256]
    counts over the ranks, and every rank picks the same digit from the same sums. A rank
    keeps only the candidates that match the digits found so far (after the first digit,
    about 1/256 of its entries); the ranges of the ranks need not be ordered."""
    n = len(seeds)
    offsets = [0] * n if offsets is None else list(offsets)
    counts = [None] * n if counts is None else list(counts)
    if not len(numels) == len(offsets) == len(counts) == n:
        raise ValueError(f"exact_rules: {n} seeds, {len(numels)} numels, {len(offsets)} offsets, {len(counts)} counts")
    sizes = [_local_range(int(numel), off, cnt) for numel, off, cnt in zip(numels, offsets, counts)]
    ks = [math.floor(density * int(numel)) for numel in numels]
    rules = [_empty_rule(int(seed), int(numel)) for seed, numel in zip(seeds, numels)]
    todo = [j for j in range(n) if ks[j] > 0]
    if reduce_sum is None:
        for j in todo:
            rules[j] = _exact_rule_whole(int(seeds[j]), int(numels[j]), ks[j], device)
        return rules
    if not todo:  # decided from global sizes: every rank skips the sums alike
        return rules
    search = _ShardSearch(
        [int(seeds[j]) for j in todo],
        [int(numels[j]) for j in todo],
        [int(offsets[j]) for j in todo],
        [sizes[j] for j in todo],
        [ks[j] for j in todo],
        device,
        reduce_sum,
    )
    t_hash, t_index = search.run()
    for slot, j in enumerate(todo):
        rules[j] = torch.tensor([int(seeds[j]), t_hash[slot], t_index[slot], int(numels[j])], dtype=torch.int64)
    return rules


class _ShardSearch:
    """The k-th smallest (h, i) pair of several tensors, each sharded over ranks
    (:func:`exact_rules`). Keys are 32-bit; ``prefix`` holds the digits found so far."""

    def __init__(
        self,
        seeds: list[int],
        numels: list[int],
        offsets: list[int],
        counts: list[int],
        ks: list[int],
        device: torch.device | str,
        reduce_sum: ReduceSum,
    ) -> None:
        self.seeds, self.numels, self.offsets, self.counts = seeds, numels, offsets, counts
        self.device = torch.device(device)
        self.reduce_sum = reduce_sum
        self.k = torch.tensor(ks, dtype=torch.int64, device=self.device)  # 1-based rank still sought
        self.prefix = torch.zeros(len(seeds), dtype=torch.int64, device=self.device)

    def _scan(self, j: int) -> list[tuple[int, torch.Tensor]]:
        """The local hashes of tensor ``j`` in chunks: (global index of the chunk's first, h)."""
        start, stop = self.offsets[j], self.offsets[j] + self.counts[j]
        return [
            (a, _hashes(self.seeds[j], a, min(a + _SCAN_CHUNK, stop), self.device))
            for a in range(start, stop, _SCAN_CHUNK)
        ]

    def _settle_digit(self, hist: torch.Tensor, *, summed: bool = False) -> None:
        """Sum the local [tensors, 256] counts over the ranks and take the next digit of each
        key: the first bin whose running count reaches k (k then becomes the rank inside it)."""
        if not summed:
            self.reduce_sum(hist)
        running = hist.cumsum(1)
        digit = (running < self.k[:, None]).sum(1)
        below = torch.where(digit > 0, running.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0], 0)
        self.k -= below
        self.prefix = (self.prefix << _DIGIT_BITS) | digit

    def _hist(self, keys: list[torch.Tensor], shift: int) -> torch.Tensor:
        rows = [torch.bincount((key >> shift) & (_BINS - 1), minlength=_BINS) for key in keys]
        return torch.stack(rows).to(torch.int64)

    def run(self) -> tuple[list[int], list[int]]:
        n = len(self.seeds)
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        # t_hash, digit 1: over every local entry (hashed chunk by chunk, nothing kept)
        hist = torch.zeros(n, _BINS, dtype=torch.int64, device=self.device)
        for j in range(n):
            for _, h in self._scan(j):
                hist[j] += torch.bincount(h >> 24, minlength=_BINS)
        self.reduce_sum(hist)
        covered = hist.sum(1).tolist()  # the same sums on every rank: all raise alike
        if covered != self.numels:
            raise ValueError(
                f"exact_rules: the ranks' ranges cover {covered} entries of parameters of {self.numels} "
                "elements: every global index must be held by exactly one rank"
            )
        self._settle_digit(hist, summed=True)
        # digit 2: hash again, keeping the entries whose first digit matches (hash, global index)
        cand_h, cand_i = [], []
        for j in range(n):
            hs, idx = [empty], [empty]
            for a, h in self._scan(j):
                keep = torch.nonzero((h >> 24) == self.prefix[j]).flatten()
                hs.append(h[keep])
                idx.append(keep + a)
            cand_h.append(torch.cat(hs))
            cand_i.append(torch.cat(idx))
        for shift in (16, 8, 0):  # digits 2-4 of t_hash, on the shrinking candidates
            self._settle_digit(self._hist(cand_h, shift))
            if shift:
                for j in range(n):
                    keep = (cand_h[j] >> shift) == self.prefix[j]
                    cand_h[j], cand_i[j] = cand_h[j][keep], cand_i[j][keep]
        t_hash = self.prefix.clone()
        # t_index: the k-th smallest global index among the entries tied at t_hash
        ties = [cand_i[j][cand_h[j] == t_hash[j]] for j in range(n)]
        self.prefix.zero_()
        for shift in (24, 16, 8, 0):
            if shift < 24:
                for j in range(n):
                    ties[j] = ties[j][(ties[j] >> (shift + _DIGIT_BITS)) == self.prefix[j]]
            self._settle_digit(self._hist(ties, shift))
        return t_hash.tolist(), self.prefix.tolist()


def bernoulli_rule(seed: int, numel: int, density: float) -> torch.Tensor:
    """``[seed, t_hash, -1, numel]``: each entry selected independently with probability ~d."""
    _check_numel(numel)
    t_hash = min(math.floor(density * 2**32), M32)
    return torch.tensor([seed, t_hash, -1, numel], dtype=torch.int64)


def subset_mask(
    rule: torch.Tensor, device: torch.device | str = "cpu", offset: int = 0, count: int | None = None
) -> torch.Tensor:
    """Flat bool mask of the global indices ``[offset, offset + count)`` of a rule (``count``
    defaults to ``numel - offset``: the whole parameter by default). A temporary of 9 bytes
    per element while built."""
    seed, t_hash, t_index, numel = (int(x) for x in rule.tolist())
    count = _local_range(numel, offset, count)
    idx = torch.arange(offset, offset + count, dtype=torch.int64, device=device)
    h = subset_hash(seed, idx)
    return (h < t_hash) | ((h == t_hash) & (idx <= t_index))


def block_starts(mask: torch.Tensor) -> torch.Tensor:
    """Flat index (into ``mask``: local) of the first selected entry of every block of 256
    compact values."""
    return torch.nonzero(mask.flatten()).flatten()[::BLOCK_SIZE].clone()


def subset_size(rule: torch.Tensor) -> int:
    return int(subset_mask(rule).sum())
