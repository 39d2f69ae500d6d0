"""``spam-lowmem compare``: several optimizers, same data, seed, model init and token budget.

Each optimizer trains in its own ``python -m spam_lowmem.cli train`` process (folder
``OUT/runs/LABEL``), so its peak memory is its own (see :mod:`.memory`) and one failing
optimizer does not stop the others. The corpus is tokenized once into ``OUT/cache``.

Outputs in ``OUT``: ``results.md`` (summary and table), ``results.csv``, ``results.jsonl`` (one
line per optimizer), ``loss_curves.png``, ``memory.png``, and each run's own folder.
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
from .config import TrainConfig
from .errors import UsageError
from .model import get_spec
from .optimizers import OPTIMIZER_NAMES, density_for_galore_rank, supports_density

__all__ = ["DEFAULT_SET", "SPARSE", "run_compare", "write_report"]

SPARSE = "spam-sparse"  # SPAM at the density matching GaLore's state memory (docs/algorithms.md §3, §6)
DEFAULT_SET = ("adamw", "spam", "stable-spam", "galore", "adam-mini", SPARSE)
#: ``--four-bit``: these with W4A4, plus the unquantised AdamW baseline (Stable-SPAM paper, §5)
FOUR_BIT_SET = ("adamw", "spam", "stable-spam")
BASELINE_16 = "adamw-16bit"
OUTPUTS = ("results.md", "results.csv", "results.jsonl", "loss_curves.png", "memory.png")


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


def run_compare(args: argparse.Namespace, make_config: Callable[[argparse.Namespace, str], Any]) -> int:
    """Run the comparison described by the parsed ``compare`` arguments; returns the exit status."""
    t_start = time.perf_counter()
    four_bit = bool(getattr(args, "four_bit", False))
    names = _select(args.optimizers, FOUR_BIT_SET if four_bit else DEFAULT_SET)
    lr_for = _parse_lr_for(args.lr_for, names + ([BASELINE_16] if four_bit else []))
    base: TrainConfig = make_config(args, "adamw")
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
    if SPARSE in names and not supports_density():
        notes.append(f"skipped {SPARSE}: spam_lowmem.SPAM in this build does not accept density= yet")
        print(f"note: {notes[-1]}", file=sys.stderr)
        names.remove(SPARSE)
    corpus = D.prepare_corpus(base.data or None, base.vocab_size, out / "cache")
    held = D.eval_batches(D.pack(corpus.eval_tokens, base.seq_len), base.batch_size, base.eval_batches)
    D.BatchStream(D.pack(corpus.train_tokens, base.seq_len), base.batch_size, base.seed)  # enough text?
    unigram = D.unigram_cross_entropy(corpus.train_tokens, held, corpus.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    corpus.save_cache()
    what = ", ".join(names) + (f" with W4A4 {base.quant_format}, and adamw 16-bit" if four_bit else "")
    print(
        f"compare: {what} on {corpus.source}; {base.model} model, {base.steps} steps x "
        f"{base.batch_size * base.grad_accum} x {base.seq_len} tokens; held-out {corpus.split}; "
        f"unigram baseline {unigram:.4f} nats/token",
        file=sys.stderr,
    )

    rows: list[dict[str, Any]] = []
    # PYTHONSAFEPATH: `python -m` would otherwise put the current directory first on sys.path,
    # and from a source checkout that shadows the installed package (which has the compiled core).
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", "PYTHONSAFEPATH": "1"}
    runs = [(name, name) for name in names]  # (optimizer or spam-sparse, run name)
    if four_bit:
        runs = [(name, f"{name}-w4a4") for name in names] + [("adamw", BASELINE_16)]
    for opt_name, name in runs:
        optimizer = "spam" if opt_name == SPARSE else opt_name
        cfg = make_config(args, optimizer)
        cfg.lr = lr_for.get(opt_name if name != BASELINE_16 else name, cfg.lr)
        extra: list[str] = []
        label = opt_name
        if opt_name == SPARSE:
            density = density_for_galore_rank(spec, rank)
            extra = ["--density", repr(density)]
            label = f"spam d={density:.3f}"
        if name == BASELINE_16:
            cfg.weight_bits, cfg.quant_format, cfg.weight_storage, cfg.quant_group_size = 16, None, None, None
            label = "adamw 16-bit"
        elif four_bit:
            label += " w4a4" if cfg.quant_format == "int4" else " w4a4 fp4"
        run_dir = out / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        argv = _child_argv(cfg, run_dir, out / "cache", extra, not args.no_progress, args.threads or 1)
        sys.stderr.flush()
        proc = subprocess.run(argv, env=env, stdout=_stderr_fd())  # our stdout carries only the table
        row: dict[str, Any] = {
            "name": name,
            "label": label,
            "lr": cfg.lr,
            "exit_code": proc.returncode,
            "process_seconds": time.perf_counter() - t0,
        }
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            row.update(json.loads(summary_path.read_text(encoding="utf-8")))
        else:
            print(f"compare: {name} failed (exit code {proc.returncode}); see the messages above", file=sys.stderr)
        rows.append(row)
        if "final_eval_loss" in row:
            print(
                f"compare: {label}: eval loss {row['final_eval_loss']:.4f}, {row['process_seconds']:.0f} s",
                file=sys.stderr,
            )
    total = time.perf_counter() - t_start
    table = write_report(out, rows, base, unigram, corpus, rank, total, notes)
    print(table)
    print(f"\ncompare: finished in {total:.0f} s; results in {out}/results.md", file=sys.stderr)
    return 0 if all("final_eval_loss" in r and not r.get("diverged") for r in rows) else 1


def _mb(value: Any) -> str:
    return "n/a" if value is None else f"{value / 2**20:.2f}"


def _table(rows: list[dict[str, Any]], unigram: float) -> str:
    head = (
        "| optimizer | lr | eval loss | eval ppl | vs unigram | optimizer state MB "
        "| weights+grads+state MB | peak memory MB | tokens/s | train s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
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


def _curves(out: Path, name: str) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    path = out / "runs" / name / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            (train if rec["type"] == "train" else evals).append((rec["tokens"], rec["loss"]))
    return train, evals


def _plots(out: Path, rows: list[dict[str, Any]], unigram: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        train, evals = _curves(out, r["name"])
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


def write_report(
    out: Path,
    rows: list[dict[str, Any]],
    base: TrainConfig,
    unigram: float,
    corpus: D.Corpus,
    rank: int,
    total_seconds: float,
    notes: list[str] | None = None,
) -> str:
    """Write results.{md,csv,jsonl} and the two plots; returns the markdown table."""
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
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
    with open(out / "results.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = _table(rows, unigram)
    _plots(out, rows, unigram)
    method = next((r["peak_memory_method"] for r in rows if r.get("peak_memory_method")), "n/a")
    ok = [r for r in rows if "final_eval_loss" in r]
    params = ok[0]["parameters"] if ok else 0
    text = f"""# spam-lowmem compare

- Model: `{base.model}` LLaMA ({params / 1e6:.2f}M parameters, vocab {corpus.vocab_size}, untied lm_head), \
{base.dtype}, device `{ok[0]["device"] if ok else base.device}`, seed {base.seed} (same initial weights for all).
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
{"".join(f"- Note: {n}." + chr(10) for n in notes or [])}
{table}

![loss curves](loss_curves.png)

![memory](memory.png)
"""
    (out / "results.md").write_text(text, encoding="utf-8")
    return table
