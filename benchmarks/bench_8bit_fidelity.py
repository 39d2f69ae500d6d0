"""8-bit moments against their 32-bit optimizer on heterogeneous gradient streams.

For each stream of spam_lowmem/step_bounds.py every candidate steps its own copy of one
parameter (p0 = 0) on the same gradients (they do not depend on p, so the runs are in lock
step without feedback). Reported per 8-bit candidate:

* ``distance``: ||p_8bit - p_32bit|| / ||p_32bit - p0|| after the last step, against its own
  32-bit optimizer (torch AdamW for sl.AdamW and bitsandbytes AdamW8bit);
* ``worst_move``: the largest single-step |delta p| of any entry over lr times the analytic
  bound of exact Adam at that step (step_bounds.adam_direction_bound); <= 1 means no entry
  ever moved further than exact Adam could have;
* ``small_half_max``: on the split-scale stream, max |p| over the small-gradient half.

bitsandbytes' AdamW8bit runs in the same process when it is installed (the ``train`` extra);
otherwise its rows are skipped, as printed.

    python benchmarks/bench_8bit_fidelity.py --out bench_out/fidelity.jsonl
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C

import spam_lowmem as sl
from spam_lowmem.step_bounds import STREAMS, adam_direction_bound

LR, BETAS = 1e-3, (0.9, 0.999)
Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def candidates() -> dict[str, tuple[Factory, str]]:
    """name -> (factory, name of the 32-bit run it is compared with). No resets, no decay: the
    bound of step_bounds applies to every step (see its docstring)."""
    spam_kw = dict(lr=LR, betas=BETAS, reset_interval=0)
    stable_kw = dict(lr=LR, betas=BETAS, reset_interval=0)
    cands: dict[str, tuple[Factory, str]] = {
        "torch AdamW": (lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, weight_decay=0.0), ""),
        "AdamW 8-bit (ours)": (
            lambda ps: sl.AdamW(ps, lr=LR, betas=BETAS, weight_decay=0.0, state_bits=8),
            "torch AdamW",
        ),
        "SPAM 32-bit (ours)": (lambda ps: sl.SPAM(ps, **spam_kw), ""),
        "SPAM 8-bit (ours)": (lambda ps: sl.SPAM(ps, **spam_kw, state_bits=8), "SPAM 32-bit (ours)"),
        "StableSPAM 32-bit (ours)": (lambda ps: sl.StableSPAM(ps, **stable_kw), ""),
        "StableSPAM 8-bit (ours)": (
            lambda ps: sl.StableSPAM(ps, **stable_kw, state_bits=8),
            "StableSPAM 32-bit (ours)",
        ),
    }
    try:
        import bitsandbytes as bnb

        cands["bitsandbytes AdamW8bit"] = (
            lambda ps: bnb.optim.AdamW8bit(ps, lr=LR, betas=BETAS, weight_decay=0.0),
            "torch AdamW",
        )
    except ImportError:
        print("bitsandbytes not installed: its row is skipped (pip install bitsandbytes)")
    return cands


def run(factory: Factory, stream: Iterator[torch.Tensor], shape: tuple[int, ...]) -> dict[str, Any]:
    """Step one parameter through the stream; the final parameter and the worst step/bound."""
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = factory([p])
    worst = 0.0
    for t, g in enumerate(stream, start=1):
        before = p.detach().clone()
        p.grad = g
        opt.step()
        move = float((p.detach() - before).abs().max())
        worst = max(worst, move / (LR * adam_direction_bound(*BETAS, t)))
    return {"final": p.detach().clone(), "worst_move": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    shape = (args.rows, args.cols)
    env = C.environment("cpu")
    print(
        f"# 8-bit fidelity, {shape}, {args.steps} steps, lr {LR}, {env['date']}, torch {env['torch']}, "
        f"{env.get('cpu')}, commit {env.get('commit')}"
    )
    cands = candidates()
    rows: list[dict[str, Any]] = []
    for stream_name in args.streams.split(","):
        make = STREAMS[stream_name]
        results = {name: run(f, make(shape, args.steps, seed=args.seed), shape) for name, (f, _) in cands.items()}
        small = None
        if stream_name == "split_scale":  # the same mask as the stream draws first
            small = torch.rand(shape, generator=torch.Generator().manual_seed(args.seed)) >= 0.5
            small = ~small
        table = []
        for name, (_, base) in cands.items():
            res = results[name]
            row: dict[str, Any] = {
                "bench": "8bit_fidelity",
                "stream": stream_name,
                "optimizer": name,
                "shape": list(shape),
                "steps": args.steps,
                "worst_move": res["worst_move"],
                **env,
            }
            if base:
                ref = results[base]["final"]
                row["baseline"] = base
                row["distance"] = float((res["final"] - ref).norm() / ref.norm())
            if small is not None:
                row["small_half_max"] = float(res["final"][small].abs().max())
            rows.append(row)
            table.append(
                [
                    name,
                    base or "-",
                    f"{row['distance']:.4f}" if base else "-",
                    f"{res['worst_move']:.3f}",
                    f"{row['small_half_max']:.4g}" if small is not None else "-",
                ]
            )
        print(f"\nstream {stream_name}")
        C.print_table(["optimizer", "compared with", "distance", "worst move / bound", "max|p| small half"], table)
        ours = next((r for r in rows[-len(cands) :] if r["optimizer"] == "AdamW 8-bit (ours)"), None)
        bnb_row = next((r for r in rows[-len(cands) :] if r["optimizer"] == "bitsandbytes AdamW8bit"), None)
        if ours is not None and bnb_row is not None:
            ratio = ours["distance"] / bnb_row["distance"] if bnb_row["distance"] > 0 else float("inf")
            print(f"AdamW 8-bit distance, ours / bitsandbytes: {ratio:.3f}")
    C.write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
