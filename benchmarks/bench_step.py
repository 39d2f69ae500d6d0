"""Optimizer step time on a LLaMA-60M-shaped parameter set, ours against the baselines.

Every candidate steps its own copy of the same parameters and gradients; candidates are
timed round-robin in one run. Printed: median step time, IQR, achieved GB/s (bytes the
step must move / time), that figure as a share of a same-size tensor copy, and ratios to
torch.optim.AdamW(fused=True) and to our pure-PyTorch reference SPAM. pytorch_optimizer 4.x's
pure-PyTorch SPAM and StableSPAM are rows when it is installed (``pip install ".[bench]"``),
with the same hyper-parameters as ours.

    python benchmarks/bench_step.py                      # CPU, fp32
    python benchmarks/bench_step.py --device cuda --dtype bf16 --out bench_out/step.jsonl
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C

import spam_lowmem as sl
from spam_lowmem.reference import ReferenceSPAM, ReferenceStableSPAM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


SPARSE_DENSITIES = (0.01, 0.05, 0.25, 0.43)
SPARSE_TARGETS = ("attn", "mlp", "attention")


def is_target(name: str, shape: tuple[int, ...]) -> bool:
    """The weights spam_lowmem.sparse_param_groups puts in the density group (nn.Linear projections)."""
    return len(shape) == 2 and any(t in name for t in SPARSE_TARGETS) and name.endswith("_proj")


def sparse_groups(
    ps: list[torch.nn.Parameter], shapes: list[tuple[str, tuple[int, ...]]], density: float
) -> list[dict[str, Any]]:
    """sl.sparse_param_groups' split, from the parameter names of the shape list."""
    return [
        {"params": [p for p, (n, s) in zip(ps, shapes) if is_target(n, s)], "density": density},
        {"params": [p for p, (n, s) in zip(ps, shapes) if not is_target(n, s)]},
    ]


def sparse_bytes(shapes: list[tuple[str, tuple[int, ...]]], density: float, bits: int) -> Callable[[int], float]:
    """Approximate bytes per element of a sparse-momentum step, averaged over the whole set: the
    dense group as dense_bytes/q8_bytes; the targeted matrices read p, g and write p in full
    (every cache line holds a selected entry from d ~ 0.1 up, so this overstates small d), plus
    m, v read and written for the d selected entries."""
    total = sum(torch.Size(s).numel() for _, s in shapes)
    frac = sum(torch.Size(s).numel() for n, s in shapes if is_target(n, s)) / total

    def per_elem(elem: int) -> float:
        dense = dense_bytes(elem) if bits == 32 else q8_bytes(elem)
        moments = 4.0 * elem if bits == 32 else 4.0 + 16.0 / 256
        return (1 - frac) * dense + frac * (3.0 * elem + density * moments)

    return per_elem


#: pytorch_optimizer's keywords for our class defaults (spam_lowmem/hyperparams.py): SPAM's post-reset warmup
#: is its ``warmup_epoch``, the clip delay ``grad_accu_steps``, the reset interval
#: ``update_proj_gap``; density 1 is dense momentum (its 2-D tensors still go through a mask).
#: Stable-SPAM's gammas are ``gamma1, gamma2, theta``, ``t_max`` its ``total_steps``.
PYTORCH_OPTIMIZER_KWARGS: dict[str, dict[str, Any]] = {
    "SPAM": dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        density=1.0,
        weight_decay=0.0,
        warmup_epoch=150,
        threshold=5000,
        grad_accu_steps=20,
        update_proj_gap=500,
        eps=1e-6,
    ),
    "StableSPAM": dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        gamma1=0.7,
        gamma2=0.9,
        theta=0.999,
        t_max=None,
        eta_min=0.5,
        weight_decay=0.0,
        update_proj_gap=1000,
        eps=1e-8,
    ),
}


def pytorch_optimizer_candidates(notes: list[dict[str, Any]]) -> dict[str, tuple[Factory, Callable[[int], float]]]:
    """pytorch_optimizer's SPAM and StableSPAM rows. Each keyword is checked against the
    constructor's signature and the optimizer built once on a tiny tensor first, so that a
    signature that changed (a keyword renamed in a later 4.x) is reported in ``notes`` (one
    JSON line each) instead of guessed around or failing the whole run."""
    try:
        import pytorch_optimizer
    except ImportError:
        print("# pytorch_optimizer not installed: rows skipped")
        notes.append({"bench": "step", "candidate": "pytorch_optimizer", "skipped": "pytorch_optimizer not installed"})
        return {}
    from importlib.metadata import version

    found = version("pytorch_optimizer")
    cands: dict[str, tuple[Factory, Callable[[int], float]]] = {}
    for cls_name, kwargs in PYTORCH_OPTIMIZER_KWARGS.items():
        name = f"{cls_name} (pytorch_optimizer {found})"
        cls = getattr(pytorch_optimizer, cls_name, None)
        problem = None if cls is not None else f"pytorch_optimizer {found} has no {cls_name}"
        if cls is not None:
            # its constructor takes **kwargs, so a renamed keyword would be swallowed silently
            named = set(inspect.signature(cls).parameters)
            unknown = sorted(set(kwargs) - named)
            if unknown:
                problem = f"{cls_name} {found} has no keyword(s) {unknown} (its signature: {sorted(named)})"
        if cls is not None and problem is None:
            try:
                cls([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
            except (TypeError, ValueError) as exc:
                problem = f"{cls_name}(**{kwargs}) failed: {type(exc).__name__}: {exc}"
        if problem:
            print(f"# {name}: row skipped: {problem}")
            notes.append({"bench": "step", "candidate": name, "skipped": problem})
            continue
        cands[name] = (lambda ps, cls=cls, kwargs=kwargs: cls(ps, **kwargs), dense_bytes)
    return cands


def candidates(
    device: str,
    shapes: list[tuple[str, tuple[int, ...]]] | None = None,
    notes: list[dict[str, Any]] | None = None,
) -> dict[str, tuple[Factory, Callable[[int], float]]]:
    """name -> (optimizer factory, bytes the step must move per element, given the element size).

    Every dense Adam-family step reads p, g, m, v and writes p, m, v: 7 element-sized
    transfers per parameter. 8-bit moments move 4 bytes per element instead of 4 elements: p r/w + g r in the
    parameter dtype, plus 1-byte codes of m and v read and written (absmax is 1/64 of that).
    Rows skipped for a missing or incompatible package are appended to ``notes``.
    """
    cands: dict[str, tuple[Factory, Callable[[int], float]]] = {
        "torch AdamW (foreach)": (lambda ps: torch.optim.AdamW(ps, foreach=True), dense_bytes),
        "torch AdamW (fused)": (lambda ps: torch.optim.AdamW(ps, fused=True), dense_bytes),
        "AdamW 32-bit (ours)": (lambda ps: sl.AdamW(ps), dense_bytes),
        "SPAM (ours)": (lambda ps: sl.SPAM(ps), dense_bytes),
        "StableSPAM (ours)": (lambda ps: sl.StableSPAM(ps), dense_bytes),
        "AdamW 8-bit (ours)": (lambda ps: sl.AdamW(ps, state_bits=8), q8_bytes),
        "SPAM 8-bit (ours)": (lambda ps: sl.SPAM(ps, state_bits=8), q8_bytes),
        "StableSPAM 8-bit (ours)": (lambda ps: sl.StableSPAM(ps, state_bits=8), q8_bytes),
        "SPAM (reference)": (lambda ps: ReferenceSPAM(ps), dense_bytes),
        "StableSPAM (reference)": (lambda ps: ReferenceStableSPAM(ps), dense_bytes),
    }
    # Sparse momentum: the attention/MLP projections in a density group (as sparse_param_groups),
    # everything else dense; CPU rows only here. The timed calls contain no subset change (those
    # happen once per reset_interval = 500 calls).
    if shapes is not None and device == "cpu":
        for d in SPARSE_DENSITIES:
            for bits in (32, 8):
                tag = "" if bits == 32 else " 8-bit"
                cands[f"SPAM sparse d={d}{tag} (ours)"] = (
                    lambda ps, d=d, bits=bits: sl.SPAM(sparse_groups(ps, shapes, d), state_bits=bits, subset_seed=0),
                    sparse_bytes(shapes, d, bits),
                )
    try:
        import bitsandbytes as bnb

        cands["bitsandbytes AdamW8bit"] = (lambda ps: bnb.optim.AdamW8bit(ps), q8_bytes)
    except ImportError:
        print("# bitsandbytes not installed: its row is skipped")
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit

        cands["torchao AdamW8bit"] = (lambda ps: TorchaoAdamW8bit(ps), q8_bytes)
    except ImportError:
        print("# torchao not installed: its row is skipped")
    cands.update(pytorch_optimizer_candidates(notes if notes is not None else []))
    return cands


def dense_bytes(elem: int) -> float:
    """p, g, m, v read and p, m, v written, all in the parameter dtype."""
    return 7.0 * elem


def q8_bytes(elem: int) -> float:
    """p read/written and g read in the parameter dtype; 1-byte codes of m, v read/written;
    fp32 absmax of m and v read/written once per 256 elements."""
    return 3.0 * elem + 4.0 + 16.0 / 256


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per candidate (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated substrings of candidate names")
    parser.add_argument("--layers", type=int, default=C.LLAMA_60M["layers"])
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args(argv)

    dtype = DTYPES[args.dtype]
    shapes = C.llama_shapes(C.LLAMA_60M["hidden"], args.layers, C.LLAMA_60M["ffn"], C.LLAMA_60M["vocab"])
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    notes: list[dict[str, Any]] = []
    cands = candidates(args.device, shapes, notes)
    if args.only:
        keep = [s.strip().lower() for s in args.only.split(",")]
        cands = {k: v for k, v in cands.items() if any(s in k.lower() for s in keep)}
    steps: dict[str, Callable[[], Any]] = {}
    for name, (factory, _) in cands.items():
        opt = factory(C.make_params(shapes, dtype, args.device))
        steps[name] = opt.step
    env = C.environment(args.device)
    copy_gbps = C.copy_bandwidth(numel, dtype, args.device)
    slow = {n: 30.0 for n in steps if "reference" in n or "pytorch_optimizer" in n}
    times = C.time_interleaved(steps, args.device, warmup=args.warmup, rounds=args.rounds, max_seconds=slow)

    summary = {n: C.summarize(t) for n, t in times.items()}
    fused = summary.get("torch AdamW (fused)", {}).get("median_ms")
    ref = summary.get("SPAM (reference)", {}).get("median_ms")
    spam32 = summary.get("SPAM (ours)", {}).get("median_ms")
    bnb8 = summary.get("bitsandbytes AdamW8bit", {}).get("median_ms")
    elem = torch.empty((), dtype=dtype).element_size()
    rows, records = [], []
    for name, s in summary.items():
        moved = cands[name][1](elem) * numel
        gbps = moved / (s["median_ms"] / 1e3) / 1e9
        rec = {
            "bench": "step",
            "candidate": name,
            "params": numel,
            "dtype": args.dtype,
            **s,
            "gbps": gbps,
            "copy_gbps": copy_gbps,
            "pct_of_copy": 100 * gbps / copy_gbps,
            "vs_adamw_fused": s["median_ms"] / fused if fused else None,
            "vs_reference_spam": s["median_ms"] / ref if ref else None,
            "vs_spam32": s["median_ms"] / spam32 if spam32 else None,
            "vs_bnb_adamw8bit": s["median_ms"] / bnb8 if bnb8 else None,
            "env": env,
        }
        records.append(rec)
        rows.append(
            [
                name,
                f"{s['median_ms']:.2f}",
                f"{s['iqr_ms']:.2f}",
                s["runs"],
                f"{gbps:.1f}",
                f"{rec['pct_of_copy']:.0f}%",
                f"{rec['vs_adamw_fused']:.2f}x" if fused else "-",
                f"{rec['vs_reference_spam']:.2f}x" if ref else "-",
                f"{rec['vs_spam32']:.2f}x" if spam32 else "-",
                f"{rec['vs_bnb_adamw8bit']:.2f}x" if bnb8 else "-",
            ]
        )
    print(
        f"# {numel / 1e6:.2f}M params ({args.layers} layers), {args.dtype}, device {args.device}; "
        f"copy {copy_gbps:.1f} GB/s; {env['date']}; torch {env['torch']}; {env['cpu']}; "
        f"core isa {env.get('core_isa')}, threads {env.get('core_threads')}"
    )
    C.print_table(
        [
            "optimizer",
            "median ms",
            "IQR ms",
            "runs",
            "GB/s",
            "of copy",
            "vs AdamW fused",
            "vs ref SPAM",
            "vs SPAM 32",
            "vs bnb 8bit",
        ],
        rows,
    )
    C.write_jsonl(args.out, records + [{**note, "env": env} for note in notes])


if __name__ == "__main__":
    main()
