"""The ranks of tests/test_distributed.py: each scenario runs in real processes (gloo, CPU), one
per rank, started by the test with ``python distributed_cases.py SCENARIO RANK WORLD PORT OUT``.

Not a test module (no ``test_`` prefix): the test loads it by path both in the ranks and in
its own process, where it runs the unsharded oracle with the same model, settings and
gradients (``gradient``) and compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spam_lowmem as sl

STEPS = 6  # two momentum resets (reset_interval 3) for SPAM and Stable-SPAM
RESUME_AT = 3  # the DCP scenarios save after this many steps

_SPAM = {"lr": 1e-2, "reset_interval": 3, "warmup_steps": 2, "clip_delay": 0, "threshold": 2.0}
_STABLE = {"lr": 1e-2, "reset_interval": 3, "gammas": (0.7, 0.9, 0.999)}
_Q8 = {"state_bits": 8, "min_8bit_size": 1024}
#: name -> (optimizer class name, keyword arguments, sparse density or None)
CONFIGS: dict[str, tuple[str, dict[str, Any], float | None]] = {
    "spam32": ("SPAM", _SPAM, None),
    "spam8": ("SPAM", {**_SPAM, **_Q8}, None),
    "adamw32": ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}, None),
    "adamw8": ("AdamW", {"lr": 1e-2, "weight_decay": 0.1, **_Q8}, None),
    "stable32": ("StableSPAM", _STABLE, None),
    "stable8": ("StableSPAM", {**_STABLE, **_Q8}, None),
    "sparse32": ("SPAM", _SPAM, 0.3),
}

if os.environ.get("SPAM_DIST_CONFIGS"):  # debugging: run only some configs
    CONFIGS = {k: CONFIGS[k] for k in os.environ["SPAM_DIST_CONFIGS"].split(",")}


class Net(nn.Module):
    """Shapes chosen to break naive sharding: 129 rows over 2 ranks (65 + 64), rows of 72 and
    129 elements (8-bit blocks not aligned to 256 in the flat index), a 256-aligned matrix, a
    small 1-D parameter (32-bit moments under state_bits=8) and a large one (8-bit)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(129, 72, generator=g) * 0.1)
        self.b1 = nn.Parameter(torch.randn(129, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(300, 129, generator=g) * 0.1)
        self.w3 = nn.Parameter(torch.randn(64, 512, generator=g) * 0.1)
        self.n1 = nn.Parameter(torch.ones(8192))


def gradient(step: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The full gradient of parameter ``index`` at ``step``: Gaussian, with a few 50x spikes
    every other step so that SPAM and Stable-SPAM clip."""
    g = torch.Generator().manual_seed(1000 * step + index)
    grad = torch.randn(shape, generator=g)
    if step % 2 == 1:
        spikes = torch.rand(shape, generator=g) < 0.01
        grad = torch.where(spikes, grad * 50.0, grad)
    return grad


def param_groups(net: nn.Module, density: float | None) -> list[dict[str, Any]]:
    params = list(net.parameters())
    if density is None:
        return [{"params": params}]
    return [
        {"params": [p for p in params if p.dim() == 2], "density": density},
        {"params": [p for p in params if p.dim() != 2]},
    ]


def make_optimizer(net: nn.Module, config: str) -> torch.optim.Optimizer:
    cls, kwargs, density = CONFIGS[config]
    return getattr(sl, cls)(param_groups(net, density), **kwargs)


def set_gradients(net: nn.Module, step: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    for index, p in enumerate(net.parameters()):
        full = gradient(step, index, tuple(p.shape))
        p.grad = distribute_tensor(full, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else full


def full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Full (unsharded) parameters and state tensors (from ``state_dict()``, sparse moments
    expanded to the parameter's shape, without the per-rank compact block starts), the spike
    counts and the memory report."""
    from spam_lowmem.sparse_subset import subset_mask

    params = {name: full(p.detach()).clone() for name, p in net.named_parameters()}
    sd = opt.state_dict()
    saved, ids = sd["state"], {}
    for saved_group, group in zip(sd["param_groups"], opt.param_groups):
        ids.update({id(p): pid for pid, p in zip(saved_group["params"], group["params"])})
    state = {}
    for name, p in net.named_parameters():
        st = {k: (full(v).clone() if isinstance(v, torch.Tensor) else v) for k, v in saved.get(ids[id(p)], {}).items()}
        st.pop("compact_block_starts", None)
        if "subset" in st and st["exp_avg"].dim() == 1:  # compact over the whole parameter
            mask = subset_mask(st["subset"])
            for key in ("exp_avg", "exp_avg_sq"):
                dense = torch.zeros(p.shape, dtype=st[key].dtype)
                dense.view(-1)[mask] = st[key]
                st[key] = dense
        state[name] = st
    return {"params": params, "state": state, "spikes": opt.spike_stats(), "memory": opt.memory_report()}


def run_steps(net: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        set_gradients(net, step)
        opt.step()


def sharded_net() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    net = Net()
    fully_shard(net)
    return net


# ---------------------------------------------------------------------------------- scenarios
def scenario_fsdp(rank: int, out: Path) -> None:
    """Every config stepped STEPS times on FSDP2-sharded parameters."""
    result = {}
    for config in CONFIGS:
        net = sharded_net()
        opt = make_optimizer(net, config)
        run_steps(net, opt, range(STEPS))
        result[config] = snapshot(net, opt)
    if rank == 0:
        torch.save(result, out / "fsdp.pt")


def _dcp_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(net), "optim": get_optimizer_state_dict(net, opt)}


def _dcp_load(net: nn.Module, opt: torch.optim.Optimizer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    opt.zero_grad(set_to_none=True)  # DCP creates missing state by a step with zero gradients
    state = _dcp_state(net, opt)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(net, state["model"])
    set_optimizer_state_dict(net, opt, state["optim"])


def scenario_save(rank: int, out: Path) -> None:
    """RESUME_AT steps, a DCP checkpoint per config, then the remaining steps uninterrupted."""
    import torch.distributed.checkpoint as dcp

    result = {}
    for config in CONFIGS:
        net = sharded_net()
        opt = make_optimizer(net, config)
        run_steps(net, opt, range(RESUME_AT))
        dcp.save(_dcp_state(net, opt), checkpoint_id=str(out / f"ckpt_{config}"))
        run_steps(net, opt, range(RESUME_AT, STEPS))
        result[config] = snapshot(net, opt)
    if rank == 0:
        torch.save(result, out / "save.pt")


def scenario_load(rank: int, out: Path, source: Path, world: int) -> None:
    """Load each config's checkpoint from ``source`` (saved at any world size), save it again
    at this world size (for the next scenario), and run the remaining steps."""
    import torch.distributed.checkpoint as dcp

    result = {}
    for config in CONFIGS:
        net = sharded_net()
        opt = make_optimizer(net, config)
        _dcp_load(net, opt, source / f"ckpt_{config}")
        dcp.save(_dcp_state(net, opt), checkpoint_id=str(out / f"ckpt_{config}"))
        run_steps(net, opt, range(RESUME_AT, STEPS))
        result[config] = snapshot(net, opt)
    if rank == 0:
        torch.save(result, out / f"load_ws{world}.pt")


ZERO_CONFIGS = tuple(c for c in ("spam32", "stable32", "sparse32", "adamw8") if c in CONFIGS)


def scenario_zero(rank: int, out: Path) -> None:
    """ZeroRedundancyOptimizer over our optimizers on replicated (DDP-style) parameters: each rank
    steps the parameters of its partition and broadcasts them. Uninterrupted, and resumed from
    its consolidated state dict at RESUME_AT."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def make(net: nn.Module, config: str) -> ZeroRedundancyOptimizer:
        cls, kwargs, density = CONFIGS[config]
        groups = param_groups(net, density)
        first = {"density": density} if density else {}
        zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=getattr(sl, cls), **kwargs, **first)
        for group in groups[1:]:
            zero.add_param_group({**group, "density": 1.0})
        return zero

    result = {}
    for config in ZERO_CONFIGS:
        runs = {}
        for resumed in (False, True):
            net = Net()
            opt = make(net, config)
            run_steps(net, opt, range(RESUME_AT))
            if resumed:
                opt.consolidate_state_dict(to=0)
                path = out / f"zero_{config}.pt"
                if rank == 0:
                    torch.save(opt.state_dict(), path)
                torch.distributed.barrier()
                net = Net()
                with torch.no_grad():  # the parameters at RESUME_AT (identical on every rank)
                    for p, q in zip(net.parameters(), runs[False]["at_resume"]):
                        p.copy_(q)
                opt = make(net, config)
                opt.load_state_dict(torch.load(path, weights_only=False))
            at_resume = [p.detach().clone() for p in net.parameters()]
            run_steps(net, opt, range(RESUME_AT, STEPS))
            runs[resumed] = {
                "at_resume": at_resume,
                "params": {n: p.detach().clone() for n, p in net.named_parameters()},
            }
        result[config] = {"uninterrupted": runs[False]["params"], "resumed": runs[True]["params"]}
    if rank == 0:
        torch.save(result, out / "zero.pt")


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    scenario, rank, world, port, out = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), Path(argv[4])
    torch.manual_seed(100 + rank)  # ranks' global RNGs differ, as in real jobs: nothing may use them
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        if scenario == "fsdp":
            scenario_fsdp(rank, out)
        elif scenario == "save":
            scenario_save(rank, out)
        elif scenario == "zero":
            scenario_zero(rank, out)
        elif scenario == "load":
            scenario_load(rank, out, Path(argv[5]), world)
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
