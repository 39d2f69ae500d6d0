"""The training configuration, its JSON form, and the run-folder rules.

A run folder holds ``config.json`` (this configuration plus the corpus hash), ``metrics.jsonl``,
``checkpoint.pt`` (distributed runs: the folder ``checkpoint_dcp/``, :mod:`.checkpoint_dcp`),
``summary.json`` and, by default, ``cache/`` (tokenizer and tokens).

Rules, all checked before anything is written:

* a fresh run needs a missing or empty folder (a folder holding only ``cache/`` counts as empty);
* ``--overwrite`` replaces the four run files (and a ``checkpoint_dcp/``) of a non-empty folder
  (other files are left alone);
* ``--resume`` needs ``config.json`` and an identical configuration, except for the keys in
  :data:`MAY_CHANGE_ON_RESUME`; it continues from ``checkpoint.pt`` (or from step 0 if the run
  stopped before its first checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = [
    "TrainConfig",
    "RUN_FILES",
    "MAY_CHANGE_ON_RESUME",
    "QUANT_FORMATS",
    "WEIGHT_STORAGES",
    "config_differences",
    "check_run_dir",
    "write_json",
]

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json")
#: logistics that do not change the training trajectory
MAY_CHANGE_ON_RESUME = frozenset({"eval_every", "save_every"})
#: keys added after the first release, with the value that a config.json written without them meant
_ADDED_KEYS = {"weight_bits": 16, "val_fraction": 0.0, "reset_interval": None, "reset_warmup": None}
QUANT_FORMATS = ("int4", "fp4")
WEIGHT_STORAGES = ("fake", "packed")


@dataclass
class TrainConfig:
    """Everything that defines a run (``None`` model-dependent values are filled by the CLI)."""

    optimizer: str = "adamw"
    model: str = "tiny"
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0
    device: str = "cpu"
    dtype: str = "float32"
    vocab_size: int = 2048
    data: list[str] = field(default_factory=list)  # absolute paths; empty means Shakespeare
    seed: int = 0
    eval_every: int = 30
    eval_batches: int = 16
    save_every: int = 100
    state_bits: int | None = None
    density: float | None = None
    budget: str | None = None
    galore_rank: int | None = None
    galore_gap: int = 200
    galore_scale: float = 0.25
    # 4-bit training (docs/algorithms.md §5): 16 = unquantised; 4 = W4A4 on the 7 projections. The three
    # quant_* keys are None for 16-bit runs and filled (int4 / fake / 256 by default) for 4-bit ones.
    weight_bits: int = 16
    quant_format: str | None = None
    weight_storage: str | None = None
    quant_group_size: int | None = None
    # fraction of the packed training sequences kept apart as a validation split (data.split_validation),
    # for choosing a learning rate without looking at the held-out split; 0 = none
    val_fraction: float = 0.0
    # SPAM / Stable-SPAM momentum-reset period and SPAM's post-reset warmup; None = the class defaults
    reset_interval: int | None = None
    reset_warmup: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, max_positions: int) -> None:
        """Plain range checks; raises UsageError naming the flag."""
        positive = {
            "steps": self.steps,
            "batch-size": self.batch_size,
            "grad-accum": self.grad_accum,
            "lr": self.lr,
            "vocab-size": self.vocab_size,
            "galore-gap": self.galore_gap,
        }
        for flag, value in positive.items():
            if not value > 0:
                raise UsageError(f"--{flag} must be > 0, got {value}")
        non_negative = {
            "warmup": self.warmup,
            "eval-every": self.eval_every,
            "save-every": self.save_every,
            "eval-batches": self.eval_batches,
            "grad-clip": self.grad_clip,
        }
        for flag, value in non_negative.items():
            if not value >= 0:
                raise UsageError(f"--{flag} must be >= 0, got {value}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.seq_len > max_positions:
            raise UsageError(
                f"--seq-len {self.seq_len} exceeds the {self.model} model's maximum of {max_positions} positions"
            )
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise UsageError(f"--density must be in (0, 1], got {self.density}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise UsageError(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.reset_interval is not None and self.reset_interval < 0:
            raise UsageError(f"--reset-interval must be >= 0 (0: never reset), got {self.reset_interval}")
        if self.reset_warmup is not None and self.reset_warmup < 0:
            raise UsageError(f"--reset-warmup must be >= 0, got {self.reset_warmup}")
        if self.galore_rank is not None and self.galore_rank <= 0:
            raise UsageError(f"--galore-rank must be > 0, got {self.galore_rank}")
        self.validate_quant()

    def validate_quant(self) -> None:
        """The 4-bit options: checked on their own (the CLI calls this before anything else)."""
        quant = {
            "quant-format": self.quant_format,
            "weight-storage": self.weight_storage,
            "quant-group-size": self.quant_group_size,
        }
        if self.weight_bits == 16:
            given = [f"--{k}" for k, v in quant.items() if v is not None]
            if given:
                raise UsageError(f"{', '.join(given)} only apply to 4-bit training (--weight-bits 4)")
            return
        if self.weight_bits != 4:
            raise UsageError(f"--weight-bits must be 4 or 16, got {self.weight_bits}")
        if self.quant_format not in QUANT_FORMATS:
            raise UsageError(f"--quant-format must be one of {', '.join(QUANT_FORMATS)}, got {self.quant_format!r}")
        if self.weight_storage not in WEIGHT_STORAGES:
            raise UsageError(
                f"--weight-storage must be one of {', '.join(WEIGHT_STORAGES)}, got {self.weight_storage!r}"
            )
        g = self.quant_group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2:
            raise UsageError(f"--quant-group-size must be an integer >= 2, got {g!r}")


def config_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``key: saved -> given`` for every identity key that differs."""
    keys = sorted((set(saved) | set(given)) - MAY_CHANGE_ON_RESUME)
    saved = {**_ADDED_KEYS, **saved}
    given = {**_ADDED_KEYS, **given}
    return [f"{k}: {saved.get(k)!r} -> {given.get(k)!r}" for k in keys if saved.get(k) != given.get(k)]


def _is_empty(out: Path) -> bool:
    return all(p.name == "cache" and p.is_dir() for p in out.iterdir())


def check_run_dir(out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> str:
    """``"fresh"``, ``"overwrite"`` or ``"resume"``; raises UsageError (nothing written)."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise UsageError(f"run folder {out} exists and is not a folder")
    if resume:
        cfg_file = out / "config.json"
        if not cfg_file.is_file():
            raise UsageError(f"nothing to resume in {out} (no config.json); drop --resume to start a new run")
        try:
            saved = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {cfg_file}: {exc}") from exc
        diffs = config_differences(saved, config)
        if diffs:
            raise UsageError(
                f"run folder {out} holds a different configuration; refusing to resume "
                "(saved -> given):\n  " + "\n  ".join(diffs)
            )
        return "resume"
    if out.exists() and not _is_empty(out):
        if not overwrite:
            raise UsageError(
                f"run folder {out} is not empty; pass --resume to continue that run or --overwrite to replace it"
            )
        return "overwrite"
    return "fresh"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
