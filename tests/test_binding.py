"""The C++ boundary itself: bad buffers raise clear Python errors and nothing is written."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from spam_lowmem import _C
from spam_lowmem.qmap import quant_map

KW: dict[str, Any] = dict(
    beta1=0.9, beta2=0.999, eps=1e-6, clip_threshold=0.0, weight_decay_scale=0.0, reset=0, skip_nonfinite=True
)


def maps() -> list[list[object]]:
    return [[to_dlpack(t) for t in (q.values, q.midpoints, q.buckets)] for q in (quant_map(True), quant_map(False))]


def spam(columns: list[torch.Tensor], scales: list[float], counters: torch.Tensor, **kw: Any) -> None:
    """One SPAM step of one tensor through _C: p, g, m, v, absmax_m, absmax_v in `columns`."""
    batch = _C.StepBatch(*[[to_dlpack(t)] for t in columns], to_dlpack(counters), *maps())
    _C.step(batch, _C.SpamHyper(**{**KW, **kw}), scales)


def call(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    counters: torch.Tensor | None = None,
    scales: list[float] | None = None,
    **kw: Any,
) -> None:
    counters = torch.zeros(2, dtype=torch.int64) if counters is None else counters
    empty = torch.empty(0)
    spam([p, g, m, v, empty, empty], [0.1] if scales is None else scales, counters, **kw)


def test_valid_call_writes_in_place() -> None:
    p, g, m, v = torch.zeros(5), torch.ones(5), torch.zeros(5), torch.zeros(5)
    call(p, g, m, v)
    torch.testing.assert_close(m, torch.full((5,), 0.1))
    assert (p < 0).all()


def test_non_contiguous_tensor_is_rejected_not_copied() -> None:
    p = torch.zeros(4, 6).t()
    g, m, v = torch.ones(6, 4), torch.zeros(6, 4), torch.zeros(6, 4)
    with pytest.raises(TypeError, match="contiguous"):
        call(p, g, m, v)
    assert torch.equal(m, torch.zeros(6, 4))


def test_wrong_dtype_size_and_lengths() -> None:
    ok = [torch.zeros(5) for _ in range(4)]
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        call(torch.zeros(5, dtype=torch.float64), *ok[1:])
    with pytest.raises(ValueError, match="numel"):
        call(ok[0], torch.zeros(6), *ok[2:])
    with pytest.raises(TypeError, match="dtype differs"):
        call(ok[0], ok[1], torch.zeros(5, dtype=torch.bfloat16), ok[3])
    with pytest.raises(ValueError, match="update_scales"):
        call(*ok, scales=[0.1, 0.2])
    with pytest.raises(TypeError, match="counters"):
        call(*ok, counters=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="reset"):
        call(*ok, reset=7)
    assert all(torch.equal(t, torch.zeros(5)) for t in ok)


def test_8bit_buffers_are_checked() -> None:
    p, g = torch.zeros(300), torch.ones(300)
    codes, absmax = torch.zeros(300, dtype=torch.uint8), torch.zeros(2)
    counters = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="absmax"):
        spam([p, g, codes, codes.clone(), torch.zeros(1), absmax], [0.1], counters)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]: buffer too small"):
        spam([p, g, codes[:299].clone(), codes.clone(), absmax, absmax.clone()], [0.1], counters)
    assert torch.equal(p, torch.zeros(300))


def test_hyper_complements_are_computed_in_cpp_from_the_double() -> None:
    """1 - beta is formed in double from the Python float and rounded once, as the former
    Python-side `1.0 - beta`: bit-identical results, and no complement can disagree."""
    h = _C.SpamHyper(**{**KW, "beta1": 0.9, "beta2": 0.999})
    assert h.one_minus_beta1 == torch.tensor(1.0 - 0.9, dtype=torch.float32).item()
    assert h.one_minus_beta2 == torch.tensor(1.0 - 0.999, dtype=torch.float32).item()
    a = _C.AdamHyper(
        beta1=0.72, beta2=0.999, eps=1e-8, weight_keep=1.0, skip_nonfinite=True, reset=_C.MomentReset.AFTER_UPDATE
    )
    assert a.one_minus_beta1 == torch.tensor(1.0 - 0.72, dtype=torch.float32).item()
    assert a.reset == _C.MomentReset.AFTER_UPDATE == 2
    s = _C.StatHyper(gamma1=0.7 * 0.8, gamma2=0.9, gamma3=0.999)
    assert s.one_minus_gamma1 == torch.tensor(1.0 - 0.7 * 0.8, dtype=torch.float32).item()


def test_typed_arguments_are_checked() -> None:
    p, g, m, v, empty = torch.zeros(5), torch.ones(5), torch.zeros(5), torch.zeros(5), torch.empty(0)
    counters = torch.zeros(2, dtype=torch.int64)
    columns = [[to_dlpack(t)] for t in (p, g, m, v, empty, empty)]
    with pytest.raises(ValueError, match="stream"):  # a CUDA stream handed to the CPU core
        _C.StepBatch(*columns, to_dlpack(counters), *maps(), stream=1234)
    columns = [[to_dlpack(t)] for t in (p, g, m, v, empty, empty)]
    batch = _C.StepBatch(*columns, to_dlpack(counters), *maps())
    assert len(batch) == 1
    adam = _C.AdamHyper(beta1=0.9, beta2=0.999, eps=1e-8, weight_keep=1.0, skip_nonfinite=True)
    stat = _C.StatHyper(gamma1=0.7, gamma2=0.9, gamma3=0.999)
    with pytest.raises(ValueError, match="bias_correction2"):
        _C.StableStats([to_dlpack(torch.zeros(3))], [0.1], [], [0.1])
    with pytest.raises(ValueError, match="grad_stats"):  # two statistics for one tensor
        stats = _C.StableStats([to_dlpack(torch.zeros(3)), to_dlpack(torch.zeros(3))], [0.1] * 2, [0.1] * 2, [0.1] * 2)
        _C.step(batch, adam, stat, stats, [1e-3], [0.1])
    with pytest.raises(ValueError, match="scratch"):  # the CPU core takes none
        stats = _C.StableStats([to_dlpack(torch.zeros(3))], [0.1], [0.1], [0.1])
        _C.step(batch, adam, stat, stats, [1e-3], [0.1], to_dlpack(torch.empty(16, dtype=torch.uint8)))
    adamw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_keep=1.0)
    with pytest.raises(ValueError, match="sqrt_bc2s"):
        _C.step(batch, "adamw", adamw, {"step_sizes": [1e-3], "sqrt_bc2s": []}, True)
    with pytest.raises(ValueError, match="group_size"):
        _C.PackedWeightRef(
            to_dlpack(torch.zeros(4, dtype=torch.uint8)),
            to_dlpack(torch.zeros(1)),
            to_dlpack(torch.zeros(1, dtype=torch.uint8)),
            None,
            None,
            numel=8,
            fmt=0,
            group=3,
            seed=0,
            step=0,
        )
    assert not p.any() and not m.any() and not v.any()


@pytest.mark.filterwarnings("ignore:nanobind")  # it warns about the uninitialised instance
def test_packed_descriptors_are_checked_against_the_batch() -> None:
    p, g, m, v, empty = torch.empty(0), torch.ones(64), torch.zeros(64), torch.zeros(64), torch.empty(0)
    bad = torch.zeros(1, dtype=torch.int64)

    def batch(ref: object) -> None:
        _C.StepBatch(
            *[[to_dlpack(t)] for t in (p, g, m, v, empty, empty)],
            to_dlpack(torch.zeros(2, dtype=torch.int64)),
            *maps(),
            packed=[ref],
            packed_bad=to_dlpack(bad),
        )

    def ref(numel: int) -> object:
        return _C.PackedWeightRef(
            to_dlpack(torch.zeros(numel // 2, dtype=torch.uint8)),
            to_dlpack(torch.zeros(numel // 32)),
            to_dlpack(torch.zeros(numel // 32, dtype=torch.uint8)),
            None,
            None,
            numel=numel,
            fmt=0,
            group=32,
            seed=1,
            step=0,
        )

    batch(ref(64))
    with pytest.raises(ValueError, match=r"packed\[0\]: the packed weight has 128 elements"):
        batch(ref(128))
    with pytest.raises(TypeError, match="PackedWeightRef"):  # its __init__ never ran
        batch(_C.PackedWeightRef.__new__(_C.PackedWeightRef))
    with pytest.raises(TypeError, match="PackedWeightRef"):
        batch((1, 2))


def test_cpu_module_reports_threads_and_isa() -> None:
    assert _C.num_threads() >= 1
    assert _C.isa() in ("baseline", "avx2", "avx512", "avx512vbmi")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wrapper_subclass_without_data_pointer_is_rejected_not_dereferenced() -> None:
    """A DTensor (FSDP2) exports a DLPack capsule with a null data pointer: the core used to
    segfault on it. The boundary must raise, and the plain tensors of the call stay untouched."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        mesh = init_device_mesh("cpu", (1,))
        d = distribute_tensor(torch.randn(16, 16), mesh, [Shard(0)])
        p, m, v = torch.zeros(16, 16), torch.zeros(16, 16), torch.zeros(16, 16)
        with pytest.raises(TypeError, match="no data pointer"):
            call(p, d, m, v)
        with pytest.raises(TypeError, match="no data pointer"):
            call(d, torch.ones(16, 16), m, v)
        assert not p.any() and not m.any() and not v.any()
    finally:
        dist.destroy_process_group()
