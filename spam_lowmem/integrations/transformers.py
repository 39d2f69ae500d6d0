"""Hugging Face ``transformers.Trainer`` integration: spike telemetry in the Trainer's logs.

    from spam_lowmem.integrations.transformers import SpikeStatsCallback, build_optimizer

    opt = build_optimizer(model, "spam", budget="25%", lr=1e-3)
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, None), callbacks=[SpikeStatsCallback()])

This is the only module of spam_lowmem that imports transformers (``import spam_lowmem``
does not); :func:`build_optimizer` itself lives in :mod:`spam_lowmem.integrations.presets`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import DefaultFlowCallback, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from ..optim.base import SpikeAwareOptimizer
from .presets import build_optimizer, split_weight_decay

__all__ = ["SpikeStatsCallback", "build_optimizer", "split_weight_decay", "unwrap_optimizer"]

_log = logging.getLogger(__name__)

#: spike_stats() figures counted since the previous read: summed over the reads between two logs
COUNT_KEYS = ("clipped", "nonfinite", "requant_nonfinite_groups")
#: spike_stats() figures that describe the state now: the latest read is logged
SNAPSHOT_KEYS = ("nonfinite_state_blocks", "nonfinite_state_entries")
#: per-rank byte keys are written for world sizes up to this (max and min always)
MAX_RANK_KEYS = 8


def unwrap_optimizer(optimizer: Any) -> SpikeAwareOptimizer | None:
    """The spam_lowmem optimizer inside ``optimizer`` (the Trainer holds accelerate's
    ``AcceleratedOptimizer``, which keeps ours as ``.optimizer``), or None if there is none."""
    for _ in range(8):  # wrappers nest a few levels at most; a cycle must not loop forever
        if isinstance(optimizer, SpikeAwareOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _per_rank(local_bytes: int) -> list[int]:
    """Every rank's ``local_total_bytes`` (a collective: every rank calls it)."""
    gathered: list[Any] = [None] * _world()
    torch.distributed.all_gather_object(gathered, local_bytes)
    return [int(b) for b in gathered]


def _is_logging_step(args: TrainingArguments, state: TrainerState, control: TrainerControl) -> bool:
    """Whether the Trainer logs after this step: ``control.should_log`` once DefaultFlowCallback
    has run, and its rule, repeated here, for a callback placed before it."""
    if control.should_log or (args.logging_first_step and state.global_step == 1):
        return True
    every = state.logging_steps
    return args.logging_strategy == IntervalStrategy.STEPS and bool(every) and state.global_step % every == 0


def _is_training_log(logs: dict[str, Any]) -> bool:
    """The Trainer's periodic training log (``loss``) or its end-of-training summary
    (``train_runtime``), not an evaluation or prediction log."""
    return "loss" in logs or "train_runtime" in logs


class SpikeStatsCallback(TrainerCallback):
    """Adds the optimizer's spike statistics and state bytes to every training log.

    Keys (``prefix`` ``"spam/"``): ``clipped``, ``nonfinite`` and ``requant_nonfinite_groups``
    count gradient entries (4-bit groups) since the previous training log;
    ``nonfinite_state_blocks`` / ``nonfinite_state_entries`` are the snapshot of
    :meth:`spam_lowmem.SPAM.spike_stats`; ``state_bytes`` is ``memory_report()["total_bytes"]``
    (global under FSDP2). Under torch.distributed with more than one rank, also
    ``state_bytes_rank_max`` / ``state_bytes_rank_min`` and, up to 8 ranks,
    ``state_bytes_rank{r}``: each rank's ``local_total_bytes``.

    ``spike_stats()`` and ``memory_report()`` run collectives under FSDP2, so they are read
    where every rank is at the same point: at ``on_step_end`` of a logging step and at
    ``on_epoch_end``, never in ``on_log`` (which a caller may run on one rank). The figures
    are kept until the next training log and added to it (and to ``state.log_history``) on
    the main process; evaluation logs are left alone. Reading the counters syncs the device
    once per logging step, not per step.

    ``optimizer``: the optimizer to read; by default the one the Trainer uses (its
    accelerate wrapper is unwrapped). With any other optimizer the callback logs nothing.

    Callbacks given as ``Trainer(callbacks=[...])`` run after the ``report_to`` integrations
    (TensorBoard, W&B), so those would not see the keys; :meth:`attach` places the callback
    before them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None = None, prefix: str = "spam/") -> None:
        self.optimizer = optimizer
        self.prefix = prefix
        self._pending: dict[str, int] | None = None
        self._warned = False

    def attach(self, trainer: Any) -> SpikeStatsCallback:
        """Put this callback right after the Trainer's DefaultFlowCallback, before the logging
        integrations, so that they receive the ``spam/*`` keys too. Returns ``self``."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        flow = [i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)]
        callbacks.insert(flow[0] + 1 if flow else 0, self)
        return self

    # ------------------------------------------------------------------ reading the optimizer
    def _target(self, kwargs: dict[str, Any]) -> SpikeAwareOptimizer | None:
        given = self.optimizer if self.optimizer is not None else kwargs.get("optimizer")
        found = unwrap_optimizer(given)
        if found is None and given is not None and not self._warned:
            self._warned = True
            _log.warning(
                "SpikeStatsCallback: %s is not a spam_lowmem optimizer; no spam/* keys will be logged",
                type(given).__name__,
            )
        return found

    def _collect(self, kwargs: dict[str, Any]) -> None:
        """Read (and reset) the counters into the pending record; every rank, same events."""
        opt = self._target(kwargs)
        if opt is None:
            return
        stats = opt.spike_stats()
        report = opt.memory_report()
        p = self.prefix
        record = self._pending if self._pending is not None else {}
        for key in COUNT_KEYS:
            record[p + key] = record.get(p + key, 0) + int(stats[key])
        for key in SNAPSHOT_KEYS:
            record[p + key] = int(stats[key])
        record[p + "state_bytes"] = int(report["total_bytes"])
        if _world() > 1:
            ranks = _per_rank(int(report["local_total_bytes"]))
            record[p + "state_bytes_rank_max"] = max(ranks)
            record[p + "state_bytes_rank_min"] = min(ranks)
            if len(ranks) <= MAX_RANK_KEYS:
                record.update({f"{p}state_bytes_rank{r}": b for r, b in enumerate(ranks)})
        self._pending = record

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._pending = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if _is_logging_step(args, state, control):
            self._collect(kwargs)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # an epoch-end log (logging_strategy="epoch"), or the steps since the last periodic log
        # that the end-of-training summary will report
        self._collect(kwargs)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._pending is None or logs is None or not _is_training_log(logs):
            return
        pending, self._pending = self._pending, None
        if not state.is_world_process_zero:
            return
        last = state.log_history[-1] if state.log_history else None
        # Trainer.log appends {**logs, "step": ...} to the history before calling on_log
        if last is not None and last.get("step") == state.global_step and all(k in last for k in logs):
            last.update(pending)
        logs.update(pending)
