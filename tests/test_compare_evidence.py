"""``compare`` as evidence: --tune-lr on a validation split, seed spread, the paper-small preset,
per-step spike counts and gradient norms, --stress, and bad input. Micro model, a few steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from spam_lowmem import SPAM
from spam_lowmem.cli import build_parser, main
from spam_lowmem.train import data as D
from spam_lowmem.train.loop import WarmupCosine
from spam_lowmem.train.model import build_model, get_spec
from spam_lowmem.train.presets import PRESETS, complete_warmups, resets_in_run
from spam_lowmem.train.tuning import comparison_sentence, pick_best, seed_stats

MICRO = ["--model", "micro", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "384", "--device", "cpu"]


def _compare(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["compare", *MICRO, "--data", str(corpus), "--out", str(out), "--no-progress", "--threads", "1", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tuned(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tuned compare: spam, a 2-rate grid, 2 seeds, 4 steps (3 child runs, the grid's best reused)."""
    out = tmp_path_factory.mktemp("tuned")
    argv = _compare(corpus, out, "--optimizers", "spam", "--steps", "4", "--eval-batches", "2")
    assert main([*argv, "--overwrite", "--tune-lr", "--lr-grid", "1e-3,1e-2", "--seeds", "0,1"]) == 0
    return out


def test_tune_lr_picks_the_lowest_validation_loss(tuned: Path) -> None:
    lines = _lines(tuned / "results.jsonl")
    agg = [r for r in lines if r["record"] == "optimizer"]
    runs = [r for r in lines if r["record"] == "run"]
    assert [a["name"] for a in agg] == ["spam"]
    grid = [r for r in runs if r["role"].startswith("grid")]
    assert sorted(r["lr"] for r in grid) == [1e-3, 1e-2]
    # oracle from its own records: the chosen rate has the lowest recorded validation loss
    best = min(grid, key=lambda r: r["final_val_loss"])
    assert agg[0]["lr"] == best["lr"]
    assert {g["lr"]: g["val_loss"] for g in agg[0]["grid"]} == {r["lr"]: r["final_val_loss"] for r in grid}
    # the validation loss is not the held-out loss (different sequences)
    assert all(r["final_val_loss"] != r["final_eval_loss"] for r in grid)
    finals = [r for r in runs if r["role"] in ("final", "grid+final")]
    assert sorted(r["seed"] for r in finals) == [0, 1] and all(r["lr"] == best["lr"] for r in finals)
    # the seed spread is reported: mean, min, max and std of the two held-out losses
    losses = [r["final_eval_loss"] for r in finals]
    assert agg[0]["eval_loss_mean"] == pytest.approx(sum(losses) / 2)
    assert (agg[0]["eval_loss_min"], agg[0]["eval_loss_max"]) == (min(losses), max(losses))
    assert agg[0]["eval_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
    md = (tuned / "results.md").read_text()
    assert "grid: lr -> validation loss" in md and "std" in md and "Momentum resets" in md
    assert (tuned / "results.csv").read_text().startswith("label,lr,eval_loss_mean")
    for name in ("spikes.png", "loss_curves.png", "memory.png", "runs.csv"):
        assert (tuned / name).stat().st_size > 0, name


def test_validation_is_apart_from_held_out_and_training(corpus: Path, tuned: Path) -> None:
    c = D.prepare_corpus([str(corpus)], 384, tuned / "cache")
    train, val = D.split_validation(D.pack(c.train_tokens, 32), 0.05)
    held = np.concatenate([b.numpy() for b in D.eval_batches(D.pack(c.eval_tokens, 32), 4, 0)])
    assert len(val) == math.ceil(0.05 * (len(train) + len(val)))
    as_set = lambda a: {row.tobytes() for row in a.astype(np.int64)}  # noqa: E731
    assert not as_set(val) & as_set(held)
    assert not as_set(val) & as_set(train)


def test_metrics_carry_grad_norm_and_spike_counts_matching_a_replica(corpus: Path, tmp_path: Path) -> None:
    """The logged grad norm and clipped counts equal an independent in-process replica of the run."""
    out, steps = tmp_path / "run", 24  # past SPAM's clip_delay of 20, so clipping is live
    argv = ["train", "--optimizer", "spam", *MICRO, "--steps", str(steps), "--data", str(corpus), "--out", str(out)]
    assert main([*argv, "--no-progress", "--threads", "1", "--eval-every", "0", "--save-every", "0"]) == 0
    recs = [r for r in _lines(out / "metrics.jsonl") if r["type"] == "train"]
    assert all("grad_norm" in r and "clipped" in r and "nonfinite" in r for r in recs)
    assert sum(r["clipped"] for r in recs) > 0  # the comparison below is not one of zeros only

    c = D.prepare_corpus([str(corpus)], 384, out / "cache")
    stream = D.BatchStream(D.pack(c.train_tokens, 32), 4, 0)
    model = build_model(get_spec("micro"), c.vocab_size, seed=0, device=torch.device("cpu"))
    opt = SPAM(model.parameters(), lr=get_spec("micro").lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(max(1, steps // 10), steps, 0.1))
    for k in range(steps):
        x = stream.batch(k)
        model(input_ids=x, labels=x).loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
        assert recs[k]["grad_norm"] == pytest.approx(float(norm), rel=1e-5), k
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        assert recs[k]["clipped"] == opt.spike_stats()["clipped"], k


def test_adamw_records_grad_norm_without_spike_counts(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "adam"
    argv = ["train", "--optimizer", "adamw", *MICRO, "--steps", "2", "--data", str(corpus), "--out", str(out)]
    assert main([*argv, "--no-progress", "--threads", "1", "--grad-clip", "0.5"]) == 0
    recs = [r for r in _lines(out / "metrics.jsonl") if r["type"] == "train"]
    assert all(r["grad_norm"] > 0 and "clipped" not in r for r in recs)


def test_stress_lr_multiplies_every_rate(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "stress"
    argv = _compare(corpus, out, "--optimizers", "adamw", "--steps", "2", "--eval-batches", "1", "--stress", "lr")
    assert main(argv) == 0
    (row,) = _lines(out / "results.jsonl")
    assert row["lr"] == pytest.approx(10 * get_spec("micro").lr)
    md = (out / "results.md").read_text()
    assert "stress `lr`" in md and ("did not diverge" in md or "diverged" in md)


def test_paper_small_preset_has_resets_and_warmups() -> None:
    p = PRESETS["paper-small"]
    assert resets_in_run(p["steps"], p["reset_interval"]) >= 2
    assert complete_warmups(p["steps"], p["reset_interval"], p["reset_warmup"]) >= 2
    args = build_parser(p).parse_args(["compare", "--steps", "500"])
    assert args.tune_lr and args.reset_interval == 180 and args.steps == 500  # a given flag wins
    assert resets_in_run(160, 500) == 0  # the default compare never resets SPAM


def test_pick_best_and_sentences() -> None:
    grid = [
        {"lr": 1e-3, "final_val_loss": 5.0},
        {"lr": 3e-3, "final_val_loss": 4.0},
        {"lr": 1e-2, "final_val_loss": float("nan")},
        {"lr": 3e-2, "final_val_loss": 1.0, "diverged": True},
    ]
    assert pick_best(grid)["lr"] == 3e-3
    assert pick_best([{"lr": 1e-3, "final_val_loss": None}]) is None
    a, b = seed_stats([4.0, 4.2]), seed_stats([4.1, 4.3])
    assert "does not beat" in comparison_sentence("spam", b, "adamw", a)
    assert "overlap" in comparison_sentence("spam", a, "adamw", b)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tune-lr", "--lr-grid", ""], "--lr-grid"),
        (["--tune-lr", "--lr-grid", "1e-3,-1e-3"], "not a positive learning rate"),
        (["--tune-lr", "--lr-grid", "1e-3,,3e-3"], "--lr-grid"),
        (["--lr-grid", "1e-3"], "only applies with --tune-lr"),
        (["--seeds", ""], "--seeds"),
        (["--seeds", "0,x"], "not an integer"),
        (["--seeds", "1,1"], "twice"),
        (["--tune-lr", "--val-fraction", "0"], "--val-fraction"),
    ],
)
def test_bad_evidence_input_exits_2(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", "--model", "micro", "--out", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
