"""The CPU kernel builds (baseline, AVX2, AVX-512, AVX-512 VBMI; cpu_isa.h) write the same
8-bit codes, absmax, parameters and moments, bit for bit: each build the CPU can run is
forced with SPAM_LOWMEM_CPU_ISA in a subprocess running tests/isa_probe.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spam_lowmem import _C

ISAS = ("baseline", "avx2", "avx512", "avx512vbmi")
PROBE = Path(__file__).with_name("isa_probe.py")


def _run_probe(isa: str, out: Path) -> dict[str, object]:
    env = dict(os.environ, SPAM_LOWMEM_CPU_ISA=isa, OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, str(PROBE), str(out)], env=env, check=True, timeout=600)
    return torch.load(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that NaNs compare equal to the same NaN and -0.0 differs from 0.0."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    return t


def test_every_cpu_build_writes_the_same_state(tmp_path: Path) -> None:
    best = _C.isa()
    runnable = ISAS[: ISAS.index(best) + 1] if best in ISAS else ("baseline",)
    if len(runnable) < 2:
        pytest.skip(f"this CPU runs only the {best} build: nothing to compare")
    results = {isa: _run_probe(isa, tmp_path / f"{isa}.pt") for isa in runnable}
    for isa, result in results.items():
        assert result["isa"] == isa  # the cap was honoured
    reference = results[runnable[0]]
    # the probe covers NaN and negative-zero blocks, and a few 8-bit optimizer steps
    assert int(torch.isnan(reference["absmax.True"]).sum()) == 2
    assert any(k.endswith("exp_avg_sq_codes") and k.startswith("sparse") for k in reference)
    assert any(k.startswith("sharded.") and k.endswith("exp_avg_sq_codes") for k in reference)
    assert reference["near_codes.True"].numel() == (64 + 16) * 256  # values near every decision
    for isa in runnable[1:]:
        other = results[isa]
        assert other.keys() == reference.keys()
        for key, value in reference.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(_bits(other[key]), _bits(value)), f"{isa} differs from {runnable[0]} in {key}"
