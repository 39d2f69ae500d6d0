"""Pure-PyTorch reference (oracle) implementations of SPAM and Stable-SPAM.

These are the oracles the C++/CUDA optimizers are tested against (docs/algorithms.md §2 and
§4). They import only ``torch``, ``math``, :mod:`spam_lowmem.schedules` and the pure-Python
argument definitions of :mod:`spam_lowmem.hyperparams` (shared with the optimizers, so both
accept the same arguments), never the compiled extension, so they work before it is built.
"""

from __future__ import annotations

from spam_lowmem.reference.spam import ReferenceSPAM
from spam_lowmem.reference.stable_spam import ReferenceStableSPAM

__all__ = ["ReferenceSPAM", "ReferenceStableSPAM"]
