"""Neural-network layers: 4-bit quantised linear layers for W4A4 training (docs/algorithms.md §5)."""

from __future__ import annotations

from .quant_linear import STORAGES, QuantConfig, QuantLinear
from .quantize_model import (
    DEFAULT_TARGETS,
    PackedRequantHandle,
    attach_packed_requant,
    load_quantized,
    quantize_model,
)

__all__ = [
    "QuantLinear",
    "QuantConfig",
    "STORAGES",
    "quantize_model",
    "attach_packed_requant",
    "PackedRequantHandle",
    "DEFAULT_TARGETS",
    "load_quantized",
]
