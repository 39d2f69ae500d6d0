"""Shared benchmark plumbing: parameter sets, timing, environment capture, JSON lines.

Timing follows docs/design.md §8: warm up, then interleave the candidates round by round
(so drift in machine load hits all of them alike) and report the median and IQR. CUDA
runs are timed with events on the current stream; CPU runs with perf_counter.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: LLaMA-60M (docs/algorithms.md §1.1): hidden 512, 8 layers, ffn 1376, vocab 32000, untied head.
LLAMA_60M = dict(hidden=512, layers=8, ffn=1376, vocab=32000)


def llama_shapes(hidden: int, layers: int, ffn: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a LLaMA-style decoder, in model order."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed_tokens", (vocab, hidden))]
    for i in range(layers):
        pre = f"layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"{pre}.self_attn.{proj}", (hidden, hidden)))
        shapes += [
            (f"{pre}.mlp.gate_proj", (ffn, hidden)),
            (f"{pre}.mlp.up_proj", (ffn, hidden)),
            (f"{pre}.mlp.down_proj", (hidden, ffn)),
            (f"{pre}.input_layernorm", (hidden,)),
            (f"{pre}.post_attention_layernorm", (hidden,)),
        ]
    shapes += [("norm", (hidden,)), ("lm_head", (vocab, hidden))]
    return shapes


def make_params(
    shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device: str, seed: int = 0
) -> list[torch.nn.Parameter]:
    """Parameters with a fixed random gradient attached (the step is timed, not backward)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(dtype=dtype, device=device))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(dtype=dtype, device=device)
        params.append(p)
    return params


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], Any], device: str) -> float:
    """Seconds for one call of ``fn``."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(
    cases: dict[str, Callable[[], Any]],
    device: str,
    *,
    warmup: int,
    rounds: int,
    max_seconds: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Warm each case up, then time one call of every case per round, round after round.

    A case whose single call exceeds ``max_seconds[name]`` is timed fewer times (slow
    references), never fewer than 3.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            limit = (max_seconds or {}).get(name)
            if limit is not None and r >= 3 and sum(times[name]) > limit:
                continue
            times[name].append(time_once(fn, device))
    return times


def summarize(samples: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples) * 1e3, "iqr_ms": (qs[2] - qs[0]) * 1e3, "runs": len(samples)}


def copy_bandwidth(numel: int, dtype: torch.dtype, device: str, rounds: int = 10) -> float:
    """GB/s of a same-size tensor copy, counting bytes read + written (the step's roofline)."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    times = time_interleaved({"copy": lambda: dst.copy_(src)}, device, warmup=2, rounds=rounds)["copy"]
    return 2 * numel * src.element_size() / statistics.median(times) / 1e9


def environment(device: str) -> dict[str, Any]:
    """What a reader needs to reproduce a figure: date, machine, versions, commit."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import spam_lowmem
        from spam_lowmem import _C

        env.update(spam_lowmem=spam_lowmem.__version__, core_isa=_C.isa(), core_threads=_C.num_threads())
    except ImportError:
        pass
    with contextlib.suppress(OSError):  # no git: the row just lacks a commit
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda_runtime"] = torch.version.cuda
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_jsonl(path: str | None, rows: list[dict[str, Any]]) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
