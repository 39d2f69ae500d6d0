"""Optimizer state per rank and step time under FSDP2, at world sizes 1 and 2 (CPU, gloo).

The LLaMA model of ``spam_lowmem.train.model`` (default ``60m``: hidden 512, 8 layers, vocab
32000) is FSDP2-sharded as ``spam-lowmem train --fsdp`` does it (``fully_shard`` per block,
then the root) in W real processes started by torchrun (W = 1, then 2). On the same shards:

* **memory**: each optimizer steps once on fixed gradients, then ``memory_report()`` gives
  ``local_total_bytes`` (this rank's state) and ``total_bytes`` (global); torch.optim.AdamW's
  state is counted from its tensors (the local shards). A configuration that raises records its
  error text instead of a number, so the table can be filled in later.
* **step time**: ``optimizer.step()`` only (gradients set once), every candidate on the same
  parameters, timed round after round (interleaved); each round's time is the slowest rank's,
  each rank starting after a barrier. Median over the rounds, and its ratio to torch AdamW
  (``foreach=True`` and the default, which on CPU is the per-tensor loop) from the same run.

    python benchmarks/bench_distributed.py --out bench_out/distributed.jsonl
    python benchmarks/bench_distributed.py --model tiny --rounds 30     # quick look

Each rank uses one thread (torch and the OpenMP core), so that 2 ranks fit 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import _common as C

WORLDS = (1, 2)
DENSITY = 0.25
#: name -> factory(model) for the memory table (torch AdamW is the baseline)
MEMORY = (
    "torch AdamW",
    "AdamW 32-bit (ours)",
    "AdamW 8-bit (ours)",
    "SPAM 32-bit (ours)",
    "SPAM 8-bit (ours)",
    "StableSPAM 32-bit (ours)",
    "StableSPAM 8-bit (ours)",
    f"sparse SPAM d={DENSITY} 32-bit (ours)",
    f"sparse SPAM d={DENSITY} 8-bit (ours)",
)
#: the candidates timed (torch AdamW both ways, then ours)
TIMED = (
    "torch AdamW (foreach)",
    "torch AdamW (default)",
    "AdamW 32-bit (ours)",
    "SPAM 32-bit (ours)",
    "StableSPAM 32-bit (ours)",
    "SPAM 8-bit (ours)",
    f"sparse SPAM d={DENSITY} 32-bit (ours)",
)


def factory(name: str) -> Callable[[Any], Any]:
    """The optimizer ``name`` over a (sharded) model; lr tiny so that timing rounds change little."""
    import torch

    import spam_lowmem as sl

    bits = 8 if "8-bit" in name else 32
    kw: dict[str, Any] = {"lr": 1e-6, "state_bits": bits}
    if name.startswith("torch AdamW"):
        foreach = True if "foreach" in name else None
        return lambda m: torch.optim.AdamW(m.parameters(), lr=1e-6, weight_decay=0.0, foreach=foreach)
    if name.startswith("sparse SPAM"):
        return lambda m: sl.SPAM(sl.sparse_param_groups(m, density=DENSITY), subset_seed=0, **kw)
    cls = {"AdamW": sl.AdamW, "SPAM": sl.SPAM, "StableSPAM": sl.StableSPAM}[name.split()[0]]
    return lambda m: cls(m.parameters(), **kw)


# ---------------------------------------------------------------------------------- one rank
def _sharded_model(model_name: str, mesh: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    from spam_lowmem.train.model import build_model, get_spec

    spec = get_spec(model_name)
    model = build_model(spec, spec.vocab_size, seed=0)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _set_gradients(model: Any) -> None:
    """The same full gradient at every world size (seeded per parameter), sharded like its
    parameter."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    for index, p in enumerate(model.parameters()):
        g = torch.Generator().manual_seed(index)
        full = torch.randn(tuple(p.shape), generator=g) * 1e-3
        p.grad = distribute_tensor(full, p.device_mesh, p.placements)


def _torch_state_bytes(opt: Any) -> int:
    from spam_lowmem.train.memory import optimizer_state_bytes

    return optimizer_state_bytes(opt)  # local shards of DTensor state


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _memory(model: Any, rank: int) -> list[dict[str, Any]]:
    import torch

    rows = []
    for name in MEMORY:
        row: dict[str, Any] = {"candidate": name}
        try:
            opt = factory(name)(model)
            opt.step()
            if name == "torch AdamW":
                local = _torch_state_bytes(opt)
                total = torch.tensor([local], dtype=torch.int64)
                torch.distributed.all_reduce(total)
                row.update(local_bytes=local, total_bytes=int(total.item()))
            else:
                report = opt.memory_report()  # a collective: every rank calls it
                row.update(local_bytes=report["local_total_bytes"], total_bytes=report["total_bytes"])
            del opt
        except Exception as exc:  # recorded, not fatal: the table is completed later
            row["error"] = _error(exc)
        gc.collect()
        per_rank: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, row.get("local_bytes"))
        row["local_bytes_per_rank"] = per_rank
        rows.append(row)
    return rows


def _timing(model: Any, warmup: int, rounds: int) -> dict[str, Any]:
    import torch

    opts: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name in TIMED:
        try:
            opts[name] = factory(name)(model)
            for _ in range(warmup):
                opts[name].step()
        except Exception as exc:
            errors[name] = _error(exc)
            opts.pop(name, None)
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            torch.distributed.barrier()
            t0 = time.perf_counter()
            opt.step()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)  # the slowest rank
            times[name].append(float(elapsed.item()))
    return {"times": times, "errors": errors}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = _sharded_model(args.model, mesh)
        _set_gradients(model)
        result: dict[str, Any] = {"world_size": world, "params": sum(p.numel() for p in model.parameters())}
        if "memory" in args.parts:
            result["memory"] = _memory(model, rank)
        if "time" in args.parts:
            result["timing"] = _timing(model, args.warmup, args.rounds)
        if rank == 0:
            Path(args.result).write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- launcher
def launch(world: int, args: argparse.Namespace, result: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    cmd += [__file__, "--worker", "--result", str(result), "--model", args.model]
    cmd += ["--rounds", str(args.rounds), "--warmup", str(args.warmup), "--parts", args.parts]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    print(f"# world size {world}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(result.read_text(encoding="utf-8"))


def _bytes(value: Any) -> str:
    return f"{value / 2**20:.2f}" if isinstance(value, int) else "-"


def report(results: dict[int, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    env = C.environment("cpu")
    env["torch_threads"] = 1
    records: list[dict[str, Any]] = []
    params = results[WORLDS[0]]["params"]
    print(
        f"# LLaMA-{args.model} ({params / 1e6:.2f}M parameters), FSDP2 over gloo/CPU; {env['date']}; "
        f"torch {env['torch']}, python {env['python']}, {env['cpu']}"
    )
    if "memory" in args.parts:
        print("\n## optimizer state per rank (MiB), after one step")
        ws1 = {r["candidate"]: r for r in results[1]["memory"]}
        ws2 = {r["candidate"]: r for r in results[2]["memory"]}
        base = {w: {r["candidate"]: r for r in results[w]["memory"]}["torch AdamW"] for w in WORLDS}
        rows = []
        for name in MEMORY:
            a, b = ws1[name], ws2[name]
            ratio = b["local_bytes"] / a["local_bytes"] if "local_bytes" in a and "local_bytes" in b else None
            vs = {
                w: r["local_bytes"] / base[w]["local_bytes"]
                for w, r in ((1, a), (2, b))
                if "local_bytes" in r and "local_bytes" in base[w]
            }
            error = b.get("error") or a.get("error")
            rows.append(
                [
                    name,
                    _bytes(a.get("local_bytes")),
                    " / ".join(_bytes(v) for v in b["local_bytes_per_rank"]),
                    _bytes(b.get("total_bytes")),
                    f"{ratio:.3f}" if ratio is not None else "-",
                    f"{vs[1]:.3f}" if 1 in vs else "-",
                    f"{vs[2]:.3f}" if 2 in vs else "-",
                    error or "",
                ]
            )
            for w, r in ((1, a), (2, b)):
                records.append(
                    {
                        "bench": "distributed_memory",
                        "candidate": name,
                        "model": args.model,
                        "params": params,
                        "world_size": w,
                        "local_bytes": r.get("local_bytes"),
                        "local_bytes_per_rank": r["local_bytes_per_rank"],
                        "total_bytes": r.get("total_bytes"),
                        "ratio_ws2_ws1": ratio if w == 2 else None,
                        "vs_torch_adamw_same_ws": vs.get(w),
                        "error": r.get("error"),
                        "env": env,
                    }
                )
        C.print_table(
            [
                "optimizer",
                "ws1 MiB",
                "ws2 MiB (rank 0 / 1)",
                "ws2 global MiB",
                "ws2/ws1",
                "vs torch AdamW ws1",
                "vs torch AdamW ws2",
                "error",
            ],
            rows,
        )
    if "time" in args.parts:
        for w in WORLDS:
            timing = results[w]["timing"]
            stats = {n: C.summarize(t) for n, t in timing["times"].items()}
            fe, df = (stats.get(k, {}).get("median_ms") for k in ("torch AdamW (foreach)", "torch AdamW (default)"))
            print(f"\n## optimizer.step() at world size {w} (slowest rank per round, {args.rounds} rounds)")
            rows = []
            for name in TIMED:
                if name in timing["errors"]:
                    rows.append([name, "-", "-", "-", "-", timing["errors"][name]])
                    records.append(
                        {"bench": "distributed_step", "candidate": name, "world_size": w, "model": args.model}
                        | {"error": timing["errors"][name], "env": env}
                    )
                    continue
                s = stats[name]
                rows.append(
                    [
                        name,
                        f"{s['median_ms']:.2f}",
                        f"{s['iqr_ms']:.2f}",
                        f"{s['median_ms'] / fe:.3f}" if fe else "-",
                        f"{s['median_ms'] / df:.3f}" if df else "-",
                        "",
                    ]
                )
                records.append(
                    {
                        "bench": "distributed_step",
                        "candidate": name,
                        "model": args.model,
                        "params": params,
                        "world_size": w,
                        **s,
                        "vs_torch_adamw_foreach": s["median_ms"] / fe if fe else None,
                        "vs_torch_adamw_default": s["median_ms"] / df if df else None,
                        "env": env,
                    }
                )
            C.print_table(["optimizer", "median ms", "IQR ms", "vs foreach", "vs default", "error"], rows)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="60m", help="spam_lowmem.train.model config (default 60m)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per candidate")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate first")
    parser.add_argument("--parts", default="memory,time", help="memory, time or both (comma list)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = {w: launch(w, args, Path(tmp) / f"ws{w}.json") for w in WORLDS}
    C.write_jsonl(args.out, report(results, args))


if __name__ == "__main__":
    main()
