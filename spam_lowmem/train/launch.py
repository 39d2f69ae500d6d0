"""``spam-lowmem train --nproc N``: re-launch the same command through torchrun on this machine.

The parent runs ``python -m torch.distributed.run --standalone --nproc-per-node N -m
spam_lowmem.cli ARGS`` with the same arguments less ``--nproc N`` (torchrun's own parser would
take ``--nproc`` for an abbreviation of its ``--nproc-per-node``), marks its ranks with the
variable :data:`MARK`, and waits. torchrun reports any failed rank as
exit status 1, so each rank also writes its own exit status to a folder the parent names in
``SPAM_LOWMEM_STATUS_DIR``; the parent returns the ranks' status (2 for bad input, 1 for a
diverged run) instead of torchrun's.

No torch import here: the parent only starts processes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["launched_by_torchrun", "started_by_nproc", "without_nproc", "relaunch", "report_status"]

#: set by the parent for its ranks: "this torchrun job is the --nproc re-launch"
MARK = "SPAM_LOWMEM_NPROC"
STATUS_DIR = "SPAM_LOWMEM_STATUS_DIR"
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (its environment variables are set)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def started_by_nproc() -> bool:
    """Whether this rank belongs to the job a ``--nproc`` parent started."""
    return launched_by_torchrun() and MARK in os.environ


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` / ``--nproc=N`` (or an abbreviation argparse accepted,
    such as ``--npr 2``)."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        name = token.split("=", 1)[0]
        if len(name) >= 4 and "--nproc".startswith(name):
            skip = "=" not in token
            continue
        out.append(token)
    return out


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``argv`` (the CLI's arguments) as ``nproc`` torchrun ranks; returns the exit status."""
    with tempfile.TemporaryDirectory(prefix="spam-lowmem-status-") as status:
        env = {**os.environ, MARK: str(nproc), STATUS_DIR: status}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # one machine: a private rendezvous on a free local port
            "--nproc-per-node",
            str(nproc),
            "-m",
            "spam_lowmem.cli",
            *without_nproc(argv),
        ]
        try:
            code = subprocess.call(cmd, env=env)
        except KeyboardInterrupt:  # torchrun got the signal too and stops its ranks
            return 130
        if code == 0:
            return 0
        ranks = []
        for path in Path(status).glob("rank*"):
            try:
                ranks.append(int(path.read_text(encoding="ascii")))
            except (OSError, ValueError):
                continue
        for wanted in (2, 130, 1):  # bad input first: it is what the user must fix
            if wanted in ranks:
                return wanted
        return code


def report_status(code: int) -> None:
    """Leave this rank's exit status for the ``--nproc`` parent (nothing outside such a job)."""
    folder = os.environ.get(STATUS_DIR)
    if folder and started_by_nproc():
        # unwritable: the parent then reports torchrun's own status
        with contextlib.suppress(OSError):
            Path(folder, f"rank{os.environ['RANK']}").write_text(str(code), encoding="ascii")
