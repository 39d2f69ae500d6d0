"""``spikes.png`` of ``compare``: train loss, gradient norm and spike-clipped entries per step.

One panel per quantity on a shared step axis, one line per run given (compare passes the first
seed of each optimizer, so the lines share data order and initial weights). Loss and gradient
norm on log scales (a spike is a multiplicative jump); the clipped counts on a symlog scale,
since most steps clip nothing and a log scale cannot show zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_spikes"]


def plot_spikes(path: Path, runs: Sequence[tuple[str, list[dict[str, Any]]]]) -> None:
    """Write the three-panel figure for ``runs`` = (label, train records) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, norm_ax, clip_ax) = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    clipped_any = False
    for i, (label, records) in enumerate(runs):
        color = f"C{i}"
        steps = [r["step"] for r in records]
        # a non-finite value cannot be drawn on a log axis: it is left out (the report names the step)
        loss = [r["loss"] if math.isfinite(r["loss"]) and r["loss"] > 0 else math.nan for r in records]
        loss_ax.plot(steps, loss, color=color, lw=0.8, label=label)
        norms = [r.get("grad_norm", math.nan) for r in records]
        norm_ax.plot(steps, [n if math.isfinite(n) and n > 0 else math.nan for n in norms], color=color, lw=0.8)
        if any("clipped" in r for r in records):
            clipped_any = True
            clip_ax.plot(steps, [r.get("clipped", 0) for r in records], color=color, lw=0.8, label=label)
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("train loss (nats/token)")
    loss_ax.legend(fontsize=7)
    norm_ax.set_yscale("log")
    norm_ax.set_ylabel("global grad norm\n(before clipping/step)")
    clip_ax.set_yscale("symlog", linthresh=1)
    clip_ax.set_ylim(bottom=0)  # counts: never negative
    clip_ax.set_ylabel("spike-clipped entries")
    if not clipped_any:
        clip_ax.text(0.5, 0.5, "no optimizer here reports spike counts", ha="center", transform=clip_ax.transAxes)
    clip_ax.set_xlabel("optimizer step")
    fig.suptitle("Spikes: loss, gradient norm and clipping per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
