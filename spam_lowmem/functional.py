"""Stateless, typed entry points into the C++/CUDA core.

Each step function updates every tensor of one parameter group on one device in place, with
a single call into the core (one OpenMP region on CPU, multi-tensor launches on the current
CUDA stream, no host synchronisation). Moments are dense (``exp_avgs[i]`` in the parameter
dtype, ``absmax_*[i]`` empty) or 8-bit (``exp_avgs[i]`` uint8 codes, ``absmax_*[i]`` one
float32 per block of 256: 1-D for flat blocks, 2-D ``[R, ceil(L/256)]`` for blocks restarting
at each of R rows, as :func:`spam_lowmem.qmap.absmax_shape` gives; the core reads the layout
from that shape). Callers pass detached, C-contiguous
tensors; the optimizers in :mod:`spam_lowmem.optim` take care of that.

Packed 4-bit weights (:class:`spam_lowmem.quant4.PackedWeight`) can be stepped in place by
:func:`spam_step`, :func:`stable_spam_step`, :func:`element_step` and :func:`adamw_step`
through ``packed``: one entry per tensor, ``None`` for a dense parameter or a
:class:`PackedStep` for a packed one, whose ``params[i]`` is then an empty tensor of the
working dtype (the gradient and the dense moments have that dtype). The core unpacks each
quantisation group, applies the element update, and re-quantises it with stochastic rounding
in one fused pass; the result equals ``unpack_weight`` -> the dense step ->
``requantize_(seed=, step=)`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import NamedTuple

import torch
from torch.utils.dlpack import to_dlpack

from . import _backend
from .qmap import absmax_shape, num_blocks, quant_map
from .quant4 import PackedWeight

__all__ = [
    "MomentReset",
    "PackedStep",
    "StatsReducer",
    "spam_step",
    "sparse_spam_step",
    "stable_spam_step",
    "adamw_step",
    "element_step",
    "element_algorithms",
    "quantize_blockwise",
    "dequantize_blockwise",
]

# How a momentum reset treats the current call: NONE, BEFORE_UPDATE (m, v read as zero, then
# updated: SPAM, Stable-SPAM clean mode), AFTER_UPDATE (step with the old m, v, then store
# zeros: Stable-SPAM as implemented). The core's own enum (spam::MomentReset), an IntEnum.
MomentReset = _backend.cpu_module().MomentReset


#: ``reduce_stats(stats, phase)`` of :func:`stable_spam_step`: reduces a float64 ``[n, 2]``
#: tensor of per-tensor (max|g|, sum g^2) across shards, in place (max, sum).
StatsReducer = Callable[[torch.Tensor, int], None]


class PackedStep(NamedTuple):
    """A packed weight stepped by the fused kernels, with the stochastic-rounding counter of
    :func:`spam_lowmem.quant4.requantize_` (``seed``, ``step``) this update uses."""

    weight: PackedWeight
    seed: int
    step: int


def _packed_kwargs(
    module: ModuleType,
    packed: Sequence[PackedStep | None] | None,
    packed_bad: torch.Tensor | None,
    grads: Sequence[torch.Tensor],
) -> dict[str, object]:
    """The ``packed``/``packed_bad`` keywords of the core's StepBatch (none when no tensor is
    packed, so dense groups pay nothing)."""
    if packed is None or all(item is None for item in packed):
        return {}
    if packed_bad is None:
        raise ValueError(
            "spam_lowmem: packed weights need 'packed_bad', an int64 tensor of 1 "
            "element on their device (non-finite groups are counted there)"
        )
    if len(packed) != len(grads):
        raise ValueError(f"spam_lowmem: 'packed' has {len(packed)} entries for {len(grads)} tensors")
    refs: list[object] = []
    for item, grad in zip(packed, grads):
        if item is None:
            refs.append(None)
            continue
        if not isinstance(item, PackedStep):
            raise TypeError(f"spam_lowmem: packed entries must be None or PackedStep, got {type(item).__name__}")
        w = item.weight
        if w.numel != grad.numel():
            raise ValueError(
                f"spam_lowmem: a packed weight of shape {w.shape} ({w.numel} elements) "
                f"got a gradient of {grad.numel()} elements"
            )
        refs.append(w._ref(module, seed=item.seed, step=item.step))
    return {"packed": refs, "packed_bad": to_dlpack(packed_bad)}


def _capsules(tensors: Sequence[torch.Tensor]) -> list[object]:
    """DLPack capsules for the core. ``to_dlpack`` costs ~0.5 us a tensor where the
    ``__dlpack__`` protocol method costs ~4 us, which matters for groups of many small
    tensors. A capsule keeps its tensor alive until the core has imported it."""
    return [to_dlpack(t) for t in tensors]


def _map_capsules(signed: bool, device: torch.device) -> list[object]:
    q = quant_map(signed, device)
    return _capsules([q.values, q.midpoints, q.buckets, q.simd])


# The arguments of a core `step` after the batch, built on the module that runs it (each core
# module has its own hyper-parameter classes).
_StepArgs = Callable[[ModuleType], tuple[object, ...]]


def _step(
    columns: Sequence[Sequence[torch.Tensor]],
    counters: torch.Tensor,
    args: _StepArgs,
    *,
    sparse: bool = False,
    offsets: Sequence[int] | None = None,
    packed: Sequence[PackedStep | None] | None = None,
    packed_bad: torch.Tensor | None = None,
) -> None:
    """The one path into the core: the call's tensors become a typed batch (checked by the
    core when built: devices, dtypes, sizes, contiguity) on the module serving the counters'
    device, and that module's ``step`` runs the algorithm its argument types name.

    ``columns``: params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v (sparse: then
    block_starts, subsets, and ``offsets``), one tensor per parameter each."""
    device = counters.device
    module = _backend.module_for(device)
    arrays = [_capsules(c) for c in columns]
    maps = (_map_capsules(True, device), _map_capsules(False, device))
    stream = _backend.stream_for(device)
    if sparse:
        shards = {} if offsets is None else {"offsets": [int(o) for o in offsets]}
        batch = module.SparseBatch(*arrays, to_dlpack(counters), *maps, stream=stream, **shards)
    else:
        batch = module.StepBatch(
            *arrays, to_dlpack(counters), *maps, stream=stream, **_packed_kwargs(module, packed, packed_bad, columns[1])
        )
    module.step(batch, *args(module))


def _spam_args(hyper: dict[str, float | int | bool], update_scales: Sequence[float]) -> _StepArgs:
    """The arguments of a dense or sparse SPAM ``step``: SpamHyper and the update scales."""

    def args(module: ModuleType) -> tuple[object, ...]:
        return module.SpamHyper(**hyper), list(update_scales)

    return args


def spam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    absmax_m: Sequence[torch.Tensor],
    absmax_v: Sequence[torch.Tensor],
    update_scales: Sequence[float],
    counters: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    clip_threshold: float,
    weight_decay_scale: float,
    reset: int,
    skip_nonfinite: bool,
    packed: Sequence[PackedStep | None] | None = None,
    packed_bad: torch.Tensor | None = None,
) -> None:
    """One SPAM step (docs/algorithms.md §2.4) over tensors that all live on one device.

    ``update_scales[i] = lr * s * sqrt(1 - beta2^t_i) / (1 - beta1^t_i)``; ``clip_threshold``
    is theta, or 0 for no clipping this call; ``counters`` (int64, 2 entries, same device)
    accumulates [clipped, non-finite] entries. ``packed``/``packed_bad``: packed 4-bit
    weights stepped in the fused pass (module docstring).
    """
    hyper = dict(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        clip_threshold=clip_threshold,
        weight_decay_scale=weight_decay_scale,
        reset=reset,
        skip_nonfinite=skip_nonfinite,
    )
    _step(
        (params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v),
        counters,
        _spam_args(hyper, update_scales),
        packed=packed,
        packed_bad=packed_bad,
    )


def sparse_spam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    absmax_m: Sequence[torch.Tensor],
    absmax_v: Sequence[torch.Tensor],
    block_starts: Sequence[torch.Tensor],
    subsets: Sequence[torch.Tensor],
    update_scales: Sequence[float],
    counters: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    clip_threshold: float,
    weight_decay_scale: float,
    reset: int,
    skip_nonfinite: bool,
    offsets: Sequence[int] | None = None,
) -> None:
    """One SPAM step of a sparse-momentum group (docs/algorithms.md §3), on CPU or CUDA.

    Moments are compact (one value per selected entry, in flat-index order; dense in the
    parameter dtype or 8-bit with one absmax per 256 compact values). ``subsets[i]`` is the
    int64 ``[seed, t_hash, t_index, numel]`` of :mod:`spam_lowmem.sparse_subset` and
    ``block_starts[i]`` the int64 flat index of the first selected entry of each compact
    block. Unselected entries of ``params[i]`` are not written. Other arguments as
    :func:`spam_step`. On CUDA the subsets and block starts are device tensors, read by the
    kernel (no host sync); the CPU and CUDA kernels give the same results on the same state.

    ``offsets[i]`` (default all 0): ``params[i]`` is a shard of a larger parameter whose flat
    element ``offsets[i] + j`` is its element ``j`` (the rows an FSDP2 rank steps;
    docs/algorithms.md §13.3). The subset is then the rule of the whole parameter (its ``numel``
    the global one) and membership is tested on global indices, while ``block_starts[i]`` and
    the compact moments are local. ``offsets[i] >= 0`` and ``offsets[i] + params[i].numel() <=
    numel < 2^32`` (ValueError on CPU; on CUDA, where the rule stays on the device, a tensor
    whose range is outside its rule is left untouched).
    """
    hyper = dict(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        clip_threshold=clip_threshold,
        weight_decay_scale=weight_decay_scale,
        reset=reset,
        skip_nonfinite=skip_nonfinite,
    )
    _step(
        (params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, block_starts, subsets),
        counters,
        _spam_args(hyper, update_scales),
        sparse=True,
        offsets=offsets,
    )


def stable_spam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    absmax_m: Sequence[torch.Tensor],
    absmax_v: Sequence[torch.Tensor],
    grad_stats: Sequence[torch.Tensor],
    stat_bias_corrections: Sequence[float],
    step_sizes: Sequence[float],
    sqrt_bc2s: Sequence[float],
    counters: torch.Tensor,
    *,
    gamma1: float,
    gamma2: float,
    gamma3: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_keep: float,
    reset: int,
    skip_nonfinite: bool,
    packed: Sequence[PackedStep | None] | None = None,
    packed_bad: torch.Tensor | None = None,
    reduce_stats: StatsReducer | None = None,
) -> None:
    """One Stable-SPAM step (docs/algorithms.md §4.4) over tensors that all live on one device.

    ``gamma1`` and ``beta1`` already include the cosine factor ``sc``;
    ``stat_bias_corrections`` holds ``(1-gamma1^k, 1-gamma2^k, 1-gamma3^k)`` per tensor;
    ``step_sizes[i] = lr / (1 - beta1^k_i)``, ``sqrt_bc2s[i] = sqrt(1 - beta2^k_i)``;
    ``weight_keep = 1 - lr * weight_decay``. ``packed``/``packed_bad``: packed 4-bit weights
    (module docstring); their max|g| and ||g|| come from the gradient as for any tensor.

    ``reduce_stats``: the cross-shard reduction of the per-tensor statistics, for tensors of
    which this process holds only a shard (FSDP2: ``grads[i]`` is the local shard of tensor
    ``i``, and every rank makes the same call with its own shards). The core owns the
    arithmetic, the caller the communication. ``reduce_stats(stats, phase)`` is called with the
    GIL held; ``stats`` is a float64 tensor of shape ``[len(grads), 2]`` on the step's device,
    allocated for this call; row ``i`` belongs to tensor ``i``, column 0 is a max|g| and column
    1 a sum of squares (squares of fp32 values summed in float64). The callback must replace
    **every row, in place, in both phases, the same way**: column 0 by its max over the shards,
    column 1 by its sum over the shards (``stats[:, 0]`` and ``stats[:, 1]`` are strided views:
    reduce contiguous copies and copy back). The rule:

    * The callback is called exactly twice per call, ``phase=1`` then ``phase=2``, whenever
      there is at least one tensor, whether or not any tensor clips (so all ranks make the same
      collectives without having to agree on anything first; on CUDA the clip decision stays
      on the device). With no tensor it is not called.
    * Phase 1 (before AdaClip, §4.4 step 3): column 0 holds the local max|g| of the raw
      gradient (non-finite entries left out under ``skip_nonfinite``; NaN under "propagate"
      when the shard has a NaN), column 1 its local sum of squares. What the callback leaves
      is the tensor's max|g| and, for a tensor that does not clip, its ||g||^2: AdaClip's
      EMA, its threshold and whether the tensor clips are computed from the global max, so
      every rank decides the same.
    * Phase 2 (before AdaGN, §4.4 step 4): column 1 holds the local sum of squares of the
      *clipped* gradient for every tensor that clips, and 0.0 for every tensor that does not;
      column 0 still holds the phase-1 global max (a max over shards leaves it unchanged; it is
      not read again). What the callback leaves in column 1 is ||g||^2 of a clipping tensor;
      a non-clipping tensor keeps its phase-1 global sum (kept by the core) and its row is
      not read.
    * The values are used as left, unchecked (a check would cost a host sync on CUDA), after
      the same fix-up as a local reduction: under "propagate" a NaN sum makes the max NaN. A
      non-finite value then acts exactly as a non-finite local statistic under "propagate"
      does: a NaN max makes ``grad_stats[i][0]`` (M) NaN, so the tensor is not clipped, on this
      call or any later one; a NaN sum makes ||g||, and so ``grad_stats[i][1:]`` (mu, nu), NaN:
      this call's gradient is not normalised (the ``||g|| > 0`` guard is false) and every later
      call normalises to a NaN target, so the parameter becomes NaN. Write finite values.
    * An exception raised by the callback propagates out of this function unchanged, and the
      parameters, moments, ``grad_stats`` and ``counters`` are as before the call (the update
      has not run; ``grad_stats`` are written only after the last callback returned).
    * CUDA: the local values are enqueued on the current stream before each call, and the
      kernels that read the reduced ones are enqueued after it returns, on that stream, with no
      host sync: the callback must enqueue its work on the current stream (``torch.distributed``
      collectives do) or order it with that stream itself.

    Without ``reduce_stats`` the step is the single-shard one, bit for bit, and allocates
    nothing more.
    """
    corrections = list(stat_bias_corrections)
    if len(corrections) != 3 * len(grad_stats):
        raise ValueError(
            f"spam_lowmem: 'stat_bias_corrections' needs 3 entries per tensor: "
            f"{len(corrections)} for {len(grad_stats)} grad_stats"
        )
    if reduce_stats is not None and not callable(reduce_stats):
        raise TypeError(f"spam_lowmem: 'reduce_stats' must be callable, got {type(reduce_stats).__name__}")
    device = counters.device

    def args(module: ModuleType) -> tuple[object, ...]:
        # the core's statistics take one list per correction: no per-tensor tuple is built
        stats = module.StableStats(_capsules(grad_stats), corrections[0::3], corrections[1::3], corrections[2::3])
        scratch = None
        if device.type == "cuda":
            # sizes from the gradients: a packed weight's params entry is empty
            nbytes = module.stable_spam_scratch_bytes([g.numel() for g in grads])
            scratch = to_dlpack(torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device))
        core_args: tuple[object, ...] = (
            module.AdamHyper(
                beta1=beta1, beta2=beta2, eps=eps, weight_keep=weight_keep, skip_nonfinite=skip_nonfinite, reset=reset
            ),
            module.StatHyper(gamma1=gamma1, gamma2=gamma2, gamma3=gamma3),
            stats,
            list(step_sizes),
            list(sqrt_bc2s),
            scratch,
        )
        if reduce_stats is None:
            return core_args
        # Python allocates the exchange buffer (through torch) and owns the communication; the
        # core writes the local values into it, calls back, and reads the global ones.
        exchange = torch.empty((len(grads), 2), dtype=torch.float64, device=device)

        def reduce(phase: int) -> None:
            reduce_stats(exchange, phase)

        return (*core_args, to_dlpack(exchange), reduce)

    _step(
        (params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v), counters, args, packed=packed, packed_bad=packed_bad
    )


def element_step(
    algorithm: str,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    absmax_m: Sequence[torch.Tensor],
    absmax_v: Sequence[torch.Tensor],
    counters: torch.Tensor,
    *,
    hyper: Mapping[str, float],
    scalars: Mapping[str, Sequence[float]],
    skip_nonfinite: bool,
    packed: Sequence[PackedStep | None] | None = None,
    packed_bad: torch.Tensor | None = None,
) -> None:
    """One step of an element algorithm of the core (``cpp/spam/algorithms.h``; AdamW, ...:
    an element function with per-call and per-tensor constants, docs/design.md §6) over
    tensors that all live on one device.

    ``hyper`` holds exactly the algorithm's per-call constants and ``scalars`` exactly its
    per-tensor lists, one value per tensor (:func:`element_algorithms` names them); a missing
    or unknown keyword, or a list of another length, is a ``ValueError``. ``counters`` and
    ``packed``/``packed_bad`` as :func:`spam_step`.
    """
    hyper_args = dict(hyper)
    scalar_args = {name: list(values) for name, values in scalars.items()}

    def args(module: ModuleType) -> tuple[object, ...]:
        return algorithm, hyper_args, scalar_args, skip_nonfinite

    _step(
        (params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v), counters, args, packed=packed, packed_bad=packed_bad
    )


def element_algorithms() -> dict[str, dict[str, list[str]]]:
    """The core's element algorithms: ``{name: {"hyper": [...], "scalars": [...]}}``, the
    keywords :func:`element_step` takes for each."""
    return _backend.cpu_module().element_algorithms()


def adamw_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    absmax_m: Sequence[torch.Tensor],
    absmax_v: Sequence[torch.Tensor],
    step_sizes: Sequence[float],
    sqrt_bc2s: Sequence[float],
    counters: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_keep: float,
    skip_nonfinite: bool,
    packed: Sequence[PackedStep | None] | None = None,
    packed_bad: torch.Tensor | None = None,
) -> None:
    """One AdamW step with ``torch.optim.AdamW``'s conventions (decay first, eps after bias
    correction); ``step_sizes[i] = lr / (1 - beta1^k_i)``, ``sqrt_bc2s[i] = sqrt(1 - beta2^k_i)``.
    ``packed``/``packed_bad``: packed 4-bit weights (module docstring). The element algorithm
    ``"adamw"`` through :func:`element_step`."""
    element_step(
        "adamw",
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        absmax_m,
        absmax_v,
        counters,
        hyper={"beta1": beta1, "beta2": beta2, "eps": eps, "weight_keep": weight_keep},
        scalars={"step_sizes": step_sizes, "sqrt_bc2s": sqrt_bc2s},
        skip_nonfinite=skip_nonfinite,
        packed=packed,
        packed_bad=packed_bad,
    )


def quantize_blockwise(
    x: torch.Tensor, *, signed: bool = True, flat: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantisation (blocks of 256, fp32 absmax, dynamic map), in the layout of
    the optimizers' 8-bit moments (docs/algorithms.md §13.2).

    Returns ``(codes, absmax)``: uint8 codes shaped like ``x``, and one float32 absmax per
    block. For ``x.dim() >= 2`` the blocks restart at each of its ``R = x.shape[0]`` rows:
    absmax ``[R, ceil(L/256)]`` with ``L = x.numel() / R``; for 0-D/1-D ``x``, or with
    ``flat=True``, they run over the flattened tensor: codes ``[numel]`` and absmax
    ``[ceil(numel/256)]`` (the layout before rows). ``signed`` picks the map (True: values in
    [-1, 1]; False: [0, 1]).
    """
    _check_quant_input(x)
    src = x.detach().contiguous()
    if flat:
        src = src.reshape(-1)
    codes = torch.empty(src.shape, dtype=torch.uint8, device=src.device)
    absmax = torch.empty(absmax_shape(src.shape), dtype=torch.float32, device=src.device)
    _backend.module_for(src.device).quantize_blockwise(
        to_dlpack(src),
        to_dlpack(codes),
        to_dlpack(absmax),
        _map_capsules(signed, src.device),
        stream=_backend.stream_for(src.device),
    )
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool = True, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: a tensor shaped like ``codes``. The layout comes
    from ``absmax``: 1-D ``[ceil(numel/256)]`` is flat, 2-D ``[R, ceil(L/256)]`` restarts the
    blocks at each of ``R`` rows of ``L = codes.numel() / R`` elements."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"dequantize_blockwise: codes must be uint8, got {codes.dtype}")
    if absmax.dtype != torch.float32 or absmax.dim() not in (1, 2):
        raise ValueError("dequantize_blockwise: absmax must be float32, 1-D (flat) or 2-D [rows, blocks per row]")
    if absmax.dim() == 1 and absmax.numel() != num_blocks(codes.numel()):
        raise ValueError("dequantize_blockwise: a 1-D absmax needs one entry per 256 codes")
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    _backend.module_for(codes.device).dequantize_blockwise(
        to_dlpack(codes.contiguous()),
        to_dlpack(absmax.contiguous()),
        to_dlpack(out),
        _map_capsules(signed, codes.device),
        stream=_backend.stream_for(codes.device),
    )
    return out


def _check_quant_input(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_blockwise: expected a float32/bfloat16/float16 tensor, got {x.dtype}")
