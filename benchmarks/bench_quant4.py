"""4-bit quantisers and QuantLinear training: throughput, step time and weight memory.

Part 1 times each quantiser of the core (fake quantisation, pack, unpack, stochastic
re-quantisation) against the pure-PyTorch reference on the same tensor, round-robin in one
run, and prints the median, IQR, GB/s (bytes the op must move) and the speed-up.

Part 2 trains a LLaMA-like stack of projection layers (q/k/v/o, gate/up/down per block, an
unquantised head) on synthetic data with spam_lowmem.AdamW (torch.optim.AdamW's arithmetic)
and reports, per storage (dense nn.Linear in --dtype, bf16 by default; fake-quantised W4A4;
packed W4A4 stepped unfused — materialise, dense step, requantise — or by the fused packed
step), the median time of one training step (forward + backward + optimizer step, including
the re-quantisation) and the bytes per weight of the projection weights at rest, of their
transient working copy during the step (none for the fused step), and of the optimizer state.

    python benchmarks/bench_quant4.py                       # CPU, about a minute
    python benchmarks/bench_quant4.py --device cuda --out bench_out/quant4.jsonl
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common as C

import spam_lowmem as sl
import spam_lowmem.reference.quant4 as R
from spam_lowmem import quant4 as q4
from spam_lowmem.nn import QuantLinear, attach_packed_requant, quantize_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantiser_cases(w: torch.Tensor, g: int) -> dict[str, tuple[Callable[[], Any], Callable[[], Any], int]]:
    """op -> (ours, reference, bytes moved)."""
    n, es = w.numel(), w.element_size()
    packed = {f: q4.pack_weight(w, fmt=f, group_size=g) for f in ("int4", "fp4")}  # type: ignore[arg-type]
    refp = {f: {k: t.clone() for k, t in p.tensors().items()} for f, p in packed.items()}
    moved = (q4.unpack_weight(packed["int4"], dtype=w.dtype).float() + 1e-3 * torch.randn(w.shape, device=w.device)).to(
        w.dtype
    )
    moved_fp4 = (
        q4.unpack_weight(packed["fp4"], dtype=w.dtype).float() + 1e-3 * torch.randn(w.shape, device=w.device)
    ).to(w.dtype)
    meta = {
        f: sum(t.numel() * t.element_size() for k, t in p.tensors().items() if k != "codes") for f, p in packed.items()
    }
    fake_bytes, pack_bytes = 2 * n * es, n * es + n // 2
    return {
        "fake weight int4": (
            lambda: q4.fake_quantize_weight(w, group_size=g),
            lambda: R.fake_weight_int4(w, g),
            fake_bytes,
        ),
        "fake act int4 (top-2)": (
            lambda: q4.fake_quantize_activation(w, group_size=g),
            lambda: R.fake_act_int4(w, g),
            fake_bytes,
        ),
        "fake fp4 (top-2)": (
            lambda: q4.fake_quantize_activation(w, fmt="fp4", group_size=g),
            lambda: R.fake_fp4(w, g),
            fake_bytes,
        ),
        "pack int4": (
            lambda: q4.pack_weight(w, group_size=g, out=packed["int4"]),
            lambda: R.pack(w, "int4", g),
            pack_bytes + meta["int4"],
        ),
        "unpack int4": (
            lambda: q4.unpack_weight(packed["int4"], dtype=w.dtype),
            lambda: R.unpack(refp["int4"], "int4", g, tuple(w.shape), w.dtype),
            pack_bytes + meta["int4"],
        ),
        "requant int4 (SR)": (
            lambda: q4.requantize_(moved, packed["int4"], seed=1, step=0, check_finite=False),
            lambda: R.requant_sr(moved, refp["int4"], "int4", g, 1, 0),
            pack_bytes + n // 2 + 2 * meta["int4"],
        ),
        "requant fp4 (SR)": (
            lambda: q4.requantize_(moved_fp4, packed["fp4"], seed=1, step=0, check_finite=False),
            lambda: R.requant_sr(moved_fp4, refp["fp4"], "fp4", g, 1, 0),
            pack_bytes + n // 2 + 2 * meta["fp4"],
        ),
    }


def bench_quantisers(args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    dtype = DTYPES[args.dtype]
    w = torch.randn(args.rows, args.cols, device=args.device).to(dtype)
    rows, table = [], []
    for op, (ours, ref, nbytes) in quantiser_cases(w, args.group_size).items():
        times = C.time_interleaved(
            {"ours": ours, "reference": ref}, args.device, warmup=1, rounds=args.rounds, max_seconds={"reference": 5.0}
        )
        s_ours, s_ref = C.summarize(times["ours"]), C.summarize(times["reference"])
        gbps = nbytes / (s_ours["median_ms"] / 1e3) / 1e9
        ratio = s_ref["median_ms"] / s_ours["median_ms"]
        table.append(
            [
                op,
                f"{s_ours['median_ms']:.2f}",
                f"{s_ours['iqr_ms']:.2f}",
                f"{gbps:.2f}",
                f"{s_ref['median_ms']:.2f}",
                f"{ratio:.1f}x",
            ]
        )
        rows.append(
            {
                "bench": "quant4_op",
                "env": env,
                "op": op,
                "numel": w.numel(),
                "dtype": args.dtype,
                "group_size": args.group_size,
                "ours": s_ours,
                "reference": s_ref,
                "gbps": gbps,
                "speedup_vs_reference": ratio,
            }
        )
    print(f"\nQuantisers, {args.rows}x{args.cols} {args.dtype}, group {args.group_size}, device {args.device}")
    C.print_table(["op", "ours ms", "IQR", "GB/s", "reference ms", "speed-up"], table)
    return rows


class Stack(nn.Module):
    """LLaMA-shaped blocks without attention mixing (the projections are what is quantised)."""

    def __init__(self, hidden: int, ffn: int, blocks: int, classes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            b = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(b, name, nn.Linear(hidden, hidden, bias=False))
            b.gate_proj, b.up_proj = nn.Linear(hidden, ffn, bias=False), nn.Linear(hidden, ffn, bias=False)
            b.down_proj = nn.Linear(ffn, hidden, bias=False)
            self.blocks.append(b)
        self.lm_head = nn.Linear(hidden, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            att = torch.sigmoid(b.q_proj(x)) * b.k_proj(x) + b.v_proj(x)
            x = x + b.o_proj(att)
            x = x + b.down_proj(nn.functional.silu(b.gate_proj(x)) * b.up_proj(x))
        return self.lm_head(x)


def _bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes() if t.numel() else 0


def weight_memory(model: nn.Module, opt: torch.optim.Optimizer, fused: bool) -> dict[str, float]:
    """Bytes per projection weight: at rest (params + packed buffers, between steps), the
    transient working copy during a step (unfused packed path only), and the optimizer state."""
    numel = rest = work = state = 0
    for name, m in model.named_modules():
        if not (isinstance(m, QuantLinear) or (isinstance(m, nn.Linear) and "blocks" in name)):
            continue
        w = m.weight
        numel += w.numel()
        if isinstance(m, QuantLinear) and m.storage == "packed":
            rest += sum(_bytes(b) for n, b in m.named_buffers() if n.startswith("weight_")) + _bytes(w)
            work += 0 if fused else w.numel() * w.element_size()
        else:
            rest += _bytes(w)
        state += sum(_bytes(v) for v in opt.state[w].values() if isinstance(v, torch.Tensor) and v.numel() > 1)
    return {"at_rest": rest / numel, "working_copy": work / numel, "optimizer_state": state / numel, "weights": numel}


def _training_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, losses: list[float]
) -> Callable[[], None]:
    """One timed training step of ``model`` (its loss appended to ``losses``)."""

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))

    return step


def bench_training(args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device=args.device, dtype=dtype)
    y = torch.randint(0, 16, (args.tokens,), generator=gen).to(args.device)
    rows, table = [], []
    dense = f"dense {args.dtype}"
    modes = (dense, "fake int4", "packed int4 unfused", "packed int4 fused", "packed fp4 unfused", "packed fp4 fused")
    for mode in modes:
        torch.manual_seed(0)
        model = Stack(args.hidden, args.ffn, args.blocks, 16).to(device=args.device, dtype=dtype)
        if mode != dense:
            quantize_model(model, fmt=mode.split()[1], group_size=args.group_size, storage=mode.split()[0])
        opt = sl.AdamW(model.parameters(), lr=1e-3)
        fused = mode.endswith(" fused")
        if mode.startswith("packed"):
            assert attach_packed_requant(opt, model, fused=fused).fused == fused

        losses: list[float] = []
        step = _training_step(model, opt, x, y, losses)
        times = C.time_interleaved({mode: step}, args.device, warmup=2, rounds=args.train_rounds)[mode]
        s = C.summarize(times)
        mem = weight_memory(model, opt, fused)
        table.append(
            [
                mode,
                f"{s['median_ms']:.1f}",
                f"{s['iqr_ms']:.1f}",
                f"{mem['at_rest']:.3f}",
                f"{mem['working_copy']:.2f}",
                f"{mem['optimizer_state']:.2f}",
                f"{losses[0]:.3f}",
                f"{losses[-1]:.3f}",
            ]
        )
        rows.append(
            {
                "bench": "quant4_train_step",
                "env": env,
                "mode": mode,
                "dtype": args.dtype,
                "hidden": args.hidden,
                "ffn": args.ffn,
                "blocks": args.blocks,
                "tokens": args.tokens,
                "group_size": args.group_size,
                "step": s,
                "bytes_per_weight": mem,
                "loss_first": losses[0],
                "loss_last": losses[-1],
            }
        )
    print(
        f"\nTraining step, {args.blocks} blocks, hidden {args.hidden}, ffn {args.ffn}, {args.tokens} tokens, "
        f"{args.dtype}, spam_lowmem.AdamW, device {args.device} (bytes per projection weight)"
    )
    C.print_table(
        [
            "storage",
            "step ms",
            "IQR",
            "B/w at rest",
            "B/w working (step)",
            "B/w optim state",
            "loss first",
            "loss last",
        ],
        table,
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--group-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=688)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--train-rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the core's OpenMP shares torch's runtime
    torch.set_flush_denormal(True)
    warnings.simplefilter("ignore")
    env = C.environment(args.device)
    rows = bench_quantisers(args, env) + bench_training(args, env)
    C.write_jsonl(args.out, rows)


if __name__ == "__main__":
    main()
