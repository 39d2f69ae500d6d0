"""The ``spam-lowmem`` command line on a micro LLaMA (hidden 32, 2 layers, vocab 384, seq 32):
smoke runs per optimizer, bit-exact resume, bad input, and ``compare`` outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spam_lowmem
from spam_lowmem.cli import main
from spam_lowmem.train.errors import UsageError
from spam_lowmem.train.optimizers import supports_density

NEEDS = {"galore": "galore_torch", "adam-mini": "adam_mini", "bnb-adamw8bit": "bitsandbytes"}


def micro_args(corpus: Path, cache: Path, out: Path, optimizer: str = "adamw", steps: int = 3) -> list[str]:
    return [
        "train",
        "--optimizer",
        optimizer,
        "--model",
        "micro",
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--vocab-size",
        "384",
        "--warmup",
        "2",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--device",
        "cpu",
        "--data",
        str(corpus),
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        "--no-progress",
        "--seed",
        "7",
        "--threads",
        "1",
    ]


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.mark.parametrize("optimizer", ["adamw", "spam", "stable-spam", "galore", "adam-mini", "bnb-adamw8bit"])
def test_train_smoke(optimizer: str, corpus: Path, cache: Path, tmp_path: Path) -> None:
    if optimizer in NEEDS:
        pytest.importorskip(NEEDS[optimizer])
    out = tmp_path / "run"
    assert main(micro_args(corpus, cache, out, optimizer)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 3 and summary["optimizer"] == optimizer
    assert 0 < summary["final_eval_loss"] < 7
    assert summary["optimizer_state_bytes"] > 0
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    assert [r["step"] for r in records(out, "eval")] == [2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == optimizer and len(config["corpus_sha256"]) == 64
    assert (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "spam", "spam-sparse"])
def test_resume_is_bit_exact(optimizer: str, corpus: Path, cache: Path, tmp_path: Path) -> None:
    extra = []
    if optimizer == "spam-sparse":
        if not supports_density():
            pytest.skip("spam_lowmem.SPAM does not accept density= in this build")
        optimizer, extra = "spam", ["--density", "0.3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(micro_args(corpus, cache, whole, optimizer, steps=6) + extra) == 0
    assert main(micro_args(corpus, cache, split, optimizer, steps=6) + extra + ["--stop-after", "3"]) == 0
    assert not (split / "summary.json").exists() and len(records(split, "train")) == 3
    assert main(micro_args(corpus, cache, split, optimizer, steps=6) + extra + ["--resume"]) == 0
    for kind in ("train", "eval"):
        assert [r["loss"] for r in records(split, kind)] == [r["loss"] for r in records(whole, kind)]
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(split / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_input_exits_cleanly(corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    base = micro_args(corpus, cache, out)
    _fails(capsys, [a if a != "adamw" else "adamz" for a in base], "invalid choice: 'adamz'")
    _fails(capsys, base + ["--optimizer", "spam", "--budget", "lots"], "cannot parse --budget")
    if not hasattr(spam_lowmem, "plan"):
        _fails(capsys, base + ["--optimizer", "spam", "--budget", "1GiB"], "not available in this build")
    _fails(capsys, base + ["--state-bits", "8"], "only apply to spam and stable-spam")
    _fails(capsys, base + ["--data", str(tmp_path / "missing.txt")], "data path not found")
    (tmp_path / "empty.txt").write_text("\n\n")
    _fails(capsys, base + ["--data", str(tmp_path / "empty.txt")], "no text found")
    _fails(capsys, base + ["--seq-len", "65"], "exceeds the micro model's maximum of 64 positions")
    _fails(capsys, base + ["--steps", "0"], "argument --steps: must be an integer >= 1, got 0")
    if not supports_density():
        _fails(capsys, base + ["--optimizer", "spam", "--density", "0.3"], "does not accept density=")
    _fails(capsys, base + ["--resume"], "nothing to resume")
    assert not out.exists()


def test_run_folder_protection(corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(micro_args(corpus, cache, out, steps=2)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _fails(capsys, micro_args(corpus, cache, out, steps=2), "is not empty")
    _fails(capsys, micro_args(corpus, cache, out, steps=4) + ["--resume"], "steps: 2 -> 4")
    _fails(capsys, micro_args(corpus, cache, out, "spam", steps=2) + ["--resume"], "optimizer: 'adamw' -> 'spam'")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(micro_args(corpus, cache, out, steps=2) + ["--resume"]) == 0  # finished: nothing to do
    assert main(micro_args(corpus, cache, out, "spam", steps=2) + ["--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["optimizer"] == "spam"
    # a finished run keeps its summary and never reads the checkpoint; without the summary it must
    (out / "summary.json").unlink()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _fails(capsys, micro_args(corpus, cache, out, "spam", steps=2) + ["--resume"], "cannot resume from")


def test_density_flag_reaches_spam(corpus: Path, cache: Path, tmp_path: Path) -> None:
    if not supports_density():
        pytest.skip("spam_lowmem.SPAM does not accept density= in this build")
    out = tmp_path / "sparse"
    assert main(micro_args(corpus, cache, out, "spam") + ["--density", "0.3"]) == 0
    assert json.loads((out / "summary.json").read_text())["optimizer_kwargs"] == {"density": 0.3}


def test_module_entry_point_reports_errors(tmp_path: Path) -> None:
    # run from tmp_path: from the repository root `-m` would import the source tree, not the install
    proc = subprocess.run(
        [sys.executable, "-m", "spam_lowmem.cli", "train", "--optimizer", "sgd", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "invalid choice: 'sgd'" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_compare_writes_table_plots_and_jsonl(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    second = "spam-sparse" if supports_density() else "spam"  # the GaLore-matched density once supported
    argv = [
        "compare",
        "--optimizers",
        f"adamw,{second}",
        "--model",
        "micro",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--vocab-size",
        "384",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--device",
        "cpu",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--no-progress",
        "--lr-for",
        f"{second}=0.002",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    for name in ("results.md", "results.csv", "results.jsonl", "loss_curves.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["adamw", second] and rows[1]["lr"] == 0.002
    assert all(r["final_eval_loss"] > 0 and r["optimizer_state_bytes"] > 0 for r in rows)
    assert all(r["peak_memory_bytes"] is not None for r in rows)
    md = (out / "results.md").read_text()
    assert "| adamw | 0.003 |" in md and "Unigram baseline" in md and "loss_curves.png" in md
    assert len(records(out / "runs" / second, "train")) == 3
    if second == "spam-sparse":
        assert rows[1]["optimizer_kwargs"] == {"density": pytest.approx(0.3214285714)}  # micro, GaLore rank 8
        assert rows[1]["optimizer_state_bytes"] < rows[0]["optimizer_state_bytes"]
    assert main(argv[:1] + ["--optimizers", "adamw,nadam", "--out", str(out)]) == 2


def test_optimizer_keywords_pass_through(
    corpus: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--density / --state-bits / --budget reach SPAM as keywords, only when given (a stand-in
    SPAM that accepts them is patched in, so this runs before the real options exist)."""
    seen: list[dict] = []

    class KeywordSPAM(spam_lowmem.SPAM):
        def __init__(
            self, params, lr: float = 1e-3, *, density: float | None = None, state_bits: int | None = None, **kwargs
        ) -> None:
            params = list(params)
            seen.append(
                {
                    "density": density,
                    "state_bits": state_bits,
                    "group_densities": [g.get("density") for g in params if isinstance(g, dict)],
                }
            )
            if state_bits == 4:
                raise ValueError("state_bits must be 8 or 32")
            super().__init__(params, lr=lr, **kwargs)

    monkeypatch.setattr(spam_lowmem, "SPAM", KeywordSPAM)
    args = micro_args(corpus, cache, tmp_path / "a", "spam", steps=1)
    assert main(args) == 0
    assert seen[-1] == {"density": None, "state_bits": None, "group_densities": []}
    assert (
        main(micro_args(corpus, cache, tmp_path / "b", "spam", steps=1) + ["--density", "0.25", "--state-bits", "8"])
        == 0
    )
    assert seen[-1] == {"density": 0.25, "state_bits": 8, "group_densities": [None, 1.0]}
    monkeypatch.setattr(spam_lowmem, "plan", lambda model, budget: {"state_bits": 4}, raising=False)
    _fails(
        capsys,
        micro_args(corpus, cache, tmp_path / "c", "spam", steps=1) + ["--budget", "1GiB"],
        "SPAM rejected its settings (state_bits=4): state_bits must be 8 or 32",
    )
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(spam_lowmem, "plan", lambda model, budget: {"state_bits": 8}, raising=False)
    assert main(micro_args(corpus, cache, tmp_path / "d", "spam", steps=1) + ["--budget", "1GiB"]) == 0
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["optimizer_kwargs"] == {"state_bits": 8}


# ---- 4-bit training (docs/algorithms.md §5): --weight-bits 4, compare --four-bit


@pytest.mark.parametrize("fmt,storage", [("int4", "fake"), ("fp4", "fake"), ("int4", "packed")])
def test_train_4bit_smoke(fmt: str, storage: str, corpus: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4"
    argv = micro_args(corpus, cache, out, "stable-spam") + [
        "--weight-bits",
        "4",
        "--quant-format",
        fmt,
        "--weight-storage",
        storage,
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and 0 < summary["final_eval_loss"] < 7
    quant = summary["quantization"]
    n = quant.pop("projection_weights")
    nbytes = quant.pop("projection_weight_bytes")
    fused = quant.pop("fused_step", None)
    assert quant == {
        "weight_bits": 4,
        "act_bits": 4,
        "format": fmt,
        "storage": storage,
        "group_size": 256,
        "layers": 14,
    }
    if storage == "packed":  # nibbles + per-group metadata, stepped by the fused kernel
        assert nbytes == n // 2 + (n // 256) * (5 if fmt == "int4" else 16) and fused is True
    else:  # the fp32 master weight
        assert nbytes == 4 * n and fused is None
    config = json.loads((out / "config.json").read_text())
    assert (config["weight_bits"], config["quant_format"], config["weight_storage"], config["quant_group_size"]) == (
        4,
        fmt,
        storage,
        256,
    )
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (key + "_codes" in state) == (storage == "packed")
    # fake storage keeps the full weight; packed storage keeps an empty placeholder under the
    # same key, so that a plain Linear / from_pretrained load of it fails loudly
    assert (state[key].numel() == 0) == (storage == "packed")


def test_train_16bit_config_and_group_fallback(corpus: Path, cache: Path, tmp_path: Path) -> None:
    from spam_lowmem.train.loop import effective_group_size

    out = tmp_path / "w16"
    assert main(micro_args(corpus, cache, out, steps=1)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["weight_bits"] == 16 and config["quant_format"] is None
    assert json.loads((out / "summary.json").read_text())["quantization"] is None
    # micro projections hold 1024 and 2816 elements: 384 divides neither, 256 divides both
    assert effective_group_size(384, [1024, 2816]) == 256 and effective_group_size(64, [1024]) == 64
    with pytest.raises(UsageError, match="no power-of-two group size"):
        effective_group_size(256, [1024, 1023])
    out = tmp_path / "g"
    assert main(micro_args(corpus, cache, out, steps=1) + ["--weight-bits", "4", "--quant-group-size", "384"]) == 0
    assert json.loads((out / "summary.json").read_text())["quantization"]["group_size"] == 256


@pytest.mark.parametrize("storage", ["fake", "packed"])
def test_resume_4bit_is_bit_exact(
    storage: str, corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--weight-bits", "4", "--weight-storage", storage]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(micro_args(corpus, cache, whole, "spam", steps=6) + extra) == 0
    assert main(micro_args(corpus, cache, split, "spam", steps=6) + extra + ["--stop-after", "3"]) == 0
    _fails(capsys, micro_args(corpus, cache, split, "spam", steps=6) + ["--resume"], "weight_bits: 4 -> 16")
    _fails(
        capsys,
        micro_args(corpus, cache, split, "spam", steps=6) + extra + ["--quant-format", "fp4", "--resume"],
        "quant_format: 'int4' -> 'fp4'",
    )
    assert main(micro_args(corpus, cache, split, "spam", steps=6) + extra + ["--resume"]) == 0
    for kind in ("train", "eval"):
        assert [r["loss"] for r in records(split, kind)] == [r["loss"] for r in records(whole, kind)]
    a = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_4bit_bad_input(corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    base = micro_args(corpus, cache, out)
    _fails(capsys, base + ["--weight-bits", "3"], "invalid choice: 3")
    _fails(capsys, base + ["--weight-bits", "4", "--quant-format", "nf4"], "invalid choice: 'nf4'")
    _fails(capsys, base + ["--weight-bits", "4", "--weight-storage", "disk"], "invalid choice: 'disk'")
    _fails(capsys, base + ["--quant-format", "fp4"], "only apply to 4-bit training")
    _fails(
        capsys,
        base + ["--weight-bits", "4", "--quant-group-size", "1"],
        "argument --quant-group-size: must be an integer >= 2, got 1",
    )
    assert not out.exists()
    _fails(
        capsys,
        ["compare", "--model", "micro", "--out", str(out), "--quant-format", "fp4"],
        "only apply to 4-bit training",
    )
    assert not out.exists()


def test_compare_four_bit(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp4"
    argv = [
        "compare",
        "--four-bit",
        "--model",
        "micro",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--vocab-size",
        "384",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--device",
        "cpu",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
        "--lr-for",
        "adamw-16bit=0.002",
    ]
    assert main(argv) == 0
    for name in ("results.md", "results.csv", "results.jsonl", "loss_curves.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["adamw w4a4", "spam w4a4", "stable-spam w4a4", "adamw 16-bit"]
    assert [r["name"] for r in rows] == ["adamw-w4a4", "spam-w4a4", "stable-spam-w4a4", "adamw-16bit"]
    assert [r["quantization"] and r["quantization"]["format"] for r in rows] == ["int4"] * 3 + [None]
    assert [r["lr"] for r in rows] == [0.003, 0.003, 0.003, 0.002]
    assert all(r["final_eval_loss"] > 0 and r["steps"] == 2 for r in rows)
    md = (out / "results.md").read_text()
    assert "| stable-spam w4a4 | 0.003 |" in md and "| adamw 16-bit | 0.002 |" in md and "W4A4" in md


# ---- resume after an interruption: torn metrics, finished runs, --stop-after


def _losses(out: Path) -> list[tuple[str, int, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [(r["type"], r["step"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.parametrize(
    "torn",
    [
        b'{"type": "train", "step": 3, "lo',  # cut inside a record
        b"\x00" * 24,  # zero fill a file system can leave at a power loss
        b'{"type": "eval", "step": 4, "loss": 5.\xe2\x80',
    ],
)  # cut in a UTF-8 character
def test_resume_drops_a_torn_last_metrics_line(
    torn: bytes, corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(micro_args(corpus, cache, whole, steps=4)) == 0
    assert main(micro_args(corpus, cache, split, steps=4) + ["--stop-after", "2"]) == 0
    with open(split / "metrics.jsonl", "ab") as fh:
        fh.write(torn)
    capsys.readouterr()
    assert main(micro_args(corpus, cache, split, steps=4) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"{split / 'metrics.jsonl'}: dropped a torn last line (line 4, {len(torn)} bytes" in err, err
    # the torn bytes are gone and the file is what an uninterrupted run writes
    raw = (split / "metrics.jsonl").read_bytes()
    assert raw.endswith(b"}\n") and b"\x00" not in raw and raw.count(b"\n") == 6  # 4 train + 2 eval
    assert _losses(split) == _losses(whole)
    assert [r["step"] for r in records(split, "train")] == [1, 2, 3, 4]


def test_resume_refuses_a_damaged_middle_metrics_line(
    corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(micro_args(corpus, cache, out, steps=4) + ["--stop-after", "2"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # train 1, train 2, eval 2
    lines[1] = lines[1][:20]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _fails(
        capsys,
        micro_args(corpus, cache, out, steps=4) + ["--resume"],
        f"{out / 'metrics.jsonl'}: line 2 of 3 is damaged",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing written


def test_resume_of_a_finished_run_keeps_its_summary(
    corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(micro_args(corpus, cache, out, steps=2)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_seconds"] > 0 and summary["tokens_per_second"] > 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(micro_args(corpus, cache, out, steps=2) + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "already finished (2 of 2 steps); its summary.json is kept" in captured.err
    assert f"eval loss {summary['final_eval_loss']:.4f}" in captured.out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the run finished but its summary was lost (power loss before it was written): the new one
    # takes the training time of the run from its metrics instead of zero seconds
    (out / "summary.json").unlink()
    assert main(micro_args(corpus, cache, out, steps=2) + ["--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    seconds = sum(r["seconds"] for r in records(out, "train"))
    assert again["train_seconds"] == pytest.approx(seconds) and seconds > 0
    assert again["tokens_per_second"] == pytest.approx(2 * 4 * 32 / seconds)
    assert again["final_eval_loss"] == summary["final_eval_loss"] and again["steps"] == 2


def test_stop_after_is_checked(corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from spam_lowmem.train.config import TrainConfig
    from spam_lowmem.train.loop import train

    out = tmp_path / "run"
    for value, shown in (("0", "0"), ("-1", "-1"), ("1.5", "'1.5'"), ("x", "'x'")):
        _fails(
            capsys,
            micro_args(corpus, cache, out, steps=4) + ["--stop-after", value],
            f"argument --stop-after: must be an integer >= 1, got {shown}",
        )
    assert not out.exists()
    with pytest.raises(UsageError, match="--stop-after must be >= 1, got 0"):  # the Python entry point too
        train(TrainConfig(model="micro", steps=4), out, stop_after=0)
    assert not out.exists()
    assert main(micro_args(corpus, cache, out, steps=4) + ["--stop-after", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # STEP counts from the start of the run: the run is already there, so no update is due
    _fails(
        capsys,
        micro_args(corpus, cache, out, steps=4) + ["--stop-after", "2", "--resume"],
        "--stop-after 2: the run in",
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(micro_args(corpus, cache, out, steps=4) + ["--stop-after", "3", "--resume"]) == 0
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]


@pytest.mark.parametrize(
    "flag,value,minimum",
    [
        ("--steps", "-5", 1),
        ("--batch-size", "0", 1),
        ("--grad-accum", "0", 1),
        ("--grad-accum", "-2", 1),
        ("--seq-len", "0", 2),
        ("--seq-len", "1", 2),
        ("--vocab-size", "0", 258),
        ("--vocab-size", "257", 258),
        ("--warmup", "-1", 0),
        ("--eval-every", "-1", 0),
        ("--eval-batches", "-1", 0),
        ("--save-every", "-1", 0),
        ("--galore-rank", "0", 1),
        ("--galore-gap", "0", 1),
        ("--threads", "0", 1),
        ("--seed", "-1", 0),
    ],
)
def test_integer_flags_are_checked_by_argparse(
    flag: str, value: str, minimum: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    bound = "in [0, 4294967295]" if flag == "--seed" else f">= {minimum}"
    message = f"argument {flag}: must be an integer {bound}, got {value}"
    _fails(capsys, ["train", "--model", "micro", "--out", str(out), flag, value], message)
    if flag != "--save-every":  # a train-only flag
        _fails(capsys, ["compare", "--model", "micro", "--out", str(out), flag, value], message)
    assert not out.exists()


def test_density_rank_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    # 0 used to read as "not given" and print the default rank's density
    _fails(capsys, ["density", "--model", "micro", "--rank", "0"], "argument --rank: must be an integer >= 1, got 0")
    assert main(["density", "--model", "micro", "--rank", "8"]) == 0
    assert capsys.readouterr().out.strip() == "0.3214285714"


@pytest.mark.parametrize(
    "names,message",
    [
        ("", "--optimizers '' names no optimizer"),
        ("  ", "--optimizers '  ' names no optimizer"),
        (",", "empty name at position 1"),
        ("adamw,,spam", "empty name at position 2"),
        ("adamw,", "empty name at position 2"),
        ("adamw, nadam", "unknown optimizer(s) 'nadam'"),
    ],
)
def test_compare_optimizer_names_are_checked(
    names: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    # a missing --data would stop the default set too, with another message, if the names passed
    argv = [
        "compare",
        "--model",
        "micro",
        "--out",
        str(out),
        "--data",
        str(tmp_path / "missing.txt"),
        "--optimizers",
        names,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "choose from adamw, spam, stable-spam, galore, adam-mini, bnb-adamw8bit, spam-sparse" in err, err
    assert not out.exists()


def test_compare_lr_for_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    for lr in ("0", "-1e-3", "nan"):
        _fails(
            capsys,
            [
                "compare",
                "--optimizers",
                "adamw",
                "--lr-for",
                f"adamw={lr}",
                "--out",
                str(out),
                "--data",
                str(tmp_path / "missing.txt"),
            ],
            "the learning rate must be a positive number",
        )
    assert not out.exists()


def test_train_budget_needs_a_unit(
    corpus: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    base = micro_args(corpus, cache, out, "spam")
    _fails(capsys, base + ["--budget", "1.5"], "cannot parse --budget '1.5': no unit")
    _fails(capsys, base + ["--budget", "1.5B"], "a fractional number of bytes")
    _fails(capsys, base + ["--budget", "0GiB"], "the size must be positive")
    _fails(capsys, base + ["--budget", "2XB"], "unknown unit 'XB'")
    assert not out.exists()
