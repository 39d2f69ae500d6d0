"""Integrations with training frameworks.

* :mod:`spam_lowmem.integrations.transformers`: :class:`SpikeStatsCallback` for the Hugging
  Face ``Trainer`` (imports transformers);
* :mod:`spam_lowmem.integrations.presets`: :func:`build_optimizer` (torch only).

Names are resolved on first use, so importing this package (or spam_lowmem) never imports
transformers; only touching ``SpikeStatsCallback`` does.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SpikeStatsCallback", "build_optimizer", "split_weight_decay"]

_WHERE = {
    "SpikeStatsCallback": ".transformers",
    "build_optimizer": ".presets",
    "split_weight_decay": ".presets",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
