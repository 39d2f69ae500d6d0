"""Optimizer-state bytes per parameter on the LLaMA-60M shapes, measured from the state tensors.

Every candidate steps once on its own copy of the parameters (so lazily created state exists),
then the bytes of every tensor in ``opt.state`` are summed (tensors shared between parameters,
such as bitsandbytes' code maps, are counted once; a wrapper subclass such as torchao's 8-bit
state is counted through its inner tensors). Reported over all parameters and over the
targeted matrices only (the attention/MLP projection weights, the authors' ``density`` group).
The authors' own sparse layout (a full-size bool mask plus compact m and v in the parameter
dtype, docs/algorithms.md §3) is computed from its formula, not measured.

    python benchmarks/bench_memory.py                   # fp32 parameters
    python benchmarks/bench_memory.py --dtype bf16 --out bench_out/memory.jsonl
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C

import spam_lowmem as sl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DENSITIES = (0.01, 0.05, 0.25, 0.43)
TARGETS = ("attn", "mlp", "attention")


def is_target(name: str, shape: tuple[int, ...]) -> bool:
    """The weights sparse_param_groups puts in the density group (nn.Linear projections)."""
    return len(shape) == 2 and any(t in name for t in TARGETS) and name.endswith("_proj")


def sparse_groups(
    params: list[torch.nn.Parameter], names: list[tuple[str, tuple[int, ...]]], density: float, **kw: Any
) -> list[dict[str, Any]]:
    """What sl.sparse_param_groups builds for a LLaMA, from the parameter names."""
    sparse = [p for p, (n, s) in zip(params, names) if is_target(n, s)]
    dense = [p for p, (n, s) in zip(params, names) if not is_target(n, s)]
    return [{"params": sparse, "density": density, **kw}, {"params": dense, **kw}]


def candidates(shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, Callable[[list[torch.nn.Parameter]], Any]]:
    cands: dict[str, Callable[[list[torch.nn.Parameter]], Any]] = {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps),
        "AdamW 32-bit (ours)": lambda ps: sl.AdamW(ps),
        "AdamW 8-bit (ours)": lambda ps: sl.AdamW(ps, state_bits=8),
        "SPAM 32-bit (ours)": lambda ps: sl.SPAM(ps),
        "SPAM 8-bit (ours)": lambda ps: sl.SPAM(ps, state_bits=8),
        "StableSPAM 32-bit (ours)": lambda ps: sl.StableSPAM(ps),
        "StableSPAM 8-bit (ours)": lambda ps: sl.StableSPAM(ps, state_bits=8),
    }
    for d in DENSITIES:
        for bits in (32, 8):
            cands[f"sparse SPAM d={d} {bits}-bit (ours)"] = lambda ps, d=d, bits=bits: sl.SPAM(
                sparse_groups(ps, shapes, d), state_bits=bits, subset_seed=0
            )
    try:
        import bitsandbytes as bnb

        cands["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps)
    except ImportError:
        print("# bitsandbytes not installed: its row is skipped")
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit

        cands["torchao AdamW8bit"] = lambda ps: TorchaoAdamW8bit(ps)
    except ImportError:
        print("# torchao not installed: its row is skipped")
    return cands


def leaf_tensors(value: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``value``'s bytes: itself, or for a wrapper subclass such as
    torchao's OptimState8bit (codes, scale, qmap) its inner tensors, recursively."""
    flatten = getattr(value, "__tensor_flatten__", None)
    if flatten is None:
        return [value]
    names, _ = flatten()
    return [leaf for name in names for leaf in leaf_tensors(getattr(value, name))]


def state_bytes(opt: Any, params: list[torch.nn.Parameter]) -> int:
    """Bytes of the tensors in opt.state of ``params``, each storage counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in params:
        for value in opt.state.get(p, {}).values():
            if not isinstance(value, torch.Tensor):
                continue
            for leaf in leaf_tensors(value):
                key = (leaf.untyped_storage().data_ptr(), leaf.untyped_storage().nbytes())
                if key in seen:
                    continue
                seen.add(key)
                total += leaf.numel() * leaf.element_size()
    return total


def authors_layout(shapes: list[tuple[str, tuple[int, ...]]], density: float, elem: int) -> tuple[float, float]:
    """(total bytes, targeted bytes) of the authors' layout: dense Adam m, v in the parameter
    dtype for the other parameters; for the targeted ones a bool mask (1 byte per element) and
    compact m, v of floor(d * numel) entries (their initial subset; later ones are ~d * numel)."""
    target = other = 0
    for name, shape in shapes:
        n = math.prod(shape)
        if is_target(name, shape):
            target += n + 2 * elem * math.floor(density * n)
        else:
            other += 2 * elem * n
    return float(target + other), float(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--layers", type=int, default=C.LLAMA_60M["layers"])
    parser.add_argument("--only", default="", help="comma-separated substrings of candidate names")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    shapes = C.llama_shapes(C.LLAMA_60M["hidden"], args.layers, C.LLAMA_60M["ffn"], C.LLAMA_60M["vocab"])
    numel = sum(math.prod(s) for _, s in shapes)
    target_numel = sum(math.prod(s) for n, s in shapes if is_target(n, s))
    env = C.environment("cpu")
    cands = candidates(shapes)
    if args.only:
        keep = [s.strip().lower() for s in args.only.split(",")]
        cands = {k: v for k, v in cands.items() if any(s in k.lower() for s in keep)}

    results: list[tuple[str, float, float, str]] = []
    for name, factory in cands.items():
        params = C.make_params(shapes, dtype, "cpu")
        opt = factory(params)
        opt.step()
        total = state_bytes(opt, params)
        target = state_bytes(opt, [p for p, (n, s) in zip(params, shapes) if is_target(n, s)])
        results.append((name, total, target, "measured"))
        del opt, params
        gc.collect()
    for d in DENSITIES:
        for label, e in (("bf16", 2), ("fp32", 4)):
            total, target = authors_layout(shapes, d, e)
            results.append((f"authors' layout d={d} (bool mask + {label} m,v)", total, target, "formula"))

    rows, records = [], []
    for name, total, target, how in results:
        rec = {
            "bench": "memory",
            "candidate": name,
            "how": how,
            "dtype": args.dtype,
            "params": numel,
            "target_params": target_numel,
            "state_bytes": total,
            "bytes_per_param": total / numel,
            "target_state_bytes": target,
            "target_bytes_per_param": target / target_numel,
            "ratio_to_adamw32": total / (8 * numel),
            "env": env,
        }
        records.append(rec)
        rows.append(
            [
                name,
                how,
                f"{total / 2**20:.1f}",
                f"{total / numel:.3f}",
                f"{target / target_numel:.3f}",
                f"{total / (8 * numel):.3f}",
            ]
        )
    print(
        f"# LLaMA-60M shapes ({args.layers} layers): {numel / 1e6:.2f}M params, {target_numel / 1e6:.2f}M in "
        f"the targeted projections; {args.dtype} parameters; state measured after one step; {env['date']}; "
        f"torch {env['torch']}"
    )
    C.print_table(["optimizer", "how", "state MiB", "B/param (all)", "B/param (targeted)", "vs AdamW fp32"], rows)
    C.write_jsonl(args.out, records)


if __name__ == "__main__":
    main()
