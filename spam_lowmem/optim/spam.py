"""SPAM: spike-aware Adam with momentum reset (Huang et al., arXiv 2501.06842).

Follows docs/algorithms.md §2 (the authors' code) exactly, quirks included; each clean-up the
specification recommends is an explicit keyword.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from .. import functional as F
from .. import sparse_subset as subsets
from ..hyperparams import SPAMSettings, check_subset_seed, settings_constructor
from ..schedules import is_reset_call, spam_clip_active, spam_update_scale, spam_warmup_factor
from . import moments
from .base import DeviceBatch, SpikeAwareOptimizer

__all__ = ["DEFAULT_SUBSET_SEED", "SPAM"]

#: the subset seed used when ``subset_seed=None``: fixed, so that all ranks of a distributed run
#: agree (a seed drawn from each process's global RNG would differ between ranks, which would then
#: update different entries of their replicas and diverge)
DEFAULT_SUBSET_SEED = 0


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
        subset_seed: seed of the optimizer's own generator that draws the subsets (its state
            is saved by :meth:`state_dict`, so a resumed run draws the same next subset): an
            int in [0, 2**64). None (default): the fixed :data:`DEFAULT_SUBSET_SEED` (0), not a
            random draw, so that every process of a distributed run (DDP ranks, which each step
            their own replica) selects the same subsets without communicating; pass distinct
            seeds to vary the subsets between runs.

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
          itself allocates nothing full-size. The state dict also holds
          ``"subset_generator"`` (uint8 generator state).
    """

    KIND = "SPAM"
    SETTINGS = SPAMSettings
    __init__ = settings_constructor(SPAMSettings)

    def _configure(self, settings: SPAMSettings) -> None:  # type: ignore[override]
        self._subset_seed = check_subset_seed(settings.subset_seed)  # before the first step needs it
        self._subset_gen: torch.Generator | None = None

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
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

    def _generator(self) -> torch.Generator:
        if self._subset_gen is None:
            seed = DEFAULT_SUBSET_SEED if self._subset_seed is None else self._subset_seed
            self._subset_gen = torch.Generator().manual_seed(seed)
        return self._subset_gen

    # ------------------------------------------------------------------ copy / pickle
    def _extra_state_keys(self) -> tuple[str, ...]:
        return ("_subset_seed", "subset_generator")

    def _extra_getstate(self) -> dict[str, Any]:
        # a torch.Generator is not picklable; its state tensor is
        gen = self._subset_gen
        return {"_subset_seed": self._subset_seed, "subset_generator": None if gen is None else gen.get_state()}

    def _extra_setstate(self, extra: dict[str, Any]) -> None:
        if "_subset_seed" in extra:
            self._subset_seed = extra["_subset_seed"]
        if "subset_generator" in extra:
            gen_state = extra["subset_generator"]
            self._subset_gen = None if gen_state is None else self._restored_generator(gen_state)
        for attr, value in (("_subset_seed", None), ("_subset_gen", None)):
            if not hasattr(self, attr):
                setattr(self, attr, value)

    @staticmethod
    def _restored_generator(gen_state: Any) -> torch.Generator:
        if not isinstance(gen_state, torch.Tensor):
            raise ValueError(
                f"loaded 'subset_generator' is a {type(gen_state).__name__}, not the uint8 state "
                "tensor of a torch.Generator"
            )
        gen = torch.Generator()
        try:
            gen.set_state(gen_state.to(dtype=torch.uint8, device="cpu"))
        except RuntimeError as err:
            raise ValueError(f"loaded 'subset_generator' is not a valid generator state: {err}") from err
        return gen

    def _set_subset(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any], rule: torch.Tensor) -> None:
        """Install a subset rule: block starts and zero compact moments (full-size temporaries)."""
        mask = subsets.subset_mask(rule, p.device)
        state["subset"] = rule.to(p.device)
        state["compact_block_starts"] = subsets.block_starts(mask)
        moments.init_compact_moments(p, state, int(mask.sum()), moments.wants_8bit(p, group))

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not self._is_sparse(group):
            super()._init_state(p, state, group)
            return
        state["step"] = 0
        seed = subsets.draw_seed(self._generator())
        self._set_subset(p, state, group, subsets.exact_rule(seed, p.numel(), group["density"], p.device))

    def _regenerate(self, group: dict[str, Any]) -> None:
        """A fresh Bernoulli(d) subset for every initialised parameter (on the reset call)."""
        for p in group["params"]:
            state = self.state.get(p)
            if state:
                seed = subsets.draw_seed(self._generator())
                self._set_subset(p, state, group, subsets.bernoulli_rule(seed, p.numel(), group["density"]))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self._subset_gen is not None:
            sd["subset_generator"] = self._subset_gen.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("subset_generator", None)
        # built (and so checked) before anything is loaded: a bad one must change nothing
        gen = None if gen_state is None else self._restored_generator(gen_state)
        super().load_state_dict(state_dict)
        if gen is not None:
            self._subset_gen = gen

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
        if numel != p.numel():
            raise ValueError(f"loaded subset was drawn for {numel} elements; {where} has {p.numel()}")
        if not (0 <= seed <= subsets.M32 and 0 <= t_hash <= subsets.M32 and -1 <= t_index < max(numel, 1)):
            raise ValueError(
                f"loaded subset {[seed, t_hash, t_index, numel]} for {where} is out of range "
                "(seed and t_hash in [0, 2**32), t_index in [-1, numel))"
            )
        if moments.is_quantized(saved):
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                if saved[key].dtype != torch.uint8:
                    raise ValueError(f"loaded '{key}' of {where} has dtype {saved[key].dtype}; expected uint8 codes")
        mask = subsets.subset_mask(rule.cpu())  # load-time full-size temporary
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
        )

    @contextmanager
    def _group_transaction(self, group: dict[str, Any], call: _SPAMCall, accepted: list[DeviceBatch]) -> Iterator[None]:
        """A sparse group's reset call replaces subsets and moments before the core runs: keep
        what it replaces, so that a step the core rejects leaves every state (and the
        generator) as it was; batches the core already accepted keep their new subsets."""
        if not (self._is_sparse(group) and call.reset):
            yield
            return
        undo = self._subset_snapshot(group)
        try:
            self._regenerate(group)
            yield
        except BaseException:
            self._restore_subsets(group, undo, {id(p) for batch in accepted for p in batch.owners})
            raise

    def _subset_snapshot(self, group: dict[str, Any]) -> tuple[dict[int, dict[str, Any]], torch.Tensor | None]:
        """Shallow copies of the group's states (a reset assigns new tensors, it does not write
        the old ones) and the generator state."""
        states = {id(p): dict(self.state[p]) for p in group["params"] if self.state.get(p)}
        gen = None if self._subset_gen is None else self._subset_gen.get_state()
        return states, gen

    def _restore_subsets(
        self, group: dict[str, Any], undo: tuple[dict[int, dict[str, Any]], torch.Tensor | None], done: set[int]
    ) -> None:
        states, gen = undo
        for p in group["params"]:
            if id(p) in states and id(p) not in done:
                state = self.state[p]
                state.clear()
                state.update(states[id(p)])
        if not done:  # batches that completed drew from the generator; their draws stand
            if gen is None:
                self._subset_gen = None
            else:
                self._generator().set_state(gen)
