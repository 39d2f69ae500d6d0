"""``spam-lowmem compare``: several optimizers, same data, seed, model init and token budget.

Each optimizer trains in its own ``python -m spam_lowmem.cli train`` process (folder
``OUT/runs/LABEL``), so its peak memory is its own (see :mod:`.memory`) and one failing
optimizer does not stop the others. The corpus is tokenized once into ``OUT/cache``.

Outputs in ``OUT``: ``results.md`` (summary and table), ``results.csv``, ``results.jsonl`` (one
line per optimizer), ``loss_curves.png``, ``memory.png``, ``spikes.png`` (loss, gradient norm and
spike-clipped entries per step, :mod:`.plots`), and each run's own folder.

As evidence (:mod:`.tuning`): ``--tune-lr`` picks each optimizer's rate from a grid on a
validation split of the training text, ``--seeds`` repeats the chosen runs, and the report gives
mean and spread over seeds; then runs live in ``runs/NAME/lrLR`` (grid) and ``runs/NAME/seedS``,
and ``runs.csv`` lists them. ``--preset`` (:mod:`.presets`) and ``--stress`` set up longer or
harsher comparisons.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import data as D
from . import tuning as T
from .config import TrainConfig
from .errors import UsageError
from .model import get_spec
from .optimizers import OPTIMIZER_NAMES, density_for_galore_rank, supports_density
from .plots import plot_spikes
from .presets import complete_warmups, resets_in_run
from .spikes import read_train_records, spike_sentence, spike_summary

__all__ = ["DEFAULT_SET", "SPARSE", "run_compare", "write_report"]

SPARSE = "spam-sparse"  # SPAM at the density matching GaLore's state memory (docs/algorithms.md §3, §6)
DEFAULT_SET = ("adamw", "spam", "stable-spam", "galore", "adam-mini", SPARSE)
#: ``--four-bit``: these with W4A4, plus the unquantised AdamW baseline (Stable-SPAM paper, §5)
FOUR_BIT_SET = ("adamw", "spam", "stable-spam")
BASELINE_16 = "adamw-16bit"
OUTPUTS = ("results.md", "results.csv", "results.jsonl", "loss_curves.png", "memory.png", "spikes.png")
EVIDENCE_OUTPUTS = ("runs.csv",)
#: ``--stress lr``: every learning rate times this
LR_STRESS = 10.0


def _parse_lr_for(items: list[str], names: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in names:
            raise UsageError(f"--lr-for {item!r}: {name!r} is not among the compared optimizers ({', '.join(names)})")
        try:
            lr = float(value)
        except ValueError:
            raise UsageError(f"--lr-for {item!r}: {value!r} is not a number") from None
        if not (math.isfinite(lr) and lr > 0):  # caught here, not as one failed run among the others
            raise UsageError(f"--lr-for {item!r}: the learning rate must be a positive number")
        out[name] = lr
    return out


def _select(spec_text: str | None, default: tuple[str, ...] = DEFAULT_SET) -> list[str]:
    """The optimizers of ``--optimizers`` (None: not given, ``default``), duplicates dropped.

    Only a missing flag means the default set: an empty or blank value, or an empty name in the
    list (``adamw,,spam``, a trailing comma), is most likely a shell variable that expanded to
    nothing, and running the six defaults for it would silently spend the time on other runs.
    """
    valid = OPTIMIZER_NAMES + (SPARSE,)
    choose = f"choose from {', '.join(valid)} (comma-separated)"
    if spec_text is None:
        return list(default)
    if not spec_text.strip():
        raise UsageError(
            f"--optimizers {spec_text!r} names no optimizer; {choose}, or leave out --optimizers "
            f"for the default set {','.join(default)}"
        )
    names = [n.strip() for n in spec_text.split(",")]
    if "" in names:
        raise UsageError(f"--optimizers {spec_text!r}: empty name at position {names.index('') + 1}; {choose}")
    bad = [n for n in names if n not in valid]
    if bad:
        raise UsageError(f"--optimizers {spec_text!r}: unknown optimizer(s) {', '.join(map(repr, bad))}; {choose}")
    return list(dict.fromkeys(names))


def _child_argv(cfg: TrainConfig, out: Path, cache: Path, extra: list[str], progress: bool, threads: int) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "spam_lowmem.cli",
        "train",
        "--optimizer",
        cfg.optimizer,
        "--model",
        cfg.model,
        "--steps",
        str(cfg.steps),
        "--batch-size",
        str(cfg.batch_size),
        "--grad-accum",
        str(cfg.grad_accum),
        "--seq-len",
        str(cfg.seq_len),
        "--lr",
        repr(cfg.lr),
        "--warmup",
        str(cfg.warmup),
        "--min-lr-ratio",
        repr(cfg.min_lr_ratio),
        "--grad-clip",
        repr(cfg.grad_clip),
        "--device",
        cfg.device,
        "--dtype",
        cfg.dtype,
        "--vocab-size",
        str(cfg.vocab_size),
        "--seed",
        str(cfg.seed),
        "--eval-every",
        str(cfg.eval_every),
        "--eval-batches",
        str(cfg.eval_batches),
        "--save-every",
        "0",
        "--galore-gap",
        str(cfg.galore_gap),
        "--galore-scale",
        repr(cfg.galore_scale),
        "--val-fraction",
        repr(cfg.val_fraction),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--overwrite",
        *extra,
    ]
    if cfg.galore_rank is not None:
        argv += ["--galore-rank", str(cfg.galore_rank)]
    if cfg.weight_bits == 4:
        argv += [
            "--weight-bits",
            "4",
            "--quant-format",
            str(cfg.quant_format),
            "--weight-storage",
            str(cfg.weight_storage),
            "--quant-group-size",
            str(cfg.quant_group_size),
        ]
    if cfg.data:
        argv += ["--data", *cfg.data]
    if not progress:
        argv.append("--no-progress")
    argv += ["--threads", str(threads)]
    return argv


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr without a file descriptor
        return None


def _run_dir_name(name: str, evidence: bool, role: str, lr: float, seed: int) -> str:
    """``runs/NAME`` for a plain compare (as before); grid and seed runs get their own sub-folders."""
    if not evidence:
        return name
    return f"{name}/lr{lr:g}" if role == "grid" else f"{name}/seed{seed}"


def _plan(args: argparse.Namespace, four_bit: bool) -> dict[str, Any]:
    """The evidence settings of the parsed arguments (grid, seeds, stress), checked; UsageError otherwise."""
    tune = bool(getattr(args, "tune_lr", False))
    grid_text = getattr(args, "lr_grid", None)
    if grid_text is not None and not tune:
        raise UsageError("--lr-grid only applies with --tune-lr")
    if getattr(args, "tune_steps", None) is not None and not tune:
        raise UsageError("--tune-steps only applies with --tune-lr")
    seeds_text = getattr(args, "seeds", None)
    if seeds_text is not None:
        seeds = T.parse_seeds(seeds_text)
    else:  # one seed shows no spread: tuning implies two
        seeds = [args.seed, args.seed + 1] if tune and args.seed < 2**32 - 1 else [args.seed]
    val_fraction = getattr(args, "val_fraction", None)
    if val_fraction is None:
        val_fraction = T.DEFAULT_VAL_FRACTION if tune else 0.0
    if tune and not val_fraction > 0:
        raise UsageError("--tune-lr picks the rate on the validation split: --val-fraction must be > 0")
    return {
        "tune": tune,
        "grid": T.parse_lr_grid(grid_text) if grid_text is not None else None,
        "seeds": seeds,
        "val_fraction": val_fraction,
        "tune_steps": getattr(args, "tune_steps", None),
        "stress": getattr(args, "stress", None),
        "evidence": tune or len(seeds) > 1,
        "four_bit": four_bit,
    }


def run_compare(args: argparse.Namespace, make_config: Callable[[argparse.Namespace, str], Any]) -> int:
    """Run the comparison described by the parsed ``compare`` arguments; returns the exit status."""
    t_start = time.perf_counter()
    if getattr(args, "stress", None) == "w4a4":  # the same switch as --four-bit, named as a stress
        args.four_bit = True
    four_bit = bool(getattr(args, "four_bit", False))
    names = _select(args.optimizers, FOUR_BIT_SET if four_bit else DEFAULT_SET)
    lr_for = _parse_lr_for(args.lr_for, names + ([BASELINE_16] if four_bit else []))
    plan = _plan(args, four_bit)
    args.seed = plan["seeds"][0]
    base: TrainConfig = make_config(args, "adamw")
    base.val_fraction = plan["val_fraction"]
    spec = get_spec(base.model)
    base.validate(spec.max_positions)
    out: Path = args.out
    if out.exists() and any(p.name != "cache" for p in out.iterdir()) and not args.overwrite:
        raise UsageError(f"output folder {out} is not empty; pass --overwrite to replace its results")
    rank = base.galore_rank or spec.galore_rank
    notes: list[str] = []
    if four_bit:
        notes.append(
            f"4-bit: every run except `adamw 16-bit` trains with W4A4 ({base.quant_format}, "
            f"{base.weight_storage} weight storage, group {base.quant_group_size} or the largest power of "
            "two below it dividing every weight) on the 7 projection linears per layer; lm_head, "
            "embeddings and norms unquantised; gradients unquantised (docs/algorithms.md §5). "
            "`adamw 16-bit` is the unquantised baseline at the same data, seed and steps"
        )
    if plan["stress"] == "lr":
        notes.append(
            f"stress `lr`: every learning rate (grid included) is {LR_STRESS:g} x its usual value, "
            "to provoke the loss spikes the papers attribute to Adam"
        )
    if SPARSE in names and not supports_density():
        notes.append(f"skipped {SPARSE}: spam_lowmem.SPAM in this build does not accept density= yet")
        print(f"note: {notes[-1]}", file=sys.stderr)
        names.remove(SPARSE)
    corpus = D.prepare_corpus(base.data or None, base.vocab_size, out / "cache")
    held = D.eval_batches(D.pack(corpus.eval_tokens, base.seq_len), base.batch_size, base.eval_batches)
    train_chunks, _ = D.split_validation(D.pack(corpus.train_tokens, base.seq_len), base.val_fraction)
    D.BatchStream(train_chunks, base.batch_size, base.seed)  # enough text?
    unigram = D.unigram_cross_entropy(corpus.train_tokens, held, corpus.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS + EVIDENCE_OUTPUTS:
        (out / name).unlink(missing_ok=True)
    corpus.save_cache()
    what = ", ".join(names) + (f" with W4A4 {base.quant_format}, and adamw 16-bit" if four_bit else "")
    print(
        f"compare: {what} on {corpus.source}; {base.model} model, {base.steps} steps x "
        f"{base.batch_size * base.grad_accum} x {base.seq_len} tokens; held-out {corpus.split}; "
        f"unigram baseline {unigram:.4f} nats/token",
        file=sys.stderr,
    )

    # PYTHONSAFEPATH: `python -m` would otherwise put the current directory first on sys.path,
    # and from a source checkout that shadows the installed package (which has the compiled core).
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "PYTHONSAFEPATH": "1"}
    runs = [(name, name) for name in names]  # (optimizer or spam-sparse, run name)
    if four_bit:
        runs = [(name, f"{name}-w4a4") for name in names] + [("adamw", BASELINE_16)]
    if (out / "runs").exists():
        shutil.rmtree(out / "runs")

    def run_one(opt_name: str, name: str, lr: float, seed: int, steps: int, role: str) -> dict[str, Any]:
        optimizer = "spam" if opt_name == SPARSE else opt_name
        cfg = make_config(args, optimizer)
        cfg.lr, cfg.seed, cfg.steps, cfg.val_fraction = lr, seed, steps, plan["val_fraction"]
        extra: list[str] = _reset_flags(args, optimizer)
        label = opt_name
        if opt_name == SPARSE:
            density = density_for_galore_rank(spec, rank)
            extra += ["--density", repr(density)]
            label = f"spam d={density:.3f}"
        if name == BASELINE_16:
            cfg.weight_bits, cfg.quant_format, cfg.weight_storage, cfg.quant_group_size = 16, None, None, None
            label = "adamw 16-bit"
        elif four_bit:
            label += " w4a4" if cfg.quant_format == "int4" else " w4a4 fp4"
        rel = _run_dir_name(name, plan["evidence"], role, lr, seed)
        run_dir = out / "runs" / rel
        t0 = time.perf_counter()
        argv = _child_argv(cfg, run_dir, out / "cache", extra, not args.no_progress, args.threads or 1)
        sys.stderr.flush()
        proc = subprocess.run(argv, env=env, stdout=_stderr_fd())  # our stdout carries only the table
        row: dict[str, Any] = {
            "name": name,
            "label": label,
            "lr": cfg.lr,
            "seed": seed,
            "role": role,
            "run_dir": f"runs/{rel}",
            "exit_code": proc.returncode,
            "process_seconds": time.perf_counter() - t0,
        }
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            row.update(json.loads(summary_path.read_text(encoding="utf-8")))
        else:
            print(f"compare: {name} failed (exit code {proc.returncode}); see the messages above", file=sys.stderr)
        if "final_eval_loss" in row:
            val = row.get("final_val_loss")
            print(
                f"compare: {label} lr {lr:g} seed {seed} ({role}): eval loss {row['final_eval_loss']:.4f}"
                + (f", validation loss {val:.4f}" if val is not None else "")
                + f", {row['process_seconds']:.0f} s",
                file=sys.stderr,
            )
        return row

    factor = LR_STRESS if plan["stress"] == "lr" else 1.0
    rows: list[dict[str, Any]] = []  # the runs reported: each optimizer's chosen rate, every seed
    grids: dict[str, list[dict[str, Any]]] = {}
    for opt_name, name in runs:
        center = lr_for.get(opt_name if name != BASELINE_16 else name, make_config(args, opt_name).lr)
        if not plan["tune"]:
            rows += [run_one(opt_name, name, center * factor, s, base.steps, "final") for s in plan["seeds"]]
            continue
        tune_steps = plan["tune_steps"] or base.steps
        rates = [lr * factor for lr in (plan["grid"] or T.default_grid(center))]
        grid = [run_one(opt_name, name, lr, plan["seeds"][0], tune_steps, "grid") for lr in rates]
        grids[name] = grid
        best = T.pick_best(grid)
        if best is None:
            print(f"compare: {name}: no grid rate finished with a finite validation loss", file=sys.stderr)
            continue
        for s in plan["seeds"]:
            if s == plan["seeds"][0] and tune_steps == base.steps:
                best["role"] = "grid+final"  # the same run: same rate, seed, steps and data
                rows.append(best)
            else:
                rows.append(run_one(opt_name, name, best["lr"], s, base.steps, "final"))
    total = time.perf_counter() - t_start
    table = write_report(out, rows, base, unigram, corpus, rank, total, notes, plan=plan, grids=grids, args=args)
    print(table)
    print(f"\ncompare: finished in {total:.0f} s; results in {out}/results.md", file=sys.stderr)
    tuned_away = any(name not in {r["name"] for r in rows} for name in grids)
    failed = tuned_away or not all("final_eval_loss" in r for r in rows)
    # under --stress a divergence is the measurement, not a failure of the command
    if plan["stress"] is None and any(r.get("diverged") for r in rows):
        failed = True
    return 1 if failed else 0


def _reset_flags(args: argparse.Namespace, optimizer: str) -> list[str]:
    """--reset-interval / --reset-warmup for the optimizers that take them (the SPAM family)."""
    flags: list[str] = []
    interval, warmup = getattr(args, "reset_interval", None), getattr(args, "reset_warmup", None)
    if optimizer in ("spam", "stable-spam") and interval is not None:
        flags += ["--reset-interval", str(interval)]
    if optimizer == "spam" and warmup is not None:
        flags += ["--reset-warmup", str(warmup)]
    return flags


def _mb(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f}"


def _table(rows: list[dict[str, Any]], unigram: float, with_seed: bool = False) -> str:
    head = (
        "| optimizer | lr | eval loss | eval ppl | vs unigram | optimizer state MB "
        "| weights+grads+state MB | peak memory MB | tokens/s | train s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if with_seed:
            r = {**r, "label": f"{r['label']} (seed {r['seed']})"}
        if "final_eval_loss" not in r:
            lines.append(f"| {r['label']} | {r['lr']:g} | failed (exit {r['exit_code']}) | | | | | | | |")
            continue
        loss = r["final_eval_loss"]
        flag = " (diverged)" if r.get("diverged") else ""
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {loss:.4f}{flag} | {r['final_eval_ppl']:.2f} | "
            f"{loss - unigram:+.3f} | {_mb(r['optimizer_state_bytes'])} | "
            f"{_mb(2 * r['parameter_bytes'] + r['optimizer_state_bytes'])} | {_mb(r['peak_memory_bytes'])} | "
            f"{r['tokens_per_second'] or 0:.0f} | {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def _curves(out: Path, row: dict[str, Any]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    path = out / row.get("run_dir", f"runs/{row['name']}") / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec["type"] in ("train", "eval"):
                (train if rec["type"] == "train" else evals).append((rec["tokens"], rec["loss"]))
    return train, evals


def _plots(out: Path, rows: list[dict[str, Any]], unigram: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(_first_seed(rows)):
        train, evals = _curves(out, r)
        color = f"C{i}"
        if train:
            smooth, ema = [], train[0][1]
            for _, loss in train:
                ema = 0.9 * ema + 0.1 * loss if math.isfinite(loss) else loss
                smooth.append(ema)
            ax.plot([t for t, _ in train], smooth, color=color, alpha=0.6, label=f"{r['label']} train (EMA)")
        if evals:
            ax.plot([t for t, _ in evals], [v for _, v in evals], "o-", color=color, label=f"{r['label']} eval")
    ax.axhline(unigram, color="gray", linestyle="--", label="unigram baseline")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss curves (same data, seed and token budget)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    done = [r for r in rows if "final_eval_loss" in r]
    labels = [r["label"] for r in done]
    exact = {
        "optimizer state": [r["optimizer_state_bytes"] / 2**20 for r in done],
        "weights+grads+state": [(2 * r["parameter_bytes"] + r["optimizer_state_bytes"]) / 2**20 for r in done],
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, (name, values) in enumerate(exact.items()):
        bars = left.bar([x + (k - 0.5) * 0.4 for x in range(len(done))], values, width=0.4, label=name)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_title("Counted from the tensors (MB)")
    bars = right.bar(range(len(done)), [(r["peak_memory_bytes"] or 0) / 2**20 for r in done], color="C2")
    right.bar_label(bars, fmt="%.0f", fontsize=7)
    right.set_title("Measured peak memory (MB)")
    for ax in (left, right):
        ax.set_xticks(range(len(done)), labels, rotation=20, fontsize=8)
        ax.set_ylabel("MB")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)


def _first_seed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per optimizer (its first seed) for the curve plots: same data order and init for all."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["name"], r)
    return list(seen.values())


def _aggregates(rows: list[dict[str, Any]], grids: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per optimizer: the chosen rate, held-out loss statistics over seeds, the grid's validation losses."""
    out: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        losses = [r["final_eval_loss"] for r in mine if "final_eval_loss" in r and not r.get("diverged")]
        stats = T.seed_stats(losses)
        out.append(
            {
                "record": "optimizer",
                "name": name,
                "label": mine[0]["label"],
                "lr": mine[0]["lr"],
                "seeds": [r["seed"] for r in mine],
                "diverged_runs": sum(bool(r.get("diverged")) for r in mine),
                "failed_runs": sum("final_eval_loss" not in r for r in mine),
                **{f"eval_loss_{k}": v for k, v in stats.items() if k != "n"},
                "n_finished": stats["n"],
                "grid": [
                    {"lr": g["lr"], "val_loss": g.get("final_val_loss"), "diverged": g.get("diverged")}
                    for g in grids.get(name, [])
                ],
            }
        )
    return out


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def _evidence_section(
    aggs: list[dict[str, Any]], plan: dict[str, Any], base: TrainConfig, args: argparse.Namespace | None
) -> str:
    head = (
        "| optimizer | chosen lr | held-out loss mean | std | min | max | seeds | diverged "
        "| grid: lr -> validation loss |"
    )
    lines = [head, "|" + "---|" * 9]
    for a in aggs:
        grid = ", ".join(f"{g['lr']:g} -> {'diverged' if g['diverged'] else _fmt(g['val_loss'])}" for g in a["grid"])
        lines.append(
            f"| {a['label']} | {a['lr']:g} | {_fmt(a['eval_loss_mean'])} | {_fmt(a['eval_loss_std'])} | "
            f"{_fmt(a['eval_loss_min'])} | {_fmt(a['eval_loss_max'])} | {','.join(map(str, a['seeds']))} | "
            f"{a['diverged_runs']} | {grid or 'not tuned'} |"
        )
    by_name = {a["name"]: a for a in aggs}
    suffix = "-w4a4" if plan["four_bit"] else ""
    sentences: list[str] = []
    adam = by_name.get("adamw" + suffix)
    for a in aggs:
        if adam is None or a is adam or a["name"] == BASELINE_16:
            continue

        def stats(x: dict[str, Any]) -> dict[str, Any]:
            return {"n": x["n_finished"], **{k: x[f"eval_loss_{k}"] for k in ("mean", "min", "max", "std")}}

        sentences.append(T.comparison_sentence(a["label"], stats(a), adam["label"], stats(adam)))
    how = (
        f"Each optimizer's rate was chosen on the validation split ({plan['val_fraction']:g} of the packed "
        f"training sequences, the end of the training text; never the held-out split) from "
        f"{'the grid ' + ','.join(f'{x:g}' for x in plan['grid']) if plan['grid'] else 'its rate x (1/3, 1, 3)'} "
        f"at seed {plan['seeds'][0]}, {plan['tune_steps'] or base.steps} steps per grid run; the reported "
        f"held-out losses are the runs at the chosen rate, one per seed ({','.join(map(str, plan['seeds']))})."
        if plan["tune"]
        else f"No rate tuning; one run per seed ({','.join(map(str, plan['seeds']))})."
    )
    text = "## At each optimizer's best rate, over seeds\n\n" + how + "\n\n" + "\n".join(lines) + "\n\n"
    if sentences:
        text += "Measured, not claimed beyond these runs:\n\n" + "".join(f"- {t}\n" for t in sentences)
    return text


def _reset_section(base: TrainConfig, args: argparse.Namespace | None, names: list[str]) -> str:
    """Which momentum resets happened (SPAM family), from the settings the runs used."""
    from .. import SPAM, StableSPAM

    interval = getattr(args, "reset_interval", None)
    warmup = getattr(args, "reset_warmup", None)
    parts = []
    if any(n.startswith("spam") for n in names):
        dt = interval if interval is not None else SPAM.SETTINGS.reset_interval
        n_w = warmup if warmup is not None else SPAM.SETTINGS.warmup_steps
        parts.append(
            f"SPAM reset_interval {dt}, post-reset warmup {n_w}: {resets_in_run(base.steps, dt)} reset(s) in "
            f"{base.steps} steps, {complete_warmups(base.steps, dt, n_w)} with the warmup complete"
        )
    if any(n.startswith("stable-spam") for n in names):
        dt = interval if interval is not None else StableSPAM.SETTINGS.reset_interval
        parts.append(f"Stable-SPAM reset_interval {dt}: {resets_in_run(base.steps, dt)} reset(s)")
    return "- Momentum resets: " + "; ".join(parts) + ".\n" if parts else ""


def _spike_section(out: Path, rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        records = read_train_records(out / r["run_dir"] / "metrics.jsonl") if "run_dir" in r else []
        label = f"{r['label']} (lr {r['lr']:g}, seed {r.get('seed', 0)})"
        lines.append(spike_sentence(label, spike_summary(records)))
    return "## Spikes (measured)\n\n" + "".join(f"- {t}\n" for t in lines) + "\n![spikes](spikes.png)\n"


def write_report(
    out: Path,
    rows: list[dict[str, Any]],
    base: TrainConfig,
    unigram: float,
    corpus: D.Corpus,
    rank: int,
    total_seconds: float,
    notes: list[str] | None = None,
    *,
    plan: dict[str, Any] | None = None,
    grids: dict[str, list[dict[str, Any]]] | None = None,
    args: argparse.Namespace | None = None,
) -> str:
    """Write results.{md,csv,jsonl} and the plots; returns the markdown table.

    A plain compare writes one results.jsonl/csv line per run, as before. With ``--tune-lr`` or
    several seeds (``plan["evidence"]``), results.jsonl holds one ``"record": "optimizer"`` line
    per optimizer (chosen rate, seed statistics, grid) and then one ``"record": "run"`` line per
    run (grid runs included); results.csv holds the per-optimizer lines and runs.csv the runs.
    """
    grids = grids or {}
    evidence = bool(plan and plan["evidence"])
    aggs = _aggregates(rows, grids) if evidence else []
    all_runs = rows + [g for grid in grids.values() for g in grid if g not in rows]
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for a in aggs:
            fh.write(json.dumps(a) + "\n")
        for r in all_runs if evidence else rows:
            fh.write(json.dumps({"record": "run", **r} if evidence else r) + "\n")
    if evidence:
        agg_fields = ["label", "lr", "eval_loss_mean", "eval_loss_std", "eval_loss_min", "eval_loss_max"]
        with open(out / "results.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*agg_fields, "n_finished", "diverged_runs", "seeds", "grid"])
            writer.writeheader()
            for a in aggs:
                grid = " ".join(f"{g['lr']:g}:{_fmt(g['val_loss'])}" for g in a["grid"])
                writer.writerow(
                    {
                        **{k: a[k] for k in agg_fields},
                        "n_finished": a["n_finished"],
                        "diverged_runs": a["diverged_runs"],
                        "seeds": " ".join(map(str, a["seeds"])),
                        "grid": grid,
                    }
                )
    fields = [
        "label",
        "lr",
        "final_eval_loss",
        "final_eval_ppl",
        "optimizer_state_bytes",
        "parameter_bytes",
        "peak_memory_bytes",
        "tokens_per_second",
        "train_seconds",
        "steps",
        "diverged",
        "exit_code",
    ]
    if evidence:
        fields[1:1] = ["seed", "role", "final_val_loss"]
    with open(out / ("runs.csv" if evidence else "results.csv"), "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(all_runs)
    table = _table(rows, unigram, with_seed=evidence)
    _plots(out, rows, unigram)
    plot_spikes(
        out / "spikes.png",
        [(r["label"], read_train_records(out / r["run_dir"] / "metrics.jsonl")) for r in _first_seed(rows)],
    )
    method = next((r["peak_memory_method"] for r in rows if r.get("peak_memory_method")), "n/a")
    ok = [r for r in rows if "final_eval_loss" in r]
    params = ok[0]["parameters"] if ok else 0
    seeds_text = ", ".join(map(str, plan["seeds"])) if plan else str(base.seed)
    text = f"""# spam-lowmem compare

- Model: `{base.model}` LLaMA ({params / 1e6:.2f}M parameters, vocab {corpus.vocab_size}, untied lm_head), \
{base.dtype}, device `{ok[0]["device"] if ok else base.device}`, seed(s) {seeds_text} \
(at a seed, the same initial weights and batch order for all).
- Data: {corpus.source}; byte-level BPE trained on the training split; documents packed into \
{base.seq_len}-token sequences (no padding). Held-out: {corpus.split}.
- Budget: {base.steps} updates x {base.batch_size * base.grad_accum} sequences x {base.seq_len} tokens \
= {base.steps * base.batch_size * base.grad_accum * base.seq_len:,} training tokens per optimizer; \
warmup {base.warmup}, cosine to {base.min_lr_ratio:g} x lr.
- Eval: true mean over {ok[0]["eval_tokens"] if ok else 0:,} held-out target tokens (no (n+1) \
denominator); perplexity = exp(loss). Unigram baseline (train unigram, add-one): **{unigram:.4f}**.
- GaLore: rank {rank}, update_proj_gap {base.galore_gap}, scale {base.galore_scale:g} on the 7 projection \
matrices per layer, AdamW elsewhere. `spam d=…`: SPAM with the density matching GaLore's state memory.
- Optimizer state: bytes of the tensor storages held by `optimizer.state` (GaLore's projector included; \
in float32 galore-torch 1.0 keeps its projector as a slice of the full SVD factor, so the whole factor counts). \
Weights+grads+state: parameter bytes x 2 (every parameter has a gradient) + optimizer state.
- Peak memory: {method}.
- Total wall time: {total_seconds:.0f} s ({ok[0]["torch_threads"] if ok else "?"} torch thread(s) per run; \
tokens/s is wall-clock throughput on this machine, sensitive to its load while each run went).
{_reset_section(base, args, [r["name"] for r in rows])}{"".join(f"- Note: {n}." + chr(10) for n in notes or [])}
{_evidence_section(aggs, plan, base, args) if evidence and plan else ""}
## Every reported run

{table}

{_spike_section(out, rows)}

![loss curves](loss_curves.png)

![memory](memory.png)
"""
    (out / "results.md").write_text(text, encoding="utf-8")
    return table
