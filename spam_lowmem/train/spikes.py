"""What the per-step records of a run say about spikes: loss spikes, divergence, clipped entries.

Read from ``metrics.jsonl`` (train records carry ``loss``, ``grad_norm`` and, for the SPAM
family, ``clipped`` / ``nonfinite`` from ``opt.spike_stats()``). Only measurements: the report
sentences say what happened in these runs and claim nothing beyond them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["LOSS_SPIKE_RATIO", "read_train_records", "spike_summary", "spike_sentence"]

#: a train loss this many times the EMA of the steps before it counts as a loss spike
LOSS_SPIKE_RATIO = 1.2
_EMA = 0.9
_SKIP = 10  # the first steps fall fast from ln(vocab): their EMA lags, so they are not judged


def read_train_records(path: Path) -> list[dict[str, Any]]:
    """The ``"train"`` records of a metrics file, in order (none if it does not exist)."""
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return [r for r in records if r.get("type") == "train"]


def spike_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Loss spikes (loss > LOSS_SPIKE_RATIO x EMA of the preceding losses), the first non-finite
    loss, the largest gradient norm and its ratio to the median, and the clipped entries in all."""
    spikes, worst, ema = 0, 0.0, None
    diverged_at = None
    for i, r in enumerate(records):
        loss = r["loss"]
        if not math.isfinite(loss):
            diverged_at = r["step"]
            break
        if ema is not None and i >= _SKIP:
            ratio = loss / ema if ema > 0 else 0.0
            worst = max(worst, ratio)
            spikes += ratio > LOSS_SPIKE_RATIO
        ema = loss if ema is None else _EMA * ema + (1 - _EMA) * loss
    norms = sorted(r["grad_norm"] for r in records if isinstance(r.get("grad_norm"), float))
    finite = [n for n in norms if math.isfinite(n)]
    median = finite[len(finite) // 2] if finite else None
    has_counts = any("clipped" in r for r in records)
    return {
        "steps": len(records),
        "loss_spikes": spikes,
        "max_loss_ratio": worst,
        "diverged_at": diverged_at,
        "max_grad_norm": finite[-1] if finite else None,
        "grad_norm_max_over_median": finite[-1] / median if finite and median else None,
        "nonfinite_grad_norm_steps": len(norms) - len(finite),
        "clipped_total": sum(r.get("clipped", 0) for r in records) if has_counts else None,
        "nonfinite_total": sum(r.get("nonfinite", 0) for r in records) if has_counts else None,
    }


def spike_sentence(label: str, s: dict[str, Any]) -> str:
    """One measured sentence about one run's spikes."""
    if not s["steps"]:
        return f"{label}: no per-step records."
    parts = [f"diverged (non-finite loss) at step {s['diverged_at']}" if s["diverged_at"] else "did not diverge"]
    if s["steps"] > _SKIP:
        parts.append(
            f"{s['loss_spikes']} loss spike(s) (train loss > {LOSS_SPIKE_RATIO:g} x its EMA; largest ratio "
            f"{s['max_loss_ratio']:.2f})"
        )
    else:
        parts.append(f"too few steps to judge loss spikes (the first {_SKIP} are not judged)")
    if s["max_grad_norm"] is not None:
        parts.append(f"max grad norm {s['max_grad_norm']:.3g} ({s['grad_norm_max_over_median']:.1f} x its median)")
    if s["clipped_total"] is not None:
        parts.append(f"{s['clipped_total']} gradient entries spike-clipped, {s['nonfinite_total']} non-finite")
    return f"{label}: " + "; ".join(parts) + f" over {s['steps']} steps."
