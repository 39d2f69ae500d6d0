"""``compare --preset``: named configurations sized for a purpose, and the reset arithmetic.

``paper-small`` trains long enough for the mechanisms the SPAM and Stable-SPAM papers are about
to act: 3 momentum resets (calls 180, 360 and 540 of 600), each followed by SPAM's full
post-reset warmup (54 calls, the papers' warmup / interval ratio of 150 / 500 = 0.3) well
before the run ends. It tunes the rate of adamw, spam and stable-spam on the validation split
and reports two seeds. Sized for about 30 minutes on 2 CPU cores for the whole compare (12
runs of the tiny model: 3 optimizers x 3 rates, plus a second seed of each; see the README for
the timed estimate). The default ``compare`` stays a few minutes and never resets.

Values given on the command line win over the preset's.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "resets_in_run", "complete_warmups"]

PRESETS: dict[str, dict[str, Any]] = {
    "paper-small": {
        "optimizers": "adamw,spam,stable-spam",
        "model": "tiny",
        "steps": 600,
        "warmup": 60,
        "eval_every": 60,
        "tune_lr": True,
        "seeds": "0,1",
        "reset_interval": 180,
        "reset_warmup": 54,
    },
}


def resets_in_run(steps: int, reset_interval: int) -> int:
    """Momentum resets in a run of ``steps`` optimizer calls: calls n = 1..steps with n % dT == 0
    (spam_lowmem.schedules.is_reset_call); none when dT is 0."""
    return steps // reset_interval if reset_interval > 0 else 0


def complete_warmups(steps: int, reset_interval: int, warmup: int) -> int:
    """Resets whose SPAM post-reset warmup of ``warmup`` calls also ends within the run."""
    if reset_interval <= 0:
        return 0
    return sum(1 for k in range(1, resets_in_run(steps, reset_interval) + 1) if k * reset_interval + warmup <= steps)
