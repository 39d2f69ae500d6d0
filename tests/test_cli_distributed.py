"""``spam-lowmem train`` as a distributed job: real processes on CPU (gloo) through torchrun
(``sys.executable -m torch.distributed.run``, directly or by ``--nproc``), micro LLaMA, few steps.

* FSDP2 on 2 ranks writes metrics once (rank 0) and follows the single-process run of the same
  configuration within float rounding (the gradient is averaged over 2 half-batches instead of
  taken over the whole batch).
* A DCP checkpoint saved by 2 FSDP2 ranks resumes on 1, and that one's on 2 DDP ranks (so DDP
  and the change of parallelism are covered by the same three launches); the run ends as the
  uninterrupted one (bitwise while nothing changed, within rounding after).
* Bad input: --fsdp outside a distributed launch, a batch that does not divide over the ranks,
  --nproc under torchrun, a checkpoint of the other kind, options FSDP2 cannot run; and the
  --nproc parent's argument rewriting and exit status (without starting processes).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spam_lowmem.cli import main
from spam_lowmem.train import launch
from spam_lowmem.train.config import TrainConfig
from spam_lowmem.train.distributed import Runtime
from spam_lowmem.train.errors import UsageError
from spam_lowmem.train.loop import train

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("needs torch.distributed", allow_module_level=True)

STEPS = 6
#: float rounding of the gradient reduction, compounded over STEPS updates (measured: ~1e-7)
REL = 1e-5


def micro_args(corpus: Path, cache: Path, out: Path, optimizer: str = "spam", steps: int = STEPS) -> list[str]:
    return [
        "train",
        *("--optimizer", optimizer, "--model", "micro", "--steps", str(steps), "--batch-size", "4"),
        *("--seq-len", "32", "--vocab-size", "384", "--warmup", "2", "--eval-every", "2"),
        *("--eval-batches", "2", "--device", "cpu", "--data", str(corpus), "--cache-dir", str(cache)),
        *("--out", str(out), "--no-progress", "--seed", "7", "--threads", "1"),
    ]


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path, kind: str) -> list[float]:
    return [r["loss"] for r in records(out) if r["type"] == kind]


def torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The documented command: ``python -m torch.distributed.run ... -m spam_lowmem.cli ARGS``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.run([*cmd, "-m", "spam_lowmem.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def single(corpus: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The single-process runs the distributed ones are compared with (and the token cache)."""
    root = tmp_path_factory.mktemp("single")
    assert main(micro_args(corpus, cache, root / "spam")) == 0
    return {"spam": root / "spam"}


@pytest.fixture(scope="module")
def fsdp2(corpus: Path, cache: Path, single: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """SPAM on 2 FSDP2 ranks, uninterrupted, started by torchrun itself."""
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    proc = torchrun(2, micro_args(corpus, cache, out) + ["--fsdp"], cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_fsdp2_two_ranks_match_one_process(fsdp2: Any, single: dict[str, Path]) -> None:
    out, proc = fsdp2
    got = records(out)
    assert [r["step"] for r in got if r["type"] == "train"] == list(range(1, STEPS + 1))  # once: rank 0 alone
    assert [r["step"] for r in got if r["type"] == "eval"] == [2, 4, 6]
    assert proc.stdout.count("spam: eval loss") == 1
    for kind in ("train", "eval"):
        assert losses(out, kind) == pytest.approx(losses(single["spam"], kind), rel=REL)
    summary = json.loads((out / "summary.json").read_text())
    want = json.loads((single["spam"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "fsdp" and summary["finished"]
    assert math.isfinite(summary["final_eval_loss"])
    assert summary["final_eval_loss"] == pytest.approx(want["final_eval_loss"], rel=REL)
    # the two shards hold the whole state between them, each half of it (no row count is odd here)
    assert summary["optimizer_state_bytes"] == want["optimizer_state_bytes"]
    assert summary["optimizer_state_bytes_per_rank"] == want["optimizer_state_bytes"] // 2
    assert (out / "checkpoint_dcp" / ".metadata").is_file() and not (out / "checkpoint.pt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_dcp", "config.json", "metrics.jsonl", "summary.json"]


def test_resume_across_world_sizes(
    corpus: Path,
    cache: Path,
    fsdp2: Any,
    single: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2 FSDP2 ranks to step 2, then 1 to step 4, then 2 DDP ranks to the end: 2 -> 1, 1 -> 2."""
    # --nproc re-launches `python -m spam_lowmem.cli` in the working directory: not the source
    # checkout, whose uncompiled package would shadow the installed one (docs/design.md T8)
    monkeypatch.chdir(tmp_path)
    whole, _ = fsdp2
    out = tmp_path / "split"
    args = micro_args(corpus, cache, out) + ["--fsdp"]
    assert main(args + ["--nproc", "2", "--stop-after", "2"]) == 0
    # a DCP checkpoint does not resume in a single process: the message says how it does
    assert main(micro_args(corpus, cache, out) + ["--resume"]) == 2
    assert "add --nproc N" in capsys.readouterr().err
    assert main(args + ["--nproc", "1", "--stop-after", "4", "--resume"]) == 0
    state = torch.load(out / "checkpoint_dcp" / "train_state.pt", weights_only=False)
    assert state["step"] == 4 and state["world_size"] == 1  # saved afresh by the one rank
    assert not (out / "checkpoint_dcp" / "rng_rank1.pt").exists()
    capsys.readouterr()
    assert main(micro_args(corpus, cache, out) + ["--nproc", "2", "--resume"]) == 0  # DDP, re-launched
    got = records(out)
    assert [r["step"] for r in got if r["type"] == "train"] == list(range(1, STEPS + 1))
    train_got, train_whole = losses(out, "train"), losses(whole, "train")
    assert train_got[:2] == train_whole[:2]  # same world size, same data: bit for bit
    assert train_got == pytest.approx(train_whole, rel=REL)
    assert train_got == pytest.approx(losses(single["spam"], "train"), rel=REL)
    summary = json.loads((out / "summary.json").read_text())
    want = json.loads((whole / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == STEPS
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp"
    # DDP replicates: each rank holds the whole state, as much as the FSDP2 ranks together
    assert (
        summary["optimizer_state_bytes_per_rank"] == summary["optimizer_state_bytes"] == want["optimizer_state_bytes"]
    )
    assert summary["final_eval_loss"] == pytest.approx(want["final_eval_loss"], rel=REL)
    assert not (out / "checkpoint_dcp.tmp").exists() and not (out / "checkpoint_dcp.old").exists()


# ---------------------------------------------------------------------------------- bad input
def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_fsdp_needs_a_distributed_launch(
    corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x"
    _fails(capsys, micro_args(corpus, cache, out) + ["--fsdp"], "--fsdp shards the model over the ranks")
    _fails(capsys, micro_args(corpus, cache, out) + ["--nproc", "3"], "must divide evenly over --nproc 3")
    assert not out.exists()  # refused before anything started or was written


def test_under_torchrun_nproc_and_compare_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var, value in {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "x",
        "MASTER_PORT": "1",
    }.items():
        monkeypatch.setenv(var, value)
    _fails(capsys, ["train", "--out", str(tmp_path / "x"), "--nproc", "2"], "under torchrun leave --nproc out")
    _fails(capsys, ["compare", "--out", str(tmp_path / "y")], "compare runs in one process")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    ("mode", "change", "message"),
    [
        ("fsdp", {"batch_size": 3}, "must divide evenly over the 2 ranks"),
        ("ddp", {"batch_size": 5}, "must divide evenly over the 2 ranks"),
        ("fsdp", {"optimizer": "galore"}, "does not step FSDP2's sharded parameters"),
        (
            "ddp",
            {"weight_bits": 4, "quant_format": "int4", "weight_storage": "packed", "quant_group_size": 256},
            "--weight-storage packed runs in one process only",
        ),
    ],
)
def test_rank_checks_come_before_any_collective(
    corpus: Path, tmp_path: Path, mode: str, change: dict[str, Any], message: str
) -> None:
    """What every rank checks first, identically, so that all of them stop (no process group is
    needed: the checks run before the first collective)."""
    cfg = TrainConfig(model="micro", seq_len=32, vocab_size=384, data=[str(corpus)], device="cpu", batch_size=4)
    for key, value in change.items():
        setattr(cfg, key, value)
    rank1 = Runtime(mode, rank=1, world_size=2, device=torch.device("cpu"))
    with pytest.raises(UsageError, match=message):
        train(cfg, tmp_path / "x", runtime=rank1, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("argv", "ranks_get"),
    [
        (["train", "--nproc", "2", "--fsdp", "--out", "r"], ["train", "--fsdp", "--out", "r"]),
        (["train", "--nproc=2", "--out", "r"], ["train", "--out", "r"]),
        (["train", "--npr", "2", "--no-progress"], ["train", "--no-progress"]),  # argparse's abbreviation
    ],
)
def test_nproc_is_left_out_of_the_ranks_arguments(argv: list[str], ranks_get: list[str]) -> None:
    # torchrun's own parser would read --nproc as an ambiguous abbreviation of --nproc-per-node
    assert launch.without_nproc(argv) == ranks_get


@pytest.mark.parametrize(
    ("statuses", "torchrun_code", "want"), [([2, 2], 1, 2), ([0, 1], 1, 1), ([], 1, 1), ([], 0, 0)]
)
def test_nproc_parent_returns_the_ranks_status(
    monkeypatch: pytest.MonkeyPatch, statuses: list[int], torchrun_code: int, want: int
) -> None:
    """torchrun exits 1 whatever its ranks returned; the parent reports theirs (2: bad input)."""
    seen: list[list[str]] = []

    def fake_torchrun(cmd: list[str], env: dict[str, str]) -> int:
        seen.append(cmd)
        for rank, code in enumerate(statuses):
            Path(env[launch.STATUS_DIR], f"rank{rank}").write_text(str(code), encoding="ascii")
        return torchrun_code

    monkeypatch.setattr(launch.subprocess, "call", fake_torchrun)
    assert launch.relaunch(2, ["train", "--nproc", "2", "--fsdp"]) == want
    assert seen[0][:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert seen[0][-4:] == ["-m", "spam_lowmem.cli", "train", "--fsdp"]
