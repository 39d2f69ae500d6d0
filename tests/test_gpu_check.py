"""benchmarks/gpu_check.sh: the one-command GPU check parses and lists the steps it would run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_lists_every_step_within_eight_minutes() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, check=True).stdout
    names = [line[:11].strip() for line in out.splitlines()]
    assert names == ["machine", "build", "cuda tests", "step bf16", "step fp32", "compare"]
    limits = [int(line[11:17].strip().rstrip("s")) for line in out.splitlines()]
    assert sum(limits) <= 8 * 60  # the budget for one H200
    commands = "\n".join(line[17:] for line in out.splitlines())
    assert "pytest -q -m cuda" in commands
    assert "bench_step.py --device cuda" in commands
    assert "spam-lowmem compare --device cuda" in commands
    assert "--no-build-isolation --no-deps -e ." in commands
