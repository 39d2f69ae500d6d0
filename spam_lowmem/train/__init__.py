"""The main job: pre-train a LLaMA-style model on real text with SPAM, Stable-SPAM or a baseline.

Modules: :mod:`.data` (corpus, tokenizer, packing, batches), :mod:`.model` (LLaMA configs),
:mod:`.optimizers` (optimizer factory, GaLore-matched density), :mod:`.loop` (training loop,
evaluation, checkpoints), :mod:`.compare` (several optimizers on one budget), :mod:`.memory`
(optimizer-state bytes and peak memory), :mod:`.distributed` (a rank's part in a DDP/FSDP2 job),
:mod:`.checkpoint_dcp` (DCP checkpoints of distributed runs), :mod:`.launch` (``--nproc``: the
torchrun re-launch). The command line lives in :mod:`spam_lowmem.cli`.

Heavy dependencies (transformers, tokenizers, galore-torch, adam-mini, bitsandbytes, matplotlib)
are imported lazily, so ``import spam_lowmem`` never needs them.
"""

from __future__ import annotations

from .errors import UsageError

__all__ = ["UsageError"]
