"""LLaMA configurations of the papers' harness (docs/algorithms.md §1.1) plus two CPU sizes.

Built offline with transformers' ``LlamaConfig`` / ``LlamaForCausalLM``: SiLU, RMSNorm eps 1e-6,
init std 0.02, no biases, **untied** lm_head, RoPE, SDPA causal attention. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import UsageError

__all__ = [
    "ModelSpec",
    "SPECS",
    "MODEL_NAMES",
    "PROJECTIONS",
    "get_spec",
    "projection_shapes",
    "build_model",
    "count_parameters",
]

#: the 7 projection matrices per layer (the GaLore / sparse-momentum targets, docs/algorithms.md §3, §6)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    vocab_size: int  # default tokenizer size for this model (--vocab-size overrides)
    lr: float  # default learning rate (the papers' value for the paper sizes)
    seq_len: int  # default sequence length
    galore_rank: int  # default GaLore rank (matched-memory SPAM density uses it too)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SPECS: dict[str, ModelSpec] = {
    # tests and smoke runs: about 60K parameters at vocab 512
    "micro": ModelSpec("micro", 32, 2, 2, 88, 64, 512, 3e-3, 32, 8),
    # CPU demo (`spam-lowmem compare`): about 0.66M parameters at vocab 1024
    "tiny": ModelSpec("tiny", 128, 2, 4, 352, 512, 1024, 3e-3, 128, 32),
    # the papers' configs (max_sequence_length 1024, vocab 32000); lr and rank from §1.6
    "60m": ModelSpec("60m", 512, 8, 8, 1376, 1024, 32000, 1e-3, 256, 128),
    "130m": ModelSpec("130m", 768, 12, 12, 2048, 1024, 32000, 8e-4, 256, 256),
    "350m": ModelSpec("350m", 1024, 24, 16, 2736, 1024, 32000, 4e-4, 256, 256),
    # the authors' 1B script is broken (§1.6); 4e-4 is our conservative choice, rank 512 as §3
    "1b": ModelSpec("1b", 2048, 24, 32, 5461, 1024, 32000, 4e-4, 256, 512),
}
MODEL_NAMES = tuple(SPECS)


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None


def projection_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(out, in) shapes of every projection weight, from the config alone (no model built)."""
    h, f = spec.hidden, spec.intermediate
    per_layer = [(h, h)] * 4 + [(f, h), (f, h), (h, f)]
    return per_layer * spec.layers


def build_model(
    spec: ModelSpec,
    vocab_size: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (seeded with ``seed``), cast to ``dtype``.

    ``dtype=torch.bfloat16`` casts the whole model, as the papers do ("pure BF16", §1.4).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        hidden_act="silu",
        max_position_embeddings=spec.max_positions,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    moved: torch.nn.Module = model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
    return moved


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
