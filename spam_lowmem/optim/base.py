"""Shared machinery of the spam_lowmem optimizers (torch.optim conventions).

* validation of parameters and gradients (clear errors, nothing lost);
* gathering the tensors of a group per device into the lists the core steps in one call,
  with an explicit copy-back path for non-contiguous parameters (never a silent copy
  that drops the in-place update);
* spike telemetry counted on the device (no sync in ``step()``);
* packed 4-bit weights (:mod:`spam_lowmem.optim.packed`): parameters registered with
  :meth:`SpikeAwareOptimizer.attach_packed` are stepped on their packed codes by the fused
  kernels;
* ``load_state_dict`` that keeps float32 side state float32 for bf16/fp16 parameters
  (torch's loader would cast it to the parameter dtype, docs/design.md T6), checks that the state
  was saved by the same optimizer kind, and checks shapes and values before changing anything;
* a step that the core rejects leaves every state as it was (counts are advanced only after
  the core call returned);
* ``copy.deepcopy``, ``pickle`` and ``torch.save(optimizer)`` round trips (see
  :meth:`SpikeAwareOptimizer.__getstate__`).

Parameters are plain ``torch.Tensor``/``torch.nn.Parameter`` or DTensors placed ``Shard(0)`` /
``Replicate()`` (FSDP2, :mod:`spam_lowmem.optim.sharding`): the core steps the local shard in the
same one call per group, the state is DTensor with the parameter's mesh and placements (so that
``torch.distributed.checkpoint`` reshards it), and the few statistics that span a tensor are
reduced across its shards. Other tensor subclasses (``__torch_dispatch__`` wrappers) are rejected
with a TypeError, because the core writes the raw storage in place and a subclass may have none.

How to add an Adam-family optimizer: describe its arguments once as a frozen dataclass
deriving from :class:`spam_lowmem.hyperparams.Settings` (positional fields first, ``KW_ONLY``
before the keyword-only ones, and a ``check_group`` staticmethod with its validation rules),
then subclass :class:`SpikeAwareOptimizer` with ``KIND`` (the name recorded in its state
dicts), ``SETTINGS`` and ``__init__ = settings_constructor(SETTINGS)``, and write three
hooks of the step template :meth:`SpikeAwareOptimizer._step_group`: ``_group_scalars(group,
call)`` (the schedules of call 1, 2, ...: resets, decays), ``_tensor_scalars(states, group,
call)`` (the counts of each tensor of a device batch after the call and the per-tensor scalar
lists, keyed by the core keyword) and ``_core_step(batch, group, call, core_kw)`` (the one
:mod:`spam_lowmem.functional` call). A kind whose step is one of the core's element
algorithms (``cpp/spam/algorithms.h``, docs/design.md §6) names it in ``ALGORITHM`` and
writes ``_element_hyper(group, call)`` (the call's constants by name) instead of
``_core_step``. State beyond ``step`` and the moments goes in ``_init_extra_state`` and is
declared in ``_required_state_keys`` / ``_count_state_keys`` / ``_fp32_state_keys`` for the
load checks; state a call replaces before the core runs belongs in ``_group_transaction``,
which must restore it when the core raises. Gathering, commit-after-success, packed weights,
telemetry, copies and state-dict checks then come from this class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

from .. import _backend
from ..functional import element_algorithms, element_step
from ..hyperparams import Settings, check_count
from . import moments, sharding, state_checks, telemetry
from . import packed as packed_policy
from .params import DeviceBatch, check_plain_tensor, split_named

__all__ = ["DeviceBatch", "SpikeAwareOptimizer"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: param-group key recording which optimizer kind wrote the group (checked on load)
KIND_KEY = "optimizer_kind"
#: group keys that are bookkeeping, not hyper-parameters
_BOOKKEEPING_KEYS = frozenset({"params", "param_names", "calls", "layout_version", KIND_KEY, "differentiable"})


@cache
def _element_scalar_names(algorithm: str) -> tuple[str, ...]:
    """The per-tensor list keywords of a core element algorithm."""
    algorithms = element_algorithms()
    if algorithm not in algorithms:
        raise ValueError(f"spam_lowmem: the core has no element algorithm {algorithm!r} (known: {sorted(algorithms)})")
    return tuple(algorithms[algorithm]["scalars"])


def _kinds() -> dict[str, frozenset[str]]:
    """The hyper-parameter keys of every optimizer kind defined on this base."""
    found: dict[str, frozenset[str]] = {}
    todo = list(SpikeAwareOptimizer.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.KIND:
            found.setdefault(cls.KIND, cls.HYPERPARAMETERS)
    return found


class SpikeAwareOptimizer(torch.optim.Optimizer):
    """Base class: subclasses give ``KIND``, ``SETTINGS`` and the step hooks (module docstring).

    Every group also carries ``state_bits`` (32: moments in the parameter dtype; 8: blockwise
    8-bit moments, :mod:`spam_lowmem.optim.moments`) and ``min_8bit_size``.
    """

    #: state entries besides the moments that stay float32 whatever the parameter dtype
    _fp32_state_keys: tuple[str, ...] = ()
    #: state entries besides the moments every initialised parameter must have (checked on load)
    _required_state_keys: tuple[str, ...] = ("step",)
    #: int state entries (counts) besides ``step``: non-negative ints, checked on load
    _count_state_keys: tuple[str, ...] = ("step",)
    #: version of the state layout written by state_dict(); a mismatch on load is an error
    LAYOUT_VERSION = 1
    #: the optimizer kind written into every param group (``KIND_KEY``); a state dict of another
    #: kind is rejected on load. Subclasses of SPAM/StableSPAM/AdamW inherit their parent's kind.
    KIND = ""
    #: the core element algorithm (``cpp/spam/algorithms.h``; ``functional.element_algorithms()``)
    #: a kind steps through the default :meth:`_core_step`; empty for a kind with its own call
    ALGORITHM = ""
    #: the kind's hyper-parameters (:mod:`spam_lowmem.hyperparams`): constructor arguments,
    #: defaults and the rules a group obeys; a kind's ``__init__`` is
    #: ``settings_constructor(SETTINGS)``
    SETTINGS: type[Settings]
    #: the hyper-parameter keys of the kind's groups (its ``defaults``), from ``SETTINGS``
    HYPERPARAMETERS: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "SETTINGS" in cls.__dict__:
            cls.HYPERPARAMETERS = cls.SETTINGS.group_keys()

    def _setup(self, params: Iterable[Any], settings: Settings) -> None:
        """What ``__init__`` does once the arguments are bound: the subclass hook
        :meth:`_configure`, then torch's constructor with the group defaults."""
        self._configure(settings)
        self._init_runtime()
        super().__init__(params, settings.group_defaults())

    def _configure(self, settings: Settings) -> None:
        """Subclass hook: keep the settings that configure the optimizer, not a group."""

    def _init_runtime(self) -> None:
        """Attributes that are not part of torch's optimizer state (telemetry counters, packed
        attachments). Only missing ones are set, because torch's ``load_state_dict`` also goes
        through ``__setstate__`` and must keep them."""
        if not hasattr(self, "_telemetry"):
            self._telemetry: dict[tuple[int, torch.device, Any], torch.Tensor] = {}
        if not hasattr(self, "_packed"):
            self._packed = packed_policy.PackedAttachments()

    # ------------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy``, ``pickle`` and ``torch.save(optimizer)`` keep: torch's
        defaults, state and param groups, plus :meth:`_extra_getstate` (e.g. SPAM's subset
        generator), so that the copy steps exactly like the original.

        The spike telemetry is not copied: the copy's :meth:`spike_stats` counts from zero.
        Packed 4-bit attachments (:meth:`attach_packed`) refer to live layers whose codes the
        step rewrites; a copy cannot keep them correctly, so copying an optimizer with any
        attached raises RuntimeError (detach them first, and attach the copy's own)."""
        if self._packed:
            raise RuntimeError(
                f"spam_lowmem: cannot copy or pickle a {type(self).__name__} with "
                f"{len(self._packed)} packed 4-bit weight(s) attached (attach_packed): "
                "the attachment points at live layers. Save state_dict() instead, or "
                "detach_packed() them before copying and attach the copy's own"
            )
        return {**super().__getstate__(), **self._extra_getstate()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        extra = {key: state.pop(key) for key in self._extra_state_keys() if key in state}
        super().__setstate__(state)
        self._init_runtime()
        self._extra_setstate(extra)

    def _extra_state_keys(self) -> tuple[str, ...]:
        """Keys :meth:`_extra_getstate` may add to the pickled state."""
        return ()

    def _extra_getstate(self) -> dict[str, Any]:
        """Subclass hook: picklable attributes a copy needs beyond torch's state."""
        return {}

    def _extra_setstate(self, extra: dict[str, Any]) -> None:
        """Subclass hook: restore what :meth:`_extra_getstate` saved (empty on a load)."""

    # ------------------------------------------------------------------ packed 4-bit weights
    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("spam_lowmem: the parameter is not in this optimizer")

    def attach_packed(self, p: torch.Tensor, source: packed_policy.PackedSource) -> None:
        """Step ``p`` through the fused packed 4-bit kernels: ``p`` is the (placeholder) weight
        Parameter of ``source`` (a packed :class:`~spam_lowmem.nn.QuantLinear`), whose codes are
        updated and re-quantised in place by :meth:`step`; ``p``'s data is never read. Usually
        called by :func:`spam_lowmem.nn.attach_packed_requant`. Raises NotImplementedError for
        groups the fused step does not support (:mod:`spam_lowmem.optim.packed`)."""
        if sharding.is_dtensor(p):
            raise NotImplementedError("spam_lowmem: packed 4-bit weights cannot be DTensors (sharded)")
        self._packed.attach(p, self._group_of(p), source)

    def detach_packed(self, p: torch.Tensor) -> None:
        """Undo :meth:`attach_packed` (a no-op for a parameter that is not attached)."""
        self._packed.detach(p)

    def is_packed(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is stepped through the fused packed kernels."""
        return self._packed.is_attached(p)

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as ``torch.optim.Optimizer.add_param_group``: ``params`` may be tensors or
        ``(name, tensor)`` tuples (``model.named_parameters()``), whose names are kept in
        ``group["param_names"]``. Everything is validated before the group is appended, so a
        rejected group leaves the optimizer exactly as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {torch.typename(param_group)}")
        params, names = split_named(param_group["params"])
        for p in params:
            self._check_param(p)
        merged = {**self.defaults, **param_group, "params": params}
        self._validate_group(merged)
        group = {**param_group, "params": params}
        if names is not None:
            group["param_names"] = names
        super().add_param_group(group)
        group = self.param_groups[-1]
        group.setdefault("calls", 0)
        group["layout_version"] = self.LAYOUT_VERSION
        group[KIND_KEY] = self.KIND

    @staticmethod
    def _check_param(p: torch.Tensor) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"spam_lowmem optimizers can only optimize Tensors, but one of the params is {torch.typename(p)}"
            )
        check_plain_tensor("a parameter", p)
        if p.is_complex():
            raise ValueError(
                "spam_lowmem optimizers do not support complex parameters "
                "(view them as real with torch.view_as_real first)"
            )
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"spam_lowmem: parameter dtype {p.dtype} is not supported; use float32, bfloat16 or float16"
            )
        if p.is_sparse:
            raise ValueError("spam_lowmem: sparse parameters are not supported")
        _backend.check_device(p.device)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError if the group's values break the kind's rules (``SETTINGS``), and
        NotImplementedError for FSDP1 flat parameters where they would give wrong results."""
        self.SETTINGS.check_group(group)
        for p in group["params"]:
            sharding.check_fsdp1(p, group, self.KIND)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        # the 8-bit decision reads the global size (a DTensor's numel), so every rank agrees
        quantized = moments.wants_8bit(p, group)
        info = sharding.shard_info(p)
        if info is None:
            moments.init_moments(p, state, quantized)
        else:
            moments.init_sharded_moments(p, state, quantized, info)
        self._init_extra_state(p, state)

    def _init_extra_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Subclass hook for state beyond the step count and the moments."""

    # ------------------------------------------------------------------ the step template
    def _step_group(self, group_index: int, group: dict[str, Any]) -> None:
        """One call of one group: the sequence every kind shares, around the kind's hooks.

        Per device: gather the tensors (state created lazily), compute each tensor's next
        counts and scalars (:meth:`_tensor_scalars`), make the one core call
        (:meth:`_core_step`), store the counts only once it returned (:meth:`_committing`),
        then check packed 4-bit results and copy back non-contiguous parameters. The whole
        group runs inside :meth:`_group_transaction`, where a kind changes state before the
        core runs (and undoes it when the core rejects the call)."""
        call = self._group_scalars(group, group["calls"] + 1)
        accepted: list[DeviceBatch] = []
        with self._group_transaction(group, call, accepted):
            for (device, shard_group), batch in self._gather(group).items():
                counts, scalars = self._tensor_scalars(batch.states, group, call)
                packed_kw = self._packed.core_kwargs(group_index, device, batch.packed)
                core_kw = {
                    **batch.moment_args(device),
                    **scalars,
                    "counters": self._counters(group_index, device, shard_group),
                    "skip_nonfinite": group["nonfinite"] == "skip",
                    **packed_kw,
                }
                with self._committing(batch, counts):
                    self._core_step(batch, group, call, core_kw)
                accepted.append(batch)
                self._packed.after_step(group_index, device, packed_kw)
                batch.write_back()

    def _group_scalars(self, group: dict[str, Any], call: int) -> Any:
        """Hook: what the kind's schedules give for call ``call`` (1, 2, ...) of ``group``, the
        same for all its tensors (reset flags, decays, warmup factors); handed to the other
        hooks as ``call``."""
        raise NotImplementedError

    def _tensor_scalars(
        self, states: list[dict[str, Any]], group: dict[str, Any], call: Any
    ) -> tuple[list[dict[str, int]], dict[str, list[float]]]:
        """Hook: for the ``states`` of one device batch (in batch order), the counts each tensor
        will have after this call (stored only once the core accepted the call) and the
        per-tensor scalar lists, keyed by the core step's keyword. One call per batch, not per
        tensor: groups of hundreds of small tensors make per-tensor Python calls the cost."""
        raise NotImplementedError

    def _core_step(self, batch: DeviceBatch, group: dict[str, Any], call: Any, core_kw: dict[str, Any]) -> None:
        """Hook: the one :mod:`spam_lowmem.functional` call for ``batch``: ``batch.params``,
        ``batch.grads``, ``core_kw`` (moments, the per-tensor scalar lists, counters, the NaN
        policy and any packed weights) and the kind's group-wide keywords.

        A kind that names a core element algorithm (``ALGORITHM``) need not write it: the
        call is :func:`spam_lowmem.functional.element_step` with the algorithm's per-tensor
        lists taken from ``core_kw`` and its constants from :meth:`_element_hyper`."""
        if not self.ALGORITHM:
            raise NotImplementedError
        kw = dict(core_kw)
        scalars = {name: kw.pop(name) for name in _element_scalar_names(self.ALGORITHM)}
        element_step(
            self.ALGORITHM, batch.params, batch.grads, **kw, hyper=self._element_hyper(group, call), scalars=scalars
        )

    def _element_hyper(self, group: dict[str, Any], call: Any) -> dict[str, float]:
        """Hook of a kind with an ``ALGORITHM``: the call's constants of that element
        algorithm, keyed by its hyper names (``functional.element_algorithms()``)."""
        raise NotImplementedError

    @contextmanager
    def _group_transaction(self, group: dict[str, Any], call: Any, accepted: list[DeviceBatch]) -> Iterator[None]:
        """Hook around a group's step: state a kind replaces before the core runs (SPAM's
        sparse subsets at a reset) is prepared here and restored if a core call raises;
        ``accepted`` lists the device batches the core has already accepted. Default: nothing."""
        yield

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss.

        Every group's hyper-parameters and gradients are checked before any group is stepped,
        and a group whose core call raises keeps its state as it was (nothing is counted)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._validate_group(group)
            self._check_grads(group)
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group)
            group["calls"] += 1
        return loss

    @staticmethod
    def _check_grads(group: dict[str, Any]) -> None:
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            check_plain_tensor("a parameter", p)  # p.data may have been swapped since construction
            check_plain_tensor("a gradient", grad)
            sharding.check_grad_placements(p, grad)
            if grad.is_sparse:
                raise RuntimeError("spam_lowmem optimizers do not support sparse gradients")
            if grad.dtype != p.dtype or grad.shape != p.shape:
                raise RuntimeError(
                    f"spam_lowmem: gradient {grad.dtype}{tuple(grad.shape)} does not "
                    f"match its parameter {p.dtype}{tuple(p.shape)}"
                )
            if grad.device != p.device:
                raise RuntimeError(f"spam_lowmem: gradient on {grad.device} but its parameter is on {p.device}")

    def _gather(self, group: dict[str, Any]) -> dict[tuple[torch.device, Any], DeviceBatch]:
        """Collect the parameters with gradients, per device and process group over which they
        are sharded (None: not sharded; one core call each, so that a batch's statistics and
        counters are reduced over one group), initialising state lazily (the gradients were
        checked by :meth:`_check_grads`). DTensors enter as their local shards."""
        batches: dict[tuple[torch.device, Any], DeviceBatch] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            packed = self._packed.step_for(p, group)  # checked before any state is created
            info = sharding.shard_info(p)
            state = self.state[p]
            key = (p.device, info.group() if info is not None and info.sharded else None)
            batch = batches.setdefault(key, DeviceBatch())
            if not state:
                self._init_state(p, state, group)
                batch.fresh.append(len(batch.owners))
            batch.packed.append(packed)
            if packed is not None:  # the placeholder is never read: an empty array names the dtype
                batch.params.append(torch.empty(0, dtype=p.dtype, device=p.device))
            else:
                data = sharding.local_tensor(p.detach())
                if not data.is_contiguous():
                    batch.copy_back.append(len(batch.params))
                    data = data.contiguous()
                batch.params.append(data)
            batch.grads.append(sharding.local_tensor(grad.detach()).contiguous())
            batch.owners.append(p)
            batch.states.append(state)
            batch.views.append(sharding.local_view_of_state(state))
            batch.shards.append(info)
        return batches

    @contextmanager
    def _committing(self, batch: DeviceBatch, counts: list[dict[str, int]]) -> Iterator[None]:
        """Around the core step of one device batch: store the batch's new step counts once the
        core has accepted the call. If it raises (a tensor it rejects), the states created by
        this call are dropped and no count moves, so the optimizer is as it was before."""
        try:
            yield
        except BaseException:
            for i in batch.fresh:
                self.state.pop(batch.owners[i], None)
            raise
        for state, new in zip(batch.states, counts):
            state.update(new)

    # ------------------------------------------------------------------ telemetry
    def _counters(self, group_index: int, device: torch.device, shard_group: Any = None) -> torch.Tensor:
        """The clipped/non-finite counters of a group's batch on ``device`` whose tensors are
        sharded over ``shard_group`` (None: not sharded); summed over that group when read."""
        key = (group_index, device, shard_group)
        counters = self._telemetry.get(key)
        if counters is None:
            counters = torch.zeros(2, dtype=torch.int64, device=device)
            self._telemetry[key] = counters
        return counters

    def spike_stats(self) -> dict[str, Any]:
        """Gradient entries clipped as spikes (and non-finite entries seen) since the last call.

        Counted on the device inside ``step()`` without a host sync; reading them here syncs
        once. Returns ``{"clipped": int, "nonfinite": int, "requant_nonfinite_groups": int,
        "nonfinite_state_blocks": int, "nonfinite_state_entries": int, "groups": [{...the same
        keys}]}`` and resets the
        counters; ``requant_nonfinite_groups`` counts packed 4-bit groups whose fused update was
        not finite and which kept their old codes (on CPU such a step also raises).
        ``nonfinite_state_blocks`` is a snapshot, not a count since the last call: the 8-bit
        moment blocks (m and v counted apart) whose absmax is NaN or inf now, so that all their
        entries read back as NaN (or +-inf where the moment itself is infinite). That follows a
        non-finite gradient under ``nonfinite="propagate"``, or a moment that overflowed from a
        finite gradient (g**2 > 3.4e38), which ``nonfinite`` does not count.
        ``nonfinite_state_entries`` is the same snapshot for 32-bit moments (dense, or the
        compact moments of a sparse group): the entries of ``exp_avg`` and ``exp_avg_sq`` (counted
        apart) that are NaN or inf now. Such an entry no longer moves (an infinite v gives a zero
        update) or is NaN, whatever ``nonfinite`` says, so it also follows an overflow. Both
        snapshots are computed here, when the stats are read, never inside ``step()``.

        Under FSDP2 (parameters sharded over a process group) every figure is global: the
        counts of sharded tensors are summed over their process group here, so **every rank
        must call** ``spike_stats()`` at the same point (it runs collectives). Counts of
        replicated tensors (DDP, ``Replicate()``) are this rank's, which equal every other
        rank's.
        """
        return telemetry.read_spike_stats(self.param_groups, self.state, self._telemetry, self._packed.bad_groups)

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; float32 side state stays float32.

        Everything is checked before anything changes, so a rejected state dict leaves the
        optimizer as it was: the optimizer kind that saved it (``KIND_KEY`` in each group; SPAM,
        StableSPAM and AdamW states do not load into one another), the group hyper-parameters
        (present and valid), and per parameter the keys, shapes, dtypes and values of its state
        (counts are ints >= 0; moments, absmax and statistics finite; second moments, absmax and
        statistics >= 0). Raises ValueError naming the group or parameter and the key."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match "
                    f"the size of optimizer's group (group {index}: {len(saved['params'])} "
                    f"saved, {len(group['params'])} here)"
                )
        merged_groups = [
            self._check_loaded_group(index, group, saved)
            for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups))
        ]
        where: dict[Any, tuple[torch.Tensor, dict[str, Any], str]] = {}
        for saved, merged in zip(saved_groups, merged_groups):
            names = saved.get("param_names") or merged.get("param_names") or []
            for i, (pid, p) in enumerate(zip(saved["params"], merged["params"])):
                name = f" '{names[i]}'" if i < len(names) else ""
                where[pid] = (p, merged, f"parameter {pid}{name} of shape {tuple(p.shape)}")
        for pid, saved in state_dict["state"].items():
            if pid not in where:
                raise ValueError(f"loaded state dict has state for unknown parameter id {pid}")
            p, group, label = where[pid]
            if not isinstance(saved, dict):
                raise ValueError(f"loaded state of {label} is a {type(saved).__name__}, not a dict")
            self._check_loaded_state(p, saved, group, label)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("calls", 0)
            group[KIND_KEY] = self.KIND  # state dicts saved before the kind was recorded
        for pid, saved in state_dict["state"].items():
            p = where[pid][0]
            for key, value in saved.items():
                # torch's loader casts every tensor to the parameter dtype, uint8 codes and
                # float32 absmax included (docs/design.md T6): keep what was saved instead.
                keep = key in self._fp32_state_keys or key in moments.FP32_KEYS
                if isinstance(value, torch.Tensor) and (keep or not value.is_floating_point()):
                    self.state[p][key] = value.to(device=p.device, copy=True)
            for key, value in self.state[p].items():  # the core needs contiguous state
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.contiguous()
            moments.conform_loaded_layout(p, self.state[p])  # an old flat 8-bit state: reshaped
            info = sharding.shard_info(p)
            if info is not None:
                moments.shard_loaded_state(p, self.state[p], info)

    def _check_loaded_group(self, index: int, group: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
        """Check a saved param group against this optimizer; return it with this group's params
        (the group as it will be after loading)."""
        here = f"loaded state dict, param group {index}"
        version = saved.get("layout_version")
        if version != self.LAYOUT_VERSION:
            raise ValueError(
                f"{here} has layout version {version!r}; this {type(self).__name__} reads version {self.LAYOUT_VERSION}"
            )
        kind = saved.get(KIND_KEY)
        if kind is not None and kind != self.KIND:
            raise ValueError(
                f"{here} was saved by a {kind} optimizer; this is a {self.KIND}: one "
                "optimizer kind's state cannot be loaded into another (expected "
                f"{KIND_KEY}={self.KIND!r})"
            )
        if kind is None:  # saved before the kind was recorded: tell the kinds apart by their keys
            foreign = set().union(*(keys for name, keys in _kinds().items() if name != self.KIND))
            present = sorted((foreign - self.HYPERPARAMETERS) & set(saved))
            if present:
                raise ValueError(
                    f"{here} has hyper-parameters {present} that a {self.KIND} does not "
                    "have: it was saved by another optimizer kind"
                )
        missing = sorted(self.HYPERPARAMETERS - set(saved))
        if missing:
            raise ValueError(
                f"{here} lacks the {self.KIND} hyper-parameters {missing}: it was not saved by a {self.KIND}"
            )
        merged = {**saved, "params": group["params"]}
        try:
            check_count("calls", merged.get("calls", 0))
            self._validate_group(merged)
        except ValueError as err:
            raise ValueError(f"{here}: {err}") from err
        return merged

    def _check_loaded_state(self, p: torch.Tensor, saved: dict[str, Any], group: dict[str, Any], where: str) -> None:
        """Keys, shapes, dtypes and values of one parameter's saved state (``group`` is its group
        as it will be after loading; ``where`` names the parameter in errors)."""
        shape = tuple(p.shape)
        keys = moments.QUANT_KEYS if moments.is_quantized(saved) else moments.DENSE_KEYS
        missing = [k for k in (*self._required_state_keys, *keys) if k not in saved]
        if missing:
            raise ValueError(f"loaded state for {where} lacks {missing}: it was not saved by {type(self).__name__}")
        self._check_loaded_tensors(saved, (*keys, *self._fp32_state_keys), where)
        if moments.is_quantized(saved):
            problem = moments.loaded_layout_problem(p, saved)
            if problem is not None:
                raise ValueError(f"{problem} ({where})")
        else:
            for key in moments.DENSE_KEYS:
                if tuple(saved[key].shape) != shape:
                    raise ValueError(
                        f"loaded '{key}' has shape {tuple(saved[key].shape)} but the "
                        f"parameter has shape {shape} ({where})"
                    )
        self._check_loaded_values(saved, where)

    @staticmethod
    def _check_loaded_tensors(saved: dict[str, Any], keys: Iterable[str], where: str) -> None:
        """Each key is a tensor, and a float one unless it holds 8-bit codes."""
        state_checks.check_tensors(saved, keys, where)

    def _check_loaded_values(self, saved: dict[str, Any], where: str) -> None:
        """Counts are ints >= 0; moments, absmax and ``_fp32_state_keys`` finite, and those that
        cannot be negative not negative (:func:`state_checks.check_values`)."""
        state_checks.check_values(saved, where, self._count_state_keys, self._fp32_state_keys)

    # ------------------------------------------------------------------ memory
    def memory_report(self) -> dict[str, Any]:
        """Bytes of optimizer state, per parameter and in total, measured from ``self.state``
        (:func:`spam_lowmem.optim.moments.memory_report` lists the fields).

        Under FSDP2 the byte figures are global (the local bytes of sharded parameters summed
        over their process group; every rank must call it, it runs collectives) and
        ``local_total_bytes`` is this rank's share; ``world_size`` is the size of the sharding
        group (1 when nothing is sharded)."""
        return moments.sharded_memory_report(self.param_groups, self.state)
