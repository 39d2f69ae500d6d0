"""SPAM: spike-aware Adam with momentum reset (Huang et al., arXiv 2501.06842).

Follows docs/algorithms.md §2 (the authors' code) exactly, quirks included; each clean-up the
specification recommends is an explicit keyword.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from .. import functional as F
from .. import sparse_subset as subsets
from ..hyperparams import SPAMSettings, check_subset_seed, settings_constructor
from ..schedules import is_reset_call, spam_clip_active, spam_update_scale, spam_warmup_factor
from . import moments, sharding
from .base import DeviceBatch, SpikeAwareOptimizer

__all__ = ["DEFAULT_SUBSET_SEED", "SUBSET_DRAWS", "BASE_SEED_KEY", "SPAM"]

#: the base seed used when ``subset_seed=None`` (:data:`spam_lowmem.sparse_subset.DEFAULT_SUBSET_SEED`,
#: 0): fixed, so that all ranks of a distributed run agree
DEFAULT_SUBSET_SEED = subsets.DEFAULT_SUBSET_SEED
#: the state key of a sparse parameter counting the subsets it has had, the ``draw`` of its next
#: one (docs/algorithms.md §3)
SUBSET_DRAWS = "subset_draws"
#: the group key holding the base seed of the group's subsets (the ``subset_seed`` argument, or
#: :data:`DEFAULT_SUBSET_SEED`): saved with the param groups, so that a checkpoint alone fixes
#: the subsets a resumed run draws, whatever seed the resuming optimizer was built with
BASE_SEED_KEY = "subset_base_seed"


class _SPAMCall(NamedTuple):
    """The schedules of one SPAM call (docs/algorithms.md §2.3-2.4), the same for every tensor."""

    reset: bool
    warmup: float
    clip: bool


class SPAM(SpikeAwareOptimizer):
    r"""SPAM (Spike-Aware Adam with Momentum reset), arithmetic in the C++/CUDA core.

    For call :math:`n` of a parameter group (:math:`n = 1, 2, \dots`), per tensor:

    .. math::
        &\textbf{if } n \bmod \Delta T = 0: m \gets 0,\ v \gets 0
            \quad\text{(momentum reset; } t \text{ keeps counting)}\\
        &t \gets t + 1\\
        &\textbf{if } n \ge D \textbf{ and } n \bmod \Delta T \ge D:\
            g_i \gets \operatorname{sign}(g_i)\sqrt{\theta v_i}
            \text{ where } g_i^2 > \theta v_i \quad\text{(spike clipping, } v \text{ of the previous step)}\\
        &m \gets \beta_1 m + (1-\beta_1) g,\quad v \gets \beta_2 v + (1-\beta_2) g^2\\
        &p \gets p - \eta\, s(n)\, \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m}{\sqrt{v}+\epsilon}\\
        &p \gets p - \eta\lambda p

    with the post-reset cosine warmup :math:`s(n) = 1 - 0.99\cdot\tfrac12(1+\cos(\pi j/(N+1)))`
    for :math:`j = n \bmod \Delta T < N` after the first reset, else 1 (paper Alg. 1, eqs. 2-4).

    Args:
        params: parameters or param-group dicts; every keyword below is also a group key.
        lr: learning rate :math:`\eta` (LR schedulers act on it). Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`. Default (0.9, 0.999).
        eps: added to :math:`\sqrt{v}` *before* bias correction (HF-AdamW style). Default 1e-6.
        weight_decay: :math:`\lambda`, applied after the update with the group lr, not scaled
            by :math:`s`. Default 0.
        threshold: spike threshold :math:`\theta`. Default 5000.
        reset_interval: momentum-reset period :math:`\Delta T` in calls; 0 never resets. Default 500.
        warmup_steps: post-reset warmup length :math:`N`. Default 150 (the paper's value).
        clip_delay: :math:`D`, calls without clipping at the start and after each reset. Default 20.
        spike_clipping: set False to turn clipping off (then ``threshold`` is unused).
        reset_bias_correction: clean-up option. False (default, as implemented): the
            bias-correction count :math:`t` keeps counting through resets, which inflates
            steps for hundreds of calls after each reset (docs/algorithms.md §2.6a). True:
            :math:`t` restarts at each reset, like a fresh Adam.
        nonfinite: ``"skip"`` (default): a NaN/Inf gradient entry leaves its parameter and
            moments untouched this step and is counted in :meth:`spike_stats` (``nonfinite``);
            ``"propagate"``: plain arithmetic, as the authors' code (NaN reaches the state).
        state_bits: 32 (default): moments in the parameter dtype. 8: blockwise 8-bit moments
            (256-element blocks, fp32 absmax, dynamic maps; :mod:`spam_lowmem.qmap`),
            dequantised, updated and requantised in the same fused pass; the spike test reads
            the dequantised previous v.
        min_8bit_size: parameters with fewer elements keep 32-bit moments under
            ``state_bits=8`` (listed by :meth:`memory_report`). Default 4096.
        density: sparse momentum (docs/algorithms.md §3), a group key in (0, 1]; 1 (default) is
            the dense optimizer. With d < 1 every parameter of the group must be 2-D and
            keeps moments only for a random subset of its entries: exactly floor(d·numel)
            entries at first, then at every momentum reset (on the reset call) a fresh subset
            where each entry is selected independently with probability d; all moments
            restart at each change. Unselected entries are frozen (zero update). The subset
            is a hash rule, not stored indices (:mod:`spam_lowmem.sparse_subset`); see
            :func:`spam_lowmem.sparse_param_groups` and
            :func:`spam_lowmem.density_for_galore_rank`. CPU and CUDA.
        sparse_weight_decay: False (default, as implemented by the authors): weight decay is
            a no-op in a sparse group. True (clean-up): selected entries get ``p -= lr*wd*p``
            after their update; unselected entries still get nothing.
        subset_seed: base seed of the subsets, an int in [0, 2**64): subset number ``n`` (0 the
            initial one, then one per reset) of the parameter at position ``i`` (flattened over
            the param groups) hashes with the seed
            :func:`spam_lowmem.sparse_subset.subset_seed` ``(subset_seed, i, n)``, a pure
            function, so a resumed run draws the same next subsets and no generator state
            needs saving (``n`` is saved in the state, the base seed in every param group as
            ``subset_base_seed``, which a loaded state dict brings along). None (default): the fixed
            :data:`DEFAULT_SUBSET_SEED` (0), not a random draw, so that every process of a
            distributed run (DDP ranks, which each step their own replica) selects the same
            subsets without communicating; pass distinct seeds to vary the subsets between runs.

    Notes:
        * ``p.grad`` is not modified (the authors write the clipped values into it; nothing
          downstream of ``step()`` reads them).
        * State per parameter: ``step`` (int) and the moments: ``exp_avg``, ``exp_avg_sq`` in
          the parameter dtype (torch's convention; bf16 parameters keep bf16 moments, the
          papers' "pure BF16" setting), 2 x parameter bytes; or with ``state_bits=8``
          ``exp_avg_codes``/``exp_avg_sq_codes`` (uint8, the parameter's shape) and
          ``*_absmax`` (fp32 per block of 256; blocks restart at each row of a matrix, absmax
          ``[rows, ceil(row_len/256)]``, :mod:`spam_lowmem.optim.moments`), about 2 + 8/256
          bytes per element. Each group keeps its call count in
          ``group["calls"]``, so schedules survive ``state_dict()``/``load_state_dict()``.
        * Sparse groups (d < 1): the moments are compact 1-D arrays of the K selected entries
          in flat-index order (K values in the parameter dtype, or K codes + ceil(K/256)
          absmax), plus ``subset`` (int64 ``[seed, t_hash, t_index, numel]``) and
          ``compact_block_starts`` (int64, ceil(K/256)). Drawing a subset builds full-size
          temporaries (int64 hashes, a bool mask) once per ``reset_interval`` calls; the step
          itself allocates nothing full-size. ``subset_draws`` (int) counts the subsets the
          parameter has had (the draw number of its next one). A ``"subset_generator"`` entry
          of state dicts saved by earlier versions is ignored on load.
    """

    KIND = "SPAM"
    SETTINGS = SPAMSettings
    __init__ = settings_constructor(SPAMSettings)

    def _configure(self, settings: SPAMSettings) -> None:  # type: ignore[override]
        self._subset_seed = check_subset_seed(settings.subset_seed)  # before the first step needs it
        self._pending_rules: dict[int, torch.Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        base = DEFAULT_SUBSET_SEED if self._subset_seed is None else self._subset_seed
        self.param_groups[-1].setdefault(BASE_SEED_KEY, base)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if BASE_SEED_KEY in group and check_subset_seed(group[BASE_SEED_KEY]) is None:
            raise ValueError(f"Invalid {BASE_SEED_KEY}: None (expected an int in [0, 2**64))")
        if group.get("density", 1.0) < 1.0:
            for p in group["params"]:
                if p.device.type not in ("cpu", "cuda"):
                    raise NotImplementedError(
                        f"spam_lowmem: sparse momentum (density < 1) has no kernel "
                        f"for device '{p.device}'; use density=1.0 there"
                    )

    # ------------------------------------------------------------------ sparse momentum
    @staticmethod
    def _is_sparse(group: dict[str, Any]) -> bool:
        return group.get("density", 1.0) < 1.0

    # Seams for a distributed layer (FSDP2 shards dim 0 of a parameter across ranks): the two
    # hooks below say where a parameter's tensor lies in the whole parameter and how the ranks
    # sum counts. Subsets are defined on the whole parameter's flat indices (docs/algorithms.md
    # §13.3), so each rank's shard steps exactly the entries the unsharded optimizer would.
    def _shard_geometry(self, p: torch.Tensor) -> tuple[int, int, int]:
        """``(global_numel, offset, local_numel)`` of the tensor ``p`` the optimizer steps: the
        element count of the whole parameter, the global flat index of ``p``'s element 0, and
        ``p``'s own element count (``offset + local_numel <= global_numel``). Default (one
        process): ``p`` is the whole parameter. A sharded parameter (the rows ``[row0, row0 +
        r)`` of dim 0) returns ``(full.numel(), row0 * row_numel, p.numel())``."""
        info = sharding.shard_info(p)
        if info is not None:  # a DTensor: its local rows within the whole parameter
            return info.global_numel, info.flat_offset, info.local_rows * info.row_numel
        n = p.numel()
        return n, 0, n

    def _subset_reduce_sum(self, group: dict[str, Any]) -> Callable[[torch.Tensor], None] | None:
        """How the ranks that share ``group``'s parameters sum an int64 tensor in place (e.g.
        ``torch.distributed.all_reduce`` over the shard group), used to draw the exact initial
        subsets of sharded parameters from local hashes only
        (:func:`spam_lowmem.sparse_subset.exact_rules`; every rank then calls it the same
        number of times with the same shapes). None when no parameter of the group is sharded:
        each parameter's subset is found from the hashes of all its elements, in this process.

        The search sums the counts of all the group's new parameters at once, so a group must
        be sharded as a whole (FSDP2 shards every parameter of a module over one mesh):
        NotImplementedError for a group that mixes sharded and unsharded parameters or two
        process groups."""
        infos = [sharding.shard_info(p) for p in group["params"]]
        shard_groups = {info.group() for info in infos if info is not None and info.sharded}
        if not shard_groups:
            return None
        if len(shard_groups) > 1 or any(info is None or not info.sharded for info in infos):
            raise NotImplementedError(
                "spam_lowmem: a sparse-momentum group (density < 1) mixes parameters sharded over "
                "different process groups, or sharded and unsharded ones; put them in separate "
                "param groups"
            )
        shard_group = shard_groups.pop()
        return lambda counts: torch.distributed.all_reduce(counts, group=shard_group)

    def _param_indices(self) -> dict[int, int]:
        """``id(p)`` -> the parameter's position flattened over ``param_groups`` in order (the
        ``param_index`` of its subset seeds)."""
        out: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                out[id(p)] = len(out)
        return out

    def _subset_seed_for(self, group: dict[str, Any], param_index: int, draw: int) -> int:
        """The hash seed of subset ``draw`` of the parameter at ``param_index`` (§3, §13.3)."""
        base = group.get(BASE_SEED_KEY)
        if base is None:  # a group pickled before the key existed
            base = DEFAULT_SUBSET_SEED if self._subset_seed is None else self._subset_seed
        return subsets.subset_seed(base, param_index, draw)

    @staticmethod
    def _draws_since_call_one(group: dict[str, Any]) -> int:
        """The subsets a parameter stepped since call 1 has had after ``group["calls"]`` calls:
        the count assumed for a state saved before ``subset_draws`` was recorded."""
        interval = group["reset_interval"]
        return 1 + (group["calls"] // interval if interval > 0 else 0)

    def _exact_rules(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The initial subsets (draw 0, exactly floor(d * numel) entries) of ``params``, drawn
        together: when sharded, one search whose few sums cover all of them."""
        indices = self._param_indices()
        seeds = [self._subset_seed_for(group, indices[id(p)], 0) for p in params]
        geometry = [self._shard_geometry(p) for p in params]
        density = group["density"]
        reduce_sum = self._subset_reduce_sum(group)
        if reduce_sum is None:
            return [subsets.exact_rule(seed, g[0], density, p.device) for p, seed, g in zip(params, seeds, geometry)]
        return subsets.exact_rules(
            seeds,
            [g[0] for g in geometry],
            density,
            params[0].device,
            offsets=[g[1] for g in geometry],
            counts=[g[2] for g in geometry],
            reduce_sum=reduce_sum,
        )

    def _gather(self, group: dict[str, Any]) -> dict[torch.device, DeviceBatch]:
        # A sparse group draws the initial subsets of the parameters this call initialises in
        # one batch before gathering (_init_state takes them), so that a sharded group costs one
        # search, not one per parameter.
        if self._is_sparse(group):
            fresh = [p for p in group["params"] if p.grad is not None and not self.state.get(p)]
            if fresh:
                self._pending_rules = dict(zip((id(p) for p in fresh), self._exact_rules(group, fresh)))
        try:
            return super()._gather(group)
        finally:
            self._pending_rules = {}

    # ------------------------------------------------------------------ copy / pickle
    def _extra_state_keys(self) -> tuple[str, ...]:
        # "subset_generator": written by versions that drew seeds from a generator; ignored
        return ("_subset_seed", "subset_generator")

    def _extra_getstate(self) -> dict[str, Any]:
        return {"_subset_seed": self._subset_seed}

    def _extra_setstate(self, extra: dict[str, Any]) -> None:
        if "_subset_seed" in extra:
            self._subset_seed = extra["_subset_seed"]
        for attr, value in (("_subset_seed", None), ("_pending_rules", {})):
            if not hasattr(self, attr):
                setattr(self, attr, value)

    def _set_subset(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], rule: torch.Tensor) -> None:
        """Install a subset rule (drawn for the whole parameter): block starts of ``p``'s own
        range and zero compact moments (full-size temporaries of ``p``'s size)."""
        numel, offset, count = self._shard_geometry(p)
        info = sharding.shard_info(p)
        if info is not None and info.sharded and moments.wants_8bit(p, group, numel):
            raise NotImplementedError(
                "spam_lowmem: sparse momentum with 8-bit moments on a sharded parameter: the 8-bit "
                "blocks of its compact values would depend on where the shard starts, so results "
                "and checkpoints would depend on the world size. Use state_bits=32 for the sparse "
                "group under FSDP (or min_8bit_size above its parameters' sizes)"
            )
        mask = subsets.subset_mask(rule, p.device, offset=offset, count=count)
        state["subset"] = rule.to(p.device)
        state["compact_block_starts"] = subsets.block_starts(mask)
        # the whole parameter's size decides the precision, so every shard of it decides alike
        moments.init_compact_moments(p, state, int(mask.sum()), moments.wants_8bit(p, group, numel))

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not self._is_sparse(group):
            super()._init_state(p, state, group)
            return
        state["step"] = 0
        rule = self._pending_rules.pop(id(p), None)
        if rule is None:
            rule = self._exact_rules(group, [p])[0]
        self._set_subset(p, state, group, rule)
        state[SUBSET_DRAWS] = 1

    def _regenerate(self, group: dict[str, Any]) -> None:
        """A fresh Bernoulli(d) subset for every initialised parameter (on the reset call)."""
        indices: dict[int, int] | None = None
        for p in group["params"]:
            state = self.state.get(p)
            if state:
                indices = self._param_indices() if indices is None else indices
                draw = state.get(SUBSET_DRAWS, self._draws_since_call_one(group))
                seed = self._subset_seed_for(group, indices[id(p)], draw)
                rule = subsets.bernoulli_rule(seed, self._shard_geometry(p)[0], group["density"])
                self._set_subset(p, state, group, rule)
                state[SUBSET_DRAWS] = draw + 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`SpikeAwareOptimizer.load_state_dict`; the saved groups' base seed
        (``subset_base_seed``) replaces this optimizer's, as every other group value does. A
        ``"subset_generator"`` entry (state dicts saved when subset seeds came from a generator)
        is ignored: seeds are now derived (docs/algorithms.md §3); such a state dict keeps this
        optimizer's base seed, and a sparse state without ``subset_draws`` continues as if its
        parameter had been stepped since call 1."""
        state_dict = dict(state_dict)
        state_dict.pop("subset_generator", None)
        state_dict["state"] = self._compacted(state_dict)
        super().load_state_dict(state_dict)
        base = DEFAULT_SUBSET_SEED if self._subset_seed is None else self._subset_seed
        for group in self.param_groups:  # groups saved before the base seed was recorded
            group.setdefault(BASE_SEED_KEY, base)

    # ------------------------------------------------------------------ sparse state of DTensors
    # A DTensor parameter's compact moments differ between ranks (each holds its rows' selected
    # entries) and their lengths depend on the split, so DCP can neither save them as plain
    # tensors (it would treat them as replicated and keep rank 0's) nor reshard them. state_dict()
    # therefore gives them expanded: DTensors of the parameter's shape and placements, zero where
    # unselected; load_state_dict() compacts any expanded (or whole-parameter compact) moments for
    # this rank's rows again. The subset rule and the draw count are the same on every rank.
    def state_dict(self) -> dict[str, Any]:
        """As :meth:`torch.optim.Optimizer.state_dict`; the sparse moments of DTensor parameters
        are expanded to DTensors (see above) so that DCP saves and reshards them."""
        sd = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, st in list(sd["state"].items()):
            p = params[pid]
            if "subset" in st and sharding.is_dtensor(p) and not moments.is_quantized(st):
                sd["state"][pid] = self._expanded(p, st)
        return sd

    def _local_mask(self, p: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        _, offset, count = self._shard_geometry(p)
        return subsets.subset_mask(rule.cpu(), offset=offset, count=count).to(p.device)

    def _expanded(self, p: torch.Tensor, st: dict[str, Any]) -> dict[str, Any]:
        info = sharding.shard_info(p)
        mask = self._local_mask(p, st["subset"])
        out = {k: v for k, v in st.items() if k != "compact_block_starts"}  # per rank, recomputed on load
        local_shape = sharding.local_tensor(p).shape
        for key in moments.DENSE_KEYS:
            dense = torch.zeros(local_shape, dtype=st[key].dtype, device=p.device)
            dense.view(-1)[mask] = st[key]
            out[key] = sharding.distribute_like(dense, info)
        return out

    def _compacted(self, state_dict: dict[str, Any]) -> dict[Any, Any]:
        """The saved states with expanded sparse moments (``state_dict()`` of DTensor parameters,
        or a full-size copy of one) compacted for this optimizer's parameters; a whole-parameter
        compact state loaded into a sharded parameter is cut to its rows. Others unchanged."""
        params = [p for group in self.param_groups for p in group["params"]]
        ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        where = dict(zip(ids, params))
        out = {}
        for pid, saved in state_dict["state"].items():
            p = where.get(pid)
            rule = saved.get("subset") if isinstance(saved, dict) else None
            value = saved.get("exp_avg") if isinstance(saved, dict) else None
            if p is None or not isinstance(rule, torch.Tensor) or not isinstance(value, torch.Tensor):
                out[pid] = saved
                continue
            expanded = tuple(value.shape) == tuple(p.shape) and value.dim() == 2
            whole = sharding.shard_info(p) is not None and value.dim() == 1 and self._shard_geometry(p)[2] != p.numel()
            if not (expanded or whole) or rule.numel() != 4:
                out[pid] = saved
                continue
            out[pid] = self._compact_for(p, saved, rule, expanded)
        return out

    def _compact_for(
        self, p: torch.Tensor, saved: dict[str, Any], rule: torch.Tensor, expanded: bool
    ) -> dict[str, Any]:
        info = sharding.shard_info(p)
        mask = self._local_mask(p, rule)
        new = dict(saved)
        for key in moments.DENSE_KEYS:
            value = saved[key]
            if sharding.is_dtensor(value):
                value = value.redistribute(info.mesh, info.placements).to_local() if info else value.full_tensor()
            elif not expanded:  # compact over the whole parameter: place it, then take the rows
                full_mask = subsets.subset_mask(rule.cpu()).to(value.device)
                dense = torch.zeros(p.shape, dtype=value.dtype, device=value.device)
                dense.view(-1)[full_mask] = value
                value = dense
            if info is not None and tuple(value.shape) == tuple(p.shape):  # a full-size tensor
                value = value[info.row_offset : info.row_offset + info.local_rows]
            new[key] = value.reshape(-1).to(p.device)[mask].contiguous()
        new["compact_block_starts"] = subsets.block_starts(mask)
        return new

    def _check_loaded_state(self, p: torch.Tensor, saved: dict[str, Any], group: dict[str, Any], where: str) -> None:
        # Sparse momentum is structural: the state must match both the group here and the saved
        # group (whose hyper-parameters replace these on load), so loading never switches it.
        keys = moments.QUANT_KEYS if moments.is_quantized(saved) else moments.DENSE_KEYS
        for g, which in ((self._group_of(p), "here"), (group, "in the state dict")):
            if not self._is_sparse(g) and "subset" in saved:
                raise ValueError(
                    f"loaded state for {where} has sparse momentum but its group {which} is dense (density=1)"
                )
            missing = [k for k in ("step", *moments.INDEX_KEYS, *keys) if k not in saved]
            if self._is_sparse(g) and missing:
                raise ValueError(
                    f"loaded state for {where} in a sparse group (density="
                    f"{g['density']} {which}) lacks {missing}: it was not saved by a "
                    "sparse-momentum SPAM"
                )
        if "subset" not in saved:
            super()._check_loaded_state(p, saved, group, where)
            return
        self._check_loaded_tensors(saved, keys, where)
        rule = saved["subset"]
        if not isinstance(rule, torch.Tensor) or rule.dtype != torch.int64 or rule.numel() != 4:
            raise ValueError(f"loaded 'subset' for {where} is not an int64 [seed, t_hash, t_index, numel]")
        seed, t_hash, t_index, numel = (int(x) for x in rule.tolist())
        global_numel, offset, count = self._shard_geometry(p)  # the rule is the whole parameter's
        if numel != global_numel:
            raise ValueError(f"loaded subset was drawn for {numel} elements; {where} has {global_numel}")
        if not (0 <= seed <= subsets.M32 and 0 <= t_hash <= subsets.M32 and -1 <= t_index < max(numel, 1)):
            raise ValueError(
                f"loaded subset {[seed, t_hash, t_index, numel]} for {where} is out of range "
                "(seed and t_hash in [0, 2**32), t_index in [-1, numel))"
            )
        draws = saved.get(SUBSET_DRAWS, 1)  # absent: saved before it was recorded
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
            raise ValueError(
                f"loaded '{SUBSET_DRAWS}' of {where} is {draws!r}; expected an int >= 1 (the subsets drawn so far)"
            )
        if moments.is_quantized(saved):
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                if saved[key].dtype != torch.uint8:
                    raise ValueError(f"loaded '{key}' of {where} has dtype {saved[key].dtype}; expected uint8 codes")
        mask = subsets.subset_mask(rule.cpu(), offset=offset, count=count)  # load-time temporary, p's size
        k = int(mask.sum())
        for key in keys:
            want = (k + 255) // 256 if key in moments.FP32_KEYS else k
            if saved[key].dim() != 1 or saved[key].numel() != want:
                raise ValueError(
                    f"loaded '{key}' has {saved[key].numel()} entries; the subset of "
                    f"{where} selects {k} (so {want} are needed)"
                )
        starts = saved["compact_block_starts"]
        if (
            not isinstance(starts, torch.Tensor)
            or starts.dtype != torch.int64
            or not torch.equal(starts.cpu(), subsets.block_starts(mask))
        ):
            raise ValueError(f"loaded 'compact_block_starts' for {where} do not match its subset")
        self._check_loaded_values(saved, where)

    # ------------------------------------------------------------------ step hooks
    def _group_scalars(self, group: dict[str, Any], call: int) -> _SPAMCall:
        interval = group["reset_interval"]
        return _SPAMCall(
            reset=is_reset_call(call, interval),
            warmup=spam_warmup_factor(call, interval, group["warmup_steps"]),
            clip=group["spike_clipping"] and spam_clip_active(call, interval, group["clip_delay"]),
        )

    def _tensor_scalars(
        self, states: list[dict[str, Any]], group: dict[str, Any], call: _SPAMCall
    ) -> tuple[list[dict[str, int]], dict[str, list[float]]]:
        """Step counts after this call and the update scales (§2.4 step 7)."""
        beta1, beta2 = group["betas"]
        lr, warmup = group["lr"], call.warmup
        restart = call.reset and group["reset_bias_correction"]
        steps = [1 if restart else state["step"] + 1 for state in states]
        return (
            [{"step": step} for step in steps],
            {"update_scales": [spam_update_scale(lr, beta1, beta2, step, warmup) for step in steps]},
        )

    def _core_step(self, batch: DeviceBatch, group: dict[str, Any], call: _SPAMCall, core_kw: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        decay = group["lr"] * group["weight_decay"]
        common = {
            **core_kw,
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "clip_threshold": float(group["threshold"]) if call.clip else 0.0,
            "reset": F.MomentReset.BEFORE_UPDATE if call.reset else F.MomentReset.NONE,
        }
        if not self._is_sparse(group):
            F.spam_step(batch.params, batch.grads, **common, weight_decay_scale=decay)
            return
        # a sparse group never holds packed weights (attach_packed rejects them), so no packed keywords
        F.sparse_spam_step(
            batch.params,
            batch.grads,
            **common,
            block_starts=[st["compact_block_starts"] for st in batch.states],
            subsets=[st["subset"] for st in batch.states],
            weight_decay_scale=decay if group["sparse_weight_decay"] else 0.0,
            offsets=[self._shard_geometry(p)[1] for p in batch.owners],
        )

    @contextmanager
    def _group_transaction(self, group: dict[str, Any], call: _SPAMCall, accepted: list[DeviceBatch]) -> Iterator[None]:
        """A sparse group's reset call replaces subsets, moments and draw counts before the core
        runs: keep what it replaces, so that a step the core rejects leaves every state as it
        was; batches the core already accepted keep their new subsets. Seeds are derived per
        parameter and draw, so no other state is shared between the batches."""
        if not (self._is_sparse(group) and call.reset):
            yield
            return
        # shallow copies: a reset assigns new tensors and counts, it does not write the old ones
        undo = {id(p): dict(self.state[p]) for p in group["params"] if self.state.get(p)}
        try:
            self._regenerate(group)
            yield
        except BaseException:
            done = {id(p) for batch in accepted for p in batch.owners}
            for p in group["params"]:
                if id(p) in undo and id(p) not in done:
                    state = self.state[p]
                    state.clear()
                    state.update(undo[id(p)])
            raise
