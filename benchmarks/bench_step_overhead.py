"""Per-call overhead of ``step()`` on a group of many tiny tensors, ours against torch AdamW.

A step over 300 parameters of 16 elements moves almost no bytes, so its time is the fixed cost
per call and per tensor: gathering the group in Python, building the core's batch and crossing
the boundary. Printed: best and median microseconds per call over ``--calls`` calls after a
warm-up, and the ratio of medians to ``torch.optim.AdamW(fused=True)``; JSON lines with
``--out``.

    python benchmarks/bench_step_overhead.py [--tensors 300] [--numel 16] [--calls 400]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C

import spam_lowmem as sl

CANDIDATES: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "AdamW (ours)": lambda ps: sl.AdamW(ps, lr=1e-3),
    "SPAM (ours)": lambda ps: sl.SPAM(ps, lr=1e-3),
    "StableSPAM (ours)": lambda ps: sl.StableSPAM(ps, lr=1e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--numel", type=int, default=16)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--order",
        choices=("interleaved", "sequential"),
        default="interleaved",
        help="interleaved: one call of each candidate per round (load drift hits all alike); "
        "sequential: all calls of one candidate, then the next (each runs with a warm cache)",
    )
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    runs: dict[str, list[float]] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    for name, make in CANDIDATES.items():
        params = [torch.nn.Parameter(torch.randn(args.numel, generator=gen)) for _ in range(args.tensors)]
        for p in params:
            p.grad = torch.randn(args.numel, generator=gen) * 1e-3
        opts[name] = make(params)
        for _ in range(args.warmup):
            opts[name].step()
        runs[name] = []

    def timed(opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        opt.step()
        return (time.perf_counter() - t0) * 1e6

    if args.order == "interleaved":  # call by call, so drift in machine load hits every candidate alike
        for _ in range(args.calls):
            for name, opt in opts.items():
                runs[name].append(timed(opt))
    else:
        for name, opt in opts.items():
            runs[name] = [timed(opt) for _ in range(args.calls)]

    env = C.environment("cpu")
    print(f"# {args.tensors} tensors of {args.numel} elements, {args.calls} calls each ({args.order}); {env['date']}")
    base = statistics.median(runs["torch AdamW (fused)"])
    rows = []
    print(f"{'optimizer':<24} {'best us':>8} {'median us':>10} {'vs fused':>9}")
    for name, ts in runs.items():
        med = statistics.median(ts)
        print(f"{name:<24} {min(ts):>8.0f} {med:>10.0f} {med / base:>8.2f}x")
        rows.append(
            {
                "bench": "step_overhead",
                "candidate": name,
                "tensors": args.tensors,
                "order": args.order,
                "numel": args.numel,
                "best_us": min(ts),
                "median_us": med,
                "vs_adamw_fused": med / base,
                "env": env,
            }
        )
    C.write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
