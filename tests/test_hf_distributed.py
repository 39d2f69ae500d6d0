"""SpikeStatsCallback under torch.distributed: transformers' Trainer on 2 real ranks (torchrun,
DDP over gloo, CPU; tests/hf_distributed_case.py). Every rank reads the optimizer at the same
steps (spike_stats and memory_report are collectives under FSDP2, and the callback's per-rank
gather is one under any backend); only rank 0's log history gets the spam/* keys, with each
rank's state bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("needs torch.distributed", allow_module_level=True)

CASE = Path(__file__).with_name("hf_distributed_case.py")


def test_two_ranks_read_together_and_rank0_logs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(CASE)]
    run = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # the same reads at the same (step, epoch) on both ranks: logging steps 2, 4, 6 and the
    # two epoch ends (step 4, and step 6 where max_steps stops the second epoch)
    assert ranks[0]["reads"] == ranks[1]["reads"] == [[2, 0.5], [4, 1.0], [4, 1.0], [6, 1.5], [6, 1.5]]
    logs0 = [h for h in ranks[0]["log_history"] if "loss" in h]
    assert [h["step"] for h in logs0] == [2, 4, 6]
    for h in logs0:
        assert h["spam/clipped"] > 0 and h["spam/nonfinite"] == 0
        assert [h["spam/state_bytes_rank0"], h["spam/state_bytes_rank1"]] == [r["local_total_bytes"] for r in ranks]
        assert h["spam/state_bytes_rank_max"] == max(r["local_total_bytes"] for r in ranks)
        assert h["spam/state_bytes"] == ranks[0]["local_total_bytes"]  # DDP: replicated, nothing sharded
    assert not any(k.startswith("spam/") for h in ranks[1]["log_history"] for k in h)
