"""Optimizers whose arithmetic runs in the spam_lowmem C++/CUDA core."""

from __future__ import annotations

from .adamw import AdamW
from .spam import SPAM
from .stable_spam import StableSPAM

__all__ = ["SPAM", "AdamW", "StableSPAM"]
