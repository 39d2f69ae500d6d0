"""The training loop: schedule, evaluation, metrics, checkpoints and exact resume.

Learning-rate schedule (docs/algorithms.md §1.3): linear warmup, then cosine decay to
``min_lr_ratio`` (0.1) of the base rate. Two deliberate differences from the authors' harness:
the first update uses ``lr / warmup`` instead of 0, and we run exactly ``steps`` updates (no
extra near-zero update at the end).

Resume is exact: the checkpoint holds model, optimizer and scheduler state, the RNG states and
the data position (batches consumed; the batch order is a pure function of seed and position),
so ``run 3 steps + --resume 3`` writes the same losses as ``run 6``, bit for bit on CPU.

Under torchrun the same loop runs on every rank (:mod:`.distributed`): each rank trains on its
slice of every batch, only rank 0 writes the run folder, and checkpoints are DCP folders
(:mod:`.checkpoint_dcp`) that resume at any world size.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from . import checkpoint_dcp
from . import data as D
from .config import RUN_FILES, TrainConfig, check_run_dir, write_json
from .distributed import FSDP_UNSUPPORTED, SINGLE, Runtime, check_batch
from .errors import UsageError
from .memory import PeakMemory, optimizer_state_bytes
from .model import build_model, count_parameters, get_spec
from .optimizers import SPAM_FAMILY, build_optimizer, parse_budget, planned_kwargs

__all__ = ["WarmupCosine", "evaluate", "grad_norm", "resolve_device", "train"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class WarmupCosine:
    """Multiplier of the base lr for update ``k = 0, 1, ...``: ``(k+1)/warmup`` during warmup,
    then ``r + (1-r)·½(1+cos(π·(k-warmup)/(total-warmup)))`` with ``r = min_ratio``."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.1) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return (k + 1) / self.warmup
        progress = min(1.0, (k - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    device: torch.device,
    runtime: Runtime | None = None,
) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, number of target tokens) over ``batches``.

    A sequence of T tokens has T-1 targets; we divide the summed per-token losses by their
    count, a true mean over tokens. The authors' harness (GaLore-derived, docs/algorithms.md §1.5)
    instead averages per-batch means and divides by ``n_batches + 1``, which biases its
    reported loss low by a factor of about n/(n+1); we deliberately do not replicate that.

    Distributed (every rank calls it): a batch that divides evenly over the ranks is split as
    in training and the sums are reduced; a shorter last batch is evaluated whole by every rank
    (FSDP needs every rank in every forward) and counted once, on rank 0.
    """
    rt = runtime or SINGLE
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x in batches:
        split = x.shape[0] % rt.world_size == 0
        x = (rt.local_rows(x) if split else x).to(device)
        n = x.shape[0] * (x.shape[1] - 1)
        loss = float(model(input_ids=x, labels=x).loss) * n
        if split or rt.is_main:
            total += loss
            count += n
    model.train(was_training)
    if rt.distributed:
        total, summed = rt.sum([total, count])
        count = int(summed)
    return total / count, count


def grad_norm(parameters: Sequence[torch.nn.Parameter]) -> float:
    """The global L2 norm of the gradients (NaN/inf if any entry is), read without changing them.

    Logged per step so that a gradient spike shows next to the loss; taken before clipping and
    before ``opt.step()``. Under FSDP2 the gradients are DTensor shards and the norm is reduced
    over the mesh (``full_tensor``); under DDP every rank holds the same all-reduced gradients.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _spike_counts(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Spike-clipped and non-finite gradient entries since the last call (SPAM family only)."""
    stats = getattr(opt, "spike_stats", None)
    if stats is None:
        return {}
    read = stats()
    return {"clipped": int(read["clipped"]), "nonfinite": int(read["nonfinite"])}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this torch build sees no CUDA GPU; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {name!r}; use cpu, cuda or auto")
    return torch.device(name)


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    path: Path,
    step: int,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    device: torch.device,
    config: dict[str, Any],
    batches_done: int,
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(
            {
                "format": 1,
                "step": step,
                "batches_consumed": batches_done,
                "config": config,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": _rng_state(device),
            },
            fh,
        )
        fh.flush()
        os.fsync(fh.fileno())  # on disk before the rename: a power loss leaves the old or the new file
    os.replace(tmp, path)


class _Metrics(NamedTuple):
    """What :func:`_read_metrics` found in ``metrics.jsonl``."""

    lines: list[bytes]  # the complete records kept, without their newline
    torn: str | None  # description of a torn last line that was dropped, or None
    train_seconds: float  # sum of the kept train records' "seconds"
    train_steps: list[int]  # steps of the kept train records


def _read_metrics(path: Path, step: int | None) -> _Metrics:
    """The records of ``path`` up to ``step`` (all if None), so that a resumed run's file equals an
    uninterrupted one. Reads only; raises UsageError (nothing written).

    A last line that is not a complete JSON record is dropped: a power loss (or a full disk)
    during an append leaves such a partial line, and its step is re-run from the checkpoint
    anyway. A bad line anywhere else is damage we cannot explain that way, so it is an error
    naming the file and line instead of a guess.
    """
    if not path.exists():
        return _Metrics([], None, 0.0, [])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    # bytes, not text: a torn write can end inside a multi-byte character or in zero fill
    numbered = [(n, line) for n, line in enumerate(raw.split(b"\n"), start=1) if line.strip()]
    kept: list[bytes] = []
    torn: str | None = None
    seconds, steps = 0.0, []
    for i, (n, line) in enumerate(numbered):
        record = _parse_record(line)
        if isinstance(record, str):
            preview = line[:60].decode("utf-8", errors="replace") + ("..." if len(line) > 60 else "")
            if i == len(numbered) - 1:
                torn = f"line {n}, {len(line)} bytes: {preview!r}"
                break
            raise UsageError(
                f"{path}: line {n} of {numbered[-1][0]} is damaged ({record}: {preview!r}); only a "
                "torn last line is repaired on --resume. Remove or fix that line, or start the "
                "run again with --overwrite"
            )
        if step is not None and record.get("step", 0) > step:
            continue
        kept.append(line)
        if record.get("type") == "train":
            seconds += float(record.get("seconds", 0.0))
            steps.append(record["step"])
    return _Metrics(kept, torn, seconds, steps)


def _parse_record(line: bytes) -> dict[str, Any] | str:
    """One metrics record, or why ``line`` is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return str(exc)
    if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
        return "not a metrics record (a JSON object with an integer step)"
    return record


def _write_metrics(path: Path, lines: list[bytes]) -> None:
    """Replace ``path`` by ``lines`` through a temporary file and an atomic rename, so that a
    second interruption during the repair cannot lose the records kept."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(b"".join(line + b"\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _repair_metrics(path: Path, metrics: _Metrics, log: Callable[[str], None]) -> None:
    """Write the kept records back (dropping a torn last line) and warn about what was lost."""
    if path.exists():
        _write_metrics(path, metrics.lines)
    if metrics.torn is not None:
        log(
            f"warning: {path}: dropped a torn last line ({metrics.torn}), left by an interrupted write; "
            "the file now ends at its last complete record"
        )


def _finished_summary(path: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The summary of a finished run in its folder, or None (no such file, unreadable, unfinished)."""
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log(f"warning: cannot read {path} ({exc}); it will be written again")
        return None
    return summary if isinstance(summary, dict) and summary.get("finished") is True else None


def _warm_up(device: torch.device) -> None:
    """One forward/backward of a throwaway micro model, so that lazy imports, kernel libraries and
    thread pools are loaded before peak memory is measured (they would count for nothing else)."""
    model = build_model(get_spec("micro"), 64, seed=0, device=device)
    x = torch.zeros(1, 8, dtype=torch.long, device=device)
    model(input_ids=x, labels=x).loss.backward()
    del model, x
    gc.collect()


def _optimizer_kwargs(cfg: TrainConfig, model: torch.nn.Module, budget: int | None) -> dict[str, Any]:
    if budget is not None:
        return {**planned_kwargs(model, budget, cfg.optimizer), **_reset_kwargs(cfg)}
    extra = _reset_kwargs(cfg)
    if cfg.state_bits is not None:
        extra["state_bits"] = cfg.state_bits
    if cfg.density is not None:
        extra["density"] = cfg.density
    return extra


def _reset_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The momentum-reset keywords given (``reset_interval``; SPAM also ``warmup_steps``)."""
    extra: dict[str, Any] = {}
    if cfg.reset_interval is not None:
        extra["reset_interval"] = cfg.reset_interval
    if cfg.reset_warmup is not None:
        extra["warmup_steps"] = cfg.reset_warmup
    return extra


def effective_group_size(requested: int, numels: Sequence[int]) -> int:
    """The 4-bit group size used: ``requested`` if it divides every weight's element count,
    else the largest power of two below it that does (groups never straddle two weights)."""
    if all(n % requested == 0 for n in numels):
        return requested
    g = 1 << (requested.bit_length() - 1)  # largest power of two <= requested
    while g >= 2 and any(n % g for n in numels):
        g //= 2
    if g < 2:
        raise UsageError(
            f"--quant-group-size {requested}: no power-of-two group size >= 2 divides the element "
            f"counts of all projection weights ({sorted(set(numels))})"
        )
    return g


def quantize_projections(cfg: TrainConfig, model: torch.nn.Module) -> dict[str, Any]:
    """W4A4 on the 7 projection linears (docs/algorithms.md §5.1), in place; returns the settings used."""
    from ..nn import quantize_model
    from .model import PROJECTIONS

    assert cfg.quant_format and cfg.weight_storage and cfg.quant_group_size
    numels = [
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS
    ]
    group = effective_group_size(cfg.quant_group_size, numels)
    try:
        quantize_model(
            model,
            PROJECTIONS,
            weight_bits=4,
            act_bits=4,
            fmt=cfg.quant_format,
            group_size=group,
            storage=cfg.weight_storage,
        )
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot quantise the model to 4 bits: {exc}") from exc
    return {
        "weight_bits": 4,
        "act_bits": 4,
        "format": cfg.quant_format,
        "storage": cfg.weight_storage,
        "group_size": group,
        "layers": len(numels),
        "projection_weights": sum(numels),
        "projection_weight_bytes": projection_weight_bytes(model),
    }


def projection_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the quantised projection weights keep between steps: the full-precision master
    weight (fake storage) or the packed codes and group metadata (packed storage)."""
    from ..nn import QuantLinear

    total = 0
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            continue
        if m.storage == "packed":
            total += m.packed_weight().nbytes()
        else:
            total += m.weight.numel() * m.weight.element_size()
    return total


def _check_options(cfg: TrainConfig) -> int | None:
    """Cheap checks of the optimizer options; returns the budget in bytes."""
    budget = parse_budget(cfg.budget) if cfg.budget is not None else None
    given = [
        f
        for f, v in (("--state-bits", cfg.state_bits), ("--density", cfg.density), ("--budget", budget))
        if v is not None
    ]
    resets = [
        f for f, v in (("--reset-interval", cfg.reset_interval), ("--reset-warmup", cfg.reset_warmup)) if v is not None
    ]
    if (given or resets) and cfg.optimizer not in SPAM_FAMILY:
        raise UsageError(
            f"{', '.join(given + resets)} only apply to {' and '.join(SPAM_FAMILY)}, not to {cfg.optimizer}"
        )
    if cfg.reset_warmup is not None and cfg.optimizer != "spam":
        raise UsageError("--reset-warmup is SPAM's post-reset warmup; Stable-SPAM has none (drop it)")
    if budget is not None and len(given) > 1:
        raise UsageError(
            "--budget chooses the optimizer settings itself; do not combine it with --state-bits or --density"
        )
    if budget is not None:
        import spam_lowmem

        if not hasattr(spam_lowmem, "plan"):
            raise UsageError(
                "--budget needs the memory planner spam_lowmem.plan(), which is not available "
                "in this build of spam_lowmem; use --state-bits / --density instead"
            )
    return budget


def _silent(message: str) -> None:
    """The log of the ranks other than 0 (rank 0 speaks for the job)."""


def _on_main(rt: Runtime, make: Callable[[], Any]) -> Any:
    """``make()`` on rank 0, its result (or its UsageError, raised) on every rank."""
    if not rt.distributed:
        return make()
    result: Any = None
    if rt.is_main:
        try:
            result = make()
        except UsageError as exc:  # the other ranks wait in the broadcast: send them the error
            result = exc
    result = rt.broadcast(result)
    if isinstance(result, UsageError):
        raise result
    return result


def _check_checkpoint_kind(rt: Runtime, out: Path, ckpt_path: Path, dcp_path: Path | None) -> None:
    """A run continues in the checkpoint format it was started with (see checkpoint_dcp)."""
    if not rt.distributed and dcp_path is not None:
        raise UsageError(
            f"the run in {out} was checkpointed by a distributed job ({dcp_path.name}/); resume it "
            "distributed: add --nproc N (N = 1 works) or start it under torchrun"
        )
    if rt.distributed and dcp_path is None and ckpt_path.exists():
        raise UsageError(
            f"the run in {out} was checkpointed by a single process ({ckpt_path.name}); resume it "
            "without --nproc and outside torchrun"
        )


def _load_dcp(
    path: Path,
    rt: Runtime,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    log: Callable[[str], None],
) -> int:
    """Restore a distributed checkpoint (every rank); returns its step."""
    try:
        state, rng = checkpoint_dcp.load(path, rt, model, opt)
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
    except Exception as exc:  # damaged or foreign folder: say so instead of a traceback
        raise UsageError(f"cannot resume from {path}: {type(exc).__name__}: {exc}") from exc
    if rng is not None:
        _set_rng_state(rng)
    else:  # harmless for the trajectory: training draws nothing from them (checkpoint_dcp)
        log(
            f"note: {path.name} was saved by {state.get('world_size')} ranks, this job has {rt.world_size}; "
            "the per-rank RNG states are not restored"
        )
    return start


def _write_run_files(out: Path, mode: str, corpus: D.Corpus, config: dict[str, Any]) -> None:
    """The first writes of a run (rank 0): its folder, cleared for --overwrite, caches, config."""
    out.mkdir(parents=True, exist_ok=True)
    if mode == "overwrite":
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        checkpoint_dcp.remove(out)
    corpus.save_cache()
    if mode != "resume":
        write_json(out / "config.json", config)


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cache_dir: Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Run (or continue) one training run in ``out``; returns the summary (also ``summary.json``).

    Every input check happens before the first write to ``out``. ``threads`` sets torch's CPU
    threads; bit-exact resume needs the same count (it changes the order of float reductions).
    ``stop_after`` (>= 1) is an update number of the whole run, not of this call.

    Resuming a run whose ``summary.json`` says it finished (or diverged) trains nothing and
    returns that summary unchanged. A torn last line of ``metrics.jsonl`` is dropped with a
    warning; a damaged line before it is a UsageError naming the file and line.

    ``runtime`` (default: one process) makes this process one rank of a distributed job
    (:func:`.distributed.start`); every rank calls ``train`` with the same arguments, only rank
    0 logs and writes, and the summary is returned on every rank.
    """
    wall0 = time.perf_counter()
    rt = runtime or SINGLE
    log = log or (lambda message: print(message, file=sys.stderr))
    if not rt.is_main:
        log = _silent
    if threads is not None:
        if threads <= 0:
            raise UsageError(f"--threads must be > 0, got {threads}")
        torch.set_num_threads(threads)
    if stop_after is not None and stop_after < 1:  # 0 or less used to run one update anyway
        raise UsageError(f"--stop-after must be >= 1, got {stop_after}")
    spec = get_spec(cfg.model)
    cfg.validate(spec.max_positions)
    device = resolve_device(cfg.device)
    if rt.distributed:
        assert rt.device is not None
        device = rt.device  # this rank's GPU, or the CPU
        check_batch(cfg.batch_size, rt.world_size)
        if rt.mode == "fsdp" and cfg.optimizer in FSDP_UNSUPPORTED:
            raise UsageError(
                f"--optimizer {cfg.optimizer} does not step FSDP2's sharded parameters; run it without "
                "--fsdp (DDP) or choose adamw, spam or stable-spam"
            )
        if cfg.weight_bits == 4 and cfg.weight_storage == "packed":
            # the codes live behind a zero-stride placeholder parameter: DDP cannot broadcast it
            # and FSDP2 cannot shard it
            raise UsageError(
                "--weight-storage packed runs in one process only; distributed 4-bit runs use --weight-storage fake"
            )
    if cfg.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {cfg.dtype!r}; use {' or '.join(DTYPES)}")
    budget = _check_options(cfg)
    if cfg.vocab_size < 258:
        raise UsageError(f"--vocab-size {cfg.vocab_size} is too small for a byte-level BPE (need >= 258)")
    docs = D.load_documents(cfg.data or None)
    config = {**cfg.to_dict(), "corpus_sha256": D.corpus_sha256(docs[0])}
    mode = check_run_dir(out, config, resume=resume, overwrite=overwrite)
    metrics_path = out / "metrics.jsonl"
    if mode == "resume":
        done = _finished_summary(out / "summary.json", log)
        if done is not None:
            # Nothing left to train: re-running the tail would only rewrite summary.json with this
            # process's timings (zero training time, no throughput) over the real ones.
            try:
                previous = _read_metrics(metrics_path, None)
            except UsageError as exc:  # nothing will be appended: report it, but it blocks nothing
                log(f"warning: {exc}")
            else:
                if previous.torn is not None and rt.is_main:
                    _repair_metrics(metrics_path, previous, log)
            how = "diverged" if done.get("diverged") else "finished"
            log(
                f"run in {out} already {how} ({done.get('steps')} of {cfg.steps} steps); its summary.json "
                "is kept as it is, nothing to do"
            )
            return done
    ckpt_path = out / "checkpoint.pt"
    dcp_path = checkpoint_dcp.find(out) if mode == "resume" else None
    if mode == "resume":
        _check_checkpoint_kind(rt, out, ckpt_path, dcp_path)
    # one rank tokenizes (the BPE is the slow part) and hands the corpus to the others
    corpus = _on_main(
        rt, lambda: D.prepare_corpus(cfg.data or None, cfg.vocab_size, cache_dir or out / "cache", loaded=docs)
    )
    train_chunks, val_chunks = D.split_validation(D.pack(corpus.train_tokens, cfg.seq_len), cfg.val_fraction)
    stream = D.BatchStream(train_chunks, cfg.batch_size, cfg.seed)
    held = D.eval_batches(D.pack(corpus.eval_tokens, cfg.seq_len), cfg.batch_size, cfg.eval_batches)
    val = D.eval_batches(val_chunks, cfg.batch_size, cfg.eval_batches) if len(val_chunks) else []

    _warm_up(device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    memory = PeakMemory(device)
    memory.start()
    model = build_model(spec, corpus.vocab_size, seed=cfg.seed, dtype=DTYPES[cfg.dtype], device=device)
    quant = quantize_projections(cfg, model) if cfg.weight_bits == 4 else None
    extra = _optimizer_kwargs(cfg, model, budget)  # planned on the whole model: the same at any world size
    model = rt.wrap(model)
    opt = build_optimizer(
        cfg.optimizer,
        rt.unwrap(model),
        spec,
        lr=cfg.lr,
        total_steps=cfg.steps,
        extra=extra,
        galore_rank=cfg.galore_rank,
        galore_gap=cfg.galore_gap,
        galore_scale=cfg.galore_scale,
    )
    if quant is not None and cfg.weight_storage == "packed":
        from ..nn import attach_packed_requant

        # spam_lowmem optimizers step the codes in one fused pass per group; others materialise,
        # step and re-quantise (stochastic rounding) through hooks
        quant["fused_step"] = attach_packed_requant(opt, model).fused
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    start = 0
    if dcp_path is not None:
        start = _load_dcp(dcp_path, rt, model, opt, sched, log)
        if start >= cfg.steps:
            log(f"run in {out} already finished ({start} steps); writing its missing summary.json")
    elif mode == "resume" and ckpt_path.exists():
        try:  # our own file (it pickles e.g. GaLore's projector objects), hence weights_only=False
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"])
            start = int(ckpt["step"])
        except Exception as exc:  # damaged or foreign file: say so instead of a traceback
            raise UsageError(f"cannot resume from {ckpt_path}: {type(exc).__name__}: {exc}") from exc
        del ckpt
        if start >= cfg.steps:  # finished, but its summary.json was lost: written again below
            log(f"run in {out} already finished ({start} steps); writing its missing summary.json")
    if stop_after is not None and start < cfg.steps and start >= stop_after:
        raise UsageError(
            f"--stop-after {stop_after}: the run in {out} is already at step {start}; give a "
            f"larger value, or drop --stop-after to train to step {cfg.steps}"
        )
    previous = _read_metrics(metrics_path, start) if mode == "resume" else _Metrics([], None, 0.0, [])
    rt.barrier()  # every rank has checked everything before rank 0 writes

    # ---- from here on we write (rank 0 alone, except the checkpoints)
    if rt.is_main:
        _write_run_files(out, mode, corpus, config)
    if mode == "resume" and rt.is_main:
        _repair_metrics(metrics_path, previous, log)
        missing = sorted(set(range(1, start + 1)) - set(previous.train_steps))
        if missing:  # e.g. records not yet on disk at a power loss, from a run without fsync
            log(
                f"warning: {metrics_path} has no train records for {len(missing)} of the {start} checkpointed "
                f"steps (steps {missing[0]}..{missing[-1]}); training continues from the checkpoint"
            )
    n_params = count_parameters(model)
    log(
        f"[{cfg.optimizer}] {cfg.model} model, {n_params / 1e6:.2f}M parameters, vocab {corpus.vocab_size}, "
        f"{len(stream.chunks)} train / {sum(len(b) for b in held)} eval sequences of {cfg.seq_len} tokens; "
        f"held-out {corpus.split}; device {device}, {cfg.dtype}" + (f"; resuming at step {start}" if start else "")
    )
    if extra:
        log(f"[{cfg.optimizer}] optimizer keywords: {extra}")
    if quant is not None:
        log(
            f"[{cfg.optimizer}] 4-bit: W4A4 {quant['format']} on {quant['layers']} projection layers, group "
            f"{quant['group_size']}, {quant['storage']} weight storage"
        )

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    # training time of the whole run: the earlier sessions' steps (from their metrics) plus this one's
    train_time, trained_steps = previous.train_seconds, len(previous.train_steps)
    eval_loss, diverged = float("nan"), False
    eval_step, eval_tokens = -1, 0
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=cfg.optimizer,
        disable=not progress or not rt.is_main,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
    model.train()
    with open(metrics_path if rt.is_main else os.devnull, "a", encoding="utf-8") as metrics:

        def emit(record: dict[str, Any]) -> None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

        step = start
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr_now = opt.param_groups[0]["lr"]
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x = rt.local_rows(stream.batch(step * cfg.grad_accum + micro)).to(device)
                loss = model(input_ids=x, labels=x).loss
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().item()
            if rt.distributed:  # equal slices: the mean of the ranks' losses is the global batch's
                loss_sum = rt.sum([loss_sum])[0] / rt.world_size
            # the norm before clipping and before the step: the spike the optimizer is about to see
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                norm_now = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            else:
                norm_now = grad_norm(list(model.parameters()))
            opt.step()
            spikes = _spike_counts(opt)  # one host sync per step; every rank calls it (FSDP2 reduces)
            sched.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_time += dt
            trained_steps += 1
            step += 1
            train_loss = loss_sum / cfg.grad_accum
            emit(
                {
                    "type": "train",
                    "step": step,
                    "loss": train_loss,
                    "lr": lr_now,
                    "tokens": step * tokens_per_step,
                    "seconds": round(dt, 5),
                    "grad_norm": norm_now,
                    **spikes,
                }
            )
            diverged = not math.isfinite(train_loss)
            if diverged or (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                eval_loss, eval_tokens = evaluate(model, held, device, rt)
                eval_step = step
                emit(
                    {
                        "type": "eval",
                        "step": step,
                        "loss": eval_loss,
                        "ppl": _ppl(eval_loss),
                        "tokens": step * tokens_per_step,
                    }
                )
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", eval=f"{eval_loss:.3f}")
            stopping = stop_after is not None and step >= stop_after
            if diverged:
                log(f"[{cfg.optimizer}] training diverged at step {step} (loss {train_loss})")
                break
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping:
                # the records up to this step reach the disk before the checkpoint that covers them,
                # so a power loss can only tear records after the checkpoint (re-run on --resume)
                if rt.is_main:
                    os.fsync(metrics.fileno())
                if rt.distributed:
                    state = {"step": step, "batches_consumed": step * cfg.grad_accum, "config": config}
                    state["scheduler"] = sched.state_dict()
                    checkpoint_dcp.save(out, rt, model, opt, state, _rng_state(device))
                else:
                    _save_checkpoint(ckpt_path, step, model, opt, sched, device, config, step * cfg.grad_accum)
            if stopping and step < cfg.steps:
                break
    bar.close()

    finished = step >= cfg.steps or diverged
    if finished and eval_step != step:
        eval_loss, eval_tokens = evaluate(model, held, device, rt)
    val_loss = evaluate(model, val, device, rt)[0] if finished and val else None
    state_bytes = optimizer_state_bytes(opt)  # this rank's (a DTensor counts its local shard)
    # FSDP2: the ranks hold disjoint shards, the whole state is their sum; DDP: each holds all
    total_state_bytes = int(rt.sum([state_bytes])[0]) if rt.mode == "fsdp" else state_bytes
    summary = {
        "optimizer": cfg.optimizer,
        "model": cfg.model,
        "parameters": n_params,
        "vocab_size": corpus.vocab_size,
        "steps": step,
        "finished": finished,
        "diverged": diverged,
        "resumed_from": start,
        "final_eval_loss": eval_loss,
        "final_eval_ppl": _ppl(eval_loss),
        "eval_tokens": eval_tokens,
        "final_val_loss": val_loss,  # on the validation split (val_fraction > 0), for choosing settings
        "unigram_eval_loss": D.unigram_cross_entropy(corpus.train_tokens, held, corpus.vocab_size),
        "optimizer_state_bytes": total_state_bytes,
        "peak_memory_bytes": memory.peak_bytes(),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "peak_memory_method": memory.method,
        "train_seconds": train_time,
        "tokens_per_second": trained_steps * tokens_per_step / train_time if train_time > 0 else None,
        "tokens_trained": step * tokens_per_step,
        "wall_seconds": time.perf_counter() - wall0,
        "optimizer_kwargs": extra,
        "device": str(device),
        "dtype": cfg.dtype,
        "corpus": corpus.source,
        "heldout_split": corpus.split,
        "torch_threads": torch.get_num_threads(),
        "quantization": quant,
    }
    if rt.distributed:  # peak_memory_bytes above is rank 0's; parameter and state bytes are the whole model's
        summary.update(world_size=rt.world_size, parallel=rt.mode, optimizer_state_bytes_per_rank=state_bytes)
    if finished and rt.is_main:
        write_json(out / "summary.json", summary)
    else:
        log(f"[{cfg.optimizer}] stopped after {step} of {cfg.steps} steps; continue with --resume")
    return summary
