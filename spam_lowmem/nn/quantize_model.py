"""Turn a model's projection layers into 4-bit :class:`QuantLinear` layers, and keep packed
weights in sync with an optimizer.

Only the ``nn.Linear`` modules whose qualified name ends with one of ``targets`` are replaced
(by default the LLaMA projections q/k/v/o/gate/up/down, docs/algorithms.md §5.1); ``lm_head``,
embeddings and norms stay as they are.

Saving: a model with a transformers config records each :func:`quantize_model` call in it
(``config.spam_lowmem_quantization``, written to config.json by ``save_pretrained``);
:func:`load_quantized` rebuilds the quantised layers from that record and loads their buffers.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..optim import packed as packed_policy
from ..optim.base import SpikeAwareOptimizer
from .quant_linear import QuantConfig, QuantLinear

__all__ = [
    "DEFAULT_TARGETS",
    "quantize_model",
    "attach_packed_requant",
    "PackedRequantHandle",
    "load_quantized",
    "CONFIG_KEY",
]

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize_model(
    model: nn.Module,
    targets: str | Iterable[str] = DEFAULT_TARGETS,
    *,
    weight_bits: int = 4,
    act_bits: int = 4,
    fmt: str = "int4",
    group_size: int = 256,
    storage: str = "fake",
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose module name ends with a target (matched on
    whole name components: ``"q_proj"`` matches ``layers.0.self_attn.q_proj``) by a
    :class:`QuantLinear` reusing its Parameters, and return ``model``.

    Everything is validated before anything is replaced: a target that matches nothing, a
    matched module that is not ``nn.Linear``, a group size that does not divide a weight's
    element count, or a non-finite weight raise ValueError/TypeError and leave the model intact.

    A model with a transformers-style ``config`` gets the call recorded in it (see
    :func:`load_quantized`), so a ``save_pretrained`` checkpoint says how to rebuild it.
    """
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"spam_lowmem: targets must be non-empty module-name suffixes, got {targets!r}")
    config = QuantConfig(fmt, weight_bits, act_bits, group_size, storage)
    matched = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if not matched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"spam_lowmem: no module name ends with any of {targets}; the model's "
            f"nn.Linear modules are {linears[:8]}{' ...' if len(linears) > 8 else ''}"
        )
    for name, module in matched:
        if isinstance(module, QuantLinear):
            raise ValueError(f"spam_lowmem: '{name}' is already a QuantLinear")
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"spam_lowmem: '{name}' matches the targets but is a {type(module).__name__}, not nn.Linear"
            )
        config.check_weight(module.weight.numel(), f"weight of '{name}' {tuple(module.weight.shape)}")
        if not bool(torch.isfinite(module.weight.detach()).all()):
            raise ValueError(f"spam_lowmem: the weight of '{name}' contains NaN or Inf")
    kwargs: dict[str, Any] = dict(
        fmt=fmt, weight_bits=weight_bits, act_bits=act_bits, group_size=group_size, storage=storage
    )
    for name, module in matched:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear.from_linear(module, **kwargs))  # type: ignore[arg-type]
    _record(model, {"targets": list(targets), **kwargs})
    return model


class PackedRequantHandle:
    """Returned by :func:`attach_packed_requant`; ``remove()`` detaches it. ``fused`` says which
    path was chosen."""

    def __init__(
        self, hooks: list[Any], modules: list[QuantLinear], fused: bool, optimizer: torch.optim.Optimizer
    ) -> None:
        self._hooks, self.modules, self.fused, self._optimizer = hooks, modules, fused, optimizer

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        for m in self.modules:
            if self.fused:
                self._optimizer.detach_packed(m.weight)  # type: ignore[attr-defined]
            m.requant_attached = max(0, m.requant_attached - 1)
        self._hooks, self.modules = [], []


def _fused_supported(optimizer: torch.optim.Optimizer, modules: list[QuantLinear]) -> bool:
    if not isinstance(optimizer, SpikeAwareOptimizer):
        return False
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return all(packed_policy.unsupported_reason(m.weight, groups[id(m.weight)]) is None for m in modules)


def attach_packed_requant(
    optimizer: torch.optim.Optimizer, model: nn.Module, *, fused: bool | None = None
) -> PackedRequantHandle:
    """Keep the packed QuantLinear layers of ``model`` in step with ``optimizer``.

    Fused path (``fused=True``; the default for spam_lowmem.SPAM / StableSPAM / AdamW when
    every packed weight sits in a dense group with 32-bit moments): the optimizer steps each
    packed weight on its codes (:meth:`~spam_lowmem.optim.base.SpikeAwareOptimizer.attach_packed`):
    one pass per quantisation group unpacks it, applies the element update and re-quantises it
    with stochastic rounding; no full-precision working copy is ever built. ``fused=True`` with
    an unsupported setting raises NotImplementedError (TypeError for a non-spam_lowmem optimizer).

    Unfused path (``fused=False``, or the default for any other ``torch.optim`` optimizer):

    * step pre-hook: each packed layer whose weight has a gradient is materialised (codes
      unpacked into a working copy in the weight's dtype, one fused pass);
    * the optimizer updates that copy like any Parameter (its state is untouched by us);
    * step post-hook: each materialised layer is re-quantised with stochastic rounding into
      its codes (one fused pass per layer: group statistics, grid choice, rounding, nibble
      packing) and the working copy is released.

    Both paths draw the rounding uniforms from the layer's counter
    (:meth:`QuantLinear.next_sr_counter`) and give the same codes bit for bit.
    """
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    modules = [
        m
        for m in model.modules()
        if isinstance(m, QuantLinear) and m.storage == "packed" and id(m.weight) in in_optimizer
    ]
    if not modules:
        raise ValueError(
            "spam_lowmem: the optimizer holds no weight of a packed QuantLinear in this "
            "model (quantize_model(..., storage='packed') first, then build the optimizer "
            "or keep the original Parameters)"
        )
    if fused is None:
        fused = _fused_supported(optimizer, modules)
    if fused:
        if not isinstance(optimizer, SpikeAwareOptimizer):
            raise TypeError(
                f"spam_lowmem: fused packed steps need a spam_lowmem optimizer (SPAM, "
                f"StableSPAM, AdamW), got {type(optimizer).__name__}; use fused=False"
            )
        attached: list[QuantLinear] = []
        try:
            for m in modules:
                optimizer.attach_packed(m.weight, m)
                attached.append(m)
        except Exception:
            for m in attached:  # all or nothing
                optimizer.detach_packed(m.weight)
            raise
        for m in modules:
            m.requant_attached += 1
        return PackedRequantHandle([], modules, True, optimizer)

    def pre_step(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        for m in modules:
            if m.weight.grad is not None:
                m.materialize()

    def post_step(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        for m in modules:
            m.release(requantize=True)

    hooks = [optimizer.register_step_pre_hook(pre_step), optimizer.register_step_post_hook(post_step)]
    for m in modules:
        m.requant_attached += 1
    return PackedRequantHandle(hooks, modules, False, optimizer)


# ------------------------------------------------------------------ saving and loading
#: Key of the quantisation record in a transformers config (and so in ``config.json``).
CONFIG_KEY = "spam_lowmem_quantization"
_RECORD_FIELDS = ("targets", "fmt", "weight_bits", "act_bits", "group_size", "storage")


def _record(model: nn.Module, entry: dict[str, Any]) -> None:
    """Append one quantize_model call to ``model.config`` (when the model has a transformers-style
    config), so that ``save_pretrained`` writes it to config.json and :func:`load_quantized`
    can replay it. Plain ``nn.Module`` models have nowhere to keep it and are left alone."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    # Models built from one config object share it: record on this model's own copy (every
    # submodule holding the shared object gets the copy), so no other model claims to be quantised.
    own = copy.deepcopy(config)
    for m in model.modules():
        if getattr(m, "config", None) is config:
            m.config = own
    passes = list(getattr(own, CONFIG_KEY, None) or [])
    passes.append(entry)
    setattr(own, CONFIG_KEY, passes)


def _passes_of(config: Any) -> list[dict[str, Any]]:
    if config is None:
        return []
    raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if not raw:
        return []
    if not isinstance(raw, list) or not all(isinstance(p, dict) and set(_RECORD_FIELDS) <= set(p) for p in raw):
        raise ValueError(f"spam_lowmem: malformed '{CONFIG_KEY}' record in the config: {raw!r}")
    return raw


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored under ``path``: a save_pretrained directory (safetensors, single or
    sharded, or pytorch_model.bin) or one .safetensors / torch file."""

    def load_one(f: Path) -> dict[str, torch.Tensor]:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(f))
        return torch.load(f, map_location="cpu", weights_only=True)

    if path.is_file():
        return load_one(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(load_one(path / shard))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return load_one(path / name)
    raise FileNotFoundError(f"spam_lowmem: no model.safetensors, pytorch_model.bin or shard index in {path}")


def _config_dtype(config: Any) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _load_exact(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """load_state_dict that only tolerates missing keys whose tensor is shared with a loaded one
    (tied weights, which save_pretrained stores once)."""
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    current = model.state_dict(keep_vars=True)
    loaded = {current[k].data_ptr() for k in state_dict if k in current and current[k].numel()}
    untied = [k for k in missing if current[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise RuntimeError(
            f"spam_lowmem: the checkpoint does not match the quantised model: missing "
            f"{untied[:8]}, unexpected {list(unexpected)[:8]}"
        )


def load_quantized(
    model_or_path: nn.Module | str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Reload a model quantised by :func:`quantize_model` (any storage) and saved with
    transformers' ``save_pretrained`` or ``torch.save(model.state_dict())``.

    * ``load_quantized(path)``: ``path`` is a ``save_pretrained`` directory. The model class is
      built from its config.json (``architectures``, in the saved dtype), the
      ``quantize_model`` calls recorded there under ``"spam_lowmem_quantization"`` are replayed
      (packed layers get their nibble/scale buffers), then every tensor is loaded: the result
      computes exactly what the saved model computed. Returned in eval mode, as
      ``from_pretrained`` does.
    * ``load_quantized(model, checkpoint)``: ``model`` is an unquantised model of the same
      architecture (or one already quantised the same way); ``checkpoint`` a directory, a
      file, or a state dict. The recorded calls come from ``checkpoint/config.json`` when there
      is one, else from ``model.config``.

    A plain ``from_pretrained`` of a packed checkpoint raises instead (the packed layers save a
    0-element ``weight`` marker, which its loader reports as a size mismatch): it would
    otherwise leave the projections randomly initialised.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        if checkpoint is not None:
            raise TypeError("spam_lowmem: load_quantized(path) takes no checkpoint; the weights are in path")
        path = Path(model_or_path)
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path))
        passes = _passes_of(config)
        if not passes:
            raise ValueError(
                f"spam_lowmem: {path} has no '{CONFIG_KEY}' record in its config.json: it "
                "was not saved from a spam_lowmem.quantize_model model; load it with "
                "from_pretrained"
            )
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = cls(config) if cls is not None else AutoModelForCausalLM.from_config(config)
        setattr(model.config, CONFIG_KEY, [])  # re-recorded by the replay below
        dtype = _config_dtype(config)
        if dtype is not None and dtype.is_floating_point:
            model.to(dtype)
        state_dict: Mapping[str, torch.Tensor] = _read_checkpoint(path)
        model.eval()
    else:
        model = model_or_path
        if checkpoint is None:
            raise TypeError("spam_lowmem: load_quantized(model, checkpoint) needs the checkpoint")
        passes = []
        if isinstance(checkpoint, Mapping):
            state_dict = checkpoint
        else:
            ckpt = Path(checkpoint)
            state_dict = _read_checkpoint(ckpt)
            if ckpt.is_dir() and (ckpt / "config.json").is_file():
                passes = _passes_of(json.loads((ckpt / "config.json").read_text()))
        if not passes:
            passes = _passes_of(getattr(model, "config", None))
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        if not passes:
            raise ValueError(
                f"spam_lowmem: no '{CONFIG_KEY}' record (checkpoint config.json or "
                "model.config) says how the model was quantised"
            )
        for p in passes:
            quantize_model(model, tuple(p["targets"]), **{k: p[k] for k in _RECORD_FIELDS if k != "targets"})
    _load_exact(model, state_dict)
    return model
