"""spam_lowmem.integrations with transformers' Trainer: a tiny LLaMA on random tokens, CPU.

(a) the spam/* keys reach the Trainer's log history with sane values; (b) a run resumed from
a Trainer checkpoint ends bit-identical to an uninterrupted one; (c) the same for Stable-SPAM;
(d) build_optimizer with a budget takes the planner's choice; and the callback reads the
optimizer (collectives under FSDP2) only where every rank is, never in on_log.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import spam_lowmem as sl
from spam_lowmem.integrations.transformers import (
    SpikeStatsCallback,
    build_optimizer,
    unwrap_optimizer,
)

CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
#: SPAM settings that make a 10-step run clip, reset its momentum (calls 4 and 8) and warm up
SPAM_KW = dict(lr=1e-2, reset_interval=4, warmup_steps=2, clip_delay=1, threshold=2.0)
COUNTS = ("clipped", "nonfinite", "requant_nonfinite_groups", "nonfinite_state_blocks", "nonfinite_state_entries")


class RandomTokens(torch.utils.data.Dataset):
    """16 sequences of 16 random tokens, the labels equal to the inputs (causal LM loss)."""

    def __init__(self, n: int = 16, length: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, CONFIG["vocab_size"], (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)  # every run starts from the same weights
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))  # attention_dropout is 0: nothing random in a step
    assert model.config.attention_dropout == 0.0
    return model


def args(out: Path, max_steps: int, save_steps: int | None = None, **kw: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,  # 4 steps per epoch: a 10-step run crosses two epoch ends
        logging_steps=2,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        **kw,
    )


def train(
    out: Path,
    max_steps: int,
    optimizer: str = "spam",
    save_steps: int | None = None,
    resume: str | None = None,
    **opt_kw: Any,
) -> tuple[LlamaForCausalLM, Trainer, torch.optim.Optimizer]:
    model = tiny_llama()
    opt = build_optimizer(model, optimizer, **opt_kw)
    trainer = Trainer(
        model=model,
        args=args(out, max_steps, save_steps),
        train_dataset=RandomTokens(),
        optimizers=(opt, None),
        callbacks=[SpikeStatsCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, opt


def training_logs(trainer: Trainer) -> list[dict[str, Any]]:
    return [h for h in trainer.state.log_history if "loss" in h]


def assert_bit_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"{name}: max |diff| {(pa[name] - pb[name]).abs().max().item()}"


# ------------------------------------------------------------------ (a) logs
@pytest.fixture(scope="module")
def spam_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, Trainer, torch.optim.Optimizer]:
    """The uninterrupted 10-step SPAM run, shared by (a) and (b)."""
    return train(tmp_path_factory.mktemp("straight"), 10, **SPAM_KW)


def test_trainer_logs_spike_stats_and_state_bytes(spam_run: tuple[Any, Trainer, Any]) -> None:
    model, trainer, opt = spam_run
    assert isinstance(opt, sl.SPAM)
    # the Trainer built its LR scheduler around our optimizer (warmup + cosine on our lr)
    assert unwrap_optimizer(trainer.lr_scheduler.optimizer) is opt
    assert unwrap_optimizer(trainer.optimizer) is opt
    logs = training_logs(trainer)
    assert [h["step"] for h in logs] == [2, 4, 6, 8, 10]
    assert logs[0]["learning_rate"] == pytest.approx(SPAM_KW["lr"] / 2)  # step 2 of the 2-step linear warmup
    total = opt.memory_report()["total_bytes"]
    assert total > 0
    for h in logs:
        for key in COUNTS:
            value = h[f"spam/{key}"]
            assert isinstance(value, int) and value >= 0, (key, value)
        assert h["spam/nonfinite"] == 0 and h["spam/nonfinite_state_entries"] == 0
        assert h["spam/state_bytes"] == total
        assert "spam/state_bytes_rank0" not in h  # not distributed
    # threshold 2 clips from call 1 on, except on the reset calls: every window of 2 steps clips
    assert all(h["spam/clipped"] > 0 for h in logs)
    # each window counts its own 2 steps (the counters are reset when read)
    numel = sum(p.numel() for p in model.parameters())
    assert all(h["spam/clipped"] <= 2 * numel for h in logs)
    summary = trainer.state.log_history[-1]
    assert "train_runtime" in summary and summary["spam/state_bytes"] == total


def test_non_spam_optimizer_logs_nothing(tmp_path: Path) -> None:
    model = tiny_llama()
    trainer = Trainer(
        model=model,
        args=args(tmp_path, 4),
        train_dataset=RandomTokens(),
        optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-3), None),
        callbacks=[SpikeStatsCallback()],
    )
    trainer.train()
    assert training_logs(trainer) and not any(k.startswith("spam/") for h in trainer.state.log_history for k in h)


# ------------------------------------------------------------------ (b) resume
def test_resume_from_trainer_checkpoint_is_bit_exact(tmp_path: Path, spam_run: tuple[Any, Trainer, Any]) -> None:
    """Checkpoint at step 6 (mid second epoch, after the momentum reset at call 4 and before
    the one at 8); the resumed run must end on exactly the uninterrupted run's weights."""
    straight, straight_trainer, _ = spam_run
    train(tmp_path / "cut", 10, save_steps=6, **SPAM_KW)  # only to write checkpoint-6
    checkpoint = tmp_path / "cut" / "checkpoint-6"
    assert (checkpoint / "optimizer.pt").is_file()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what Trainer loads: our state_dict
    assert saved["param_groups"][0]["calls"] == 6
    resumed, resumed_trainer, _ = train(tmp_path / "cut", 10, save_steps=6, resume=str(checkpoint), **SPAM_KW)
    assert resumed_trainer.state.global_step == 10
    assert_bit_identical(straight, resumed)
    # the stats of the resumed steps equal those of the same steps uninterrupted
    tail = {h["step"]: h for h in training_logs(resumed_trainer)}
    for h in training_logs(straight_trainer):
        if h["step"] > 6:
            assert {k: h[k] for k in h if k.startswith("spam/")} == {
                k: tail[h["step"]][k] for k in h if k.startswith("spam/")
            }
            assert h["loss"] == tail[h["step"]]["loss"]


def test_resume_sparse_8bit_preset_is_bit_exact(tmp_path: Path) -> None:
    """A planner preset with sparse momentum: the subset generator travels in optimizer.pt."""
    kw = dict(preset="8bit-sparse-0.25", min_8bit_size=1024, **SPAM_KW)
    with pytest.raises(ValueError, match="conflict"):
        build_optimizer(tiny_llama(), "spam", **kw)  # the preset decides the state layout
    kw.pop("min_8bit_size")
    straight, _, _ = train(tmp_path / "straight", 6, **kw)
    train(tmp_path / "cut", 6, save_steps=3, **kw)
    resumed, _, opt = train(tmp_path / "cut", 6, save_steps=3, resume=str(tmp_path / "cut" / "checkpoint-3"), **kw)
    assert {g.get("density", 1.0) for g in opt.param_groups} == {0.25, 1.0}
    assert_bit_identical(straight, resumed)


# ------------------------------------------------------------------ (c) Stable-SPAM
def test_stable_spam_logs_and_resumes_bit_exact(tmp_path: Path) -> None:
    kw = dict(lr=1e-2, reset_interval=4, total_steps=6)
    straight, trainer, opt = train(tmp_path / "straight", 6, "stable-spam", **kw)
    assert isinstance(opt, sl.StableSPAM)
    logs = training_logs(trainer)
    assert all(h["spam/state_bytes"] == opt.memory_report()["total_bytes"] for h in logs)
    assert all(isinstance(h["spam/clipped"], int) and h["spam/clipped"] >= 0 for h in logs)
    train(tmp_path / "cut", 6, "stable-spam", save_steps=3, **kw)
    resumed, _, _ = train(
        tmp_path / "cut", 6, "stable-spam", save_steps=3, resume=str(tmp_path / "cut" / "checkpoint-3"), **kw
    )
    assert_bit_identical(straight, resumed)


# ------------------------------------------------------------------ (d) build_optimizer
def test_build_optimizer_takes_the_planners_choice() -> None:
    model = tiny_llama()
    target = sl.plan(model, preset="8bit-sparse-0.25")
    budget = target.predicted_total  # fits 0.25 but not 0.43: the planner must pick 0.25
    assert sl.plan(model, preset="8bit-sparse-0.43").predicted_total > budget
    chosen = sl.plan(model, budget=budget)
    assert chosen.name == "8bit-sparse-0.25"
    assert chosen.optimizer_kwargs["state_bits"] == 8 and chosen.optimizer_kwargs["density"] == 0.25

    opt = build_optimizer(model, "spam", budget=budget, lr=1e-3)
    assert isinstance(opt, sl.SPAM)
    assert [g["state_bits"] for g in opt.param_groups] == [8] * len(chosen.param_groups)
    assert [g["density"] for g in opt.param_groups] == [g["density"] for g in chosen.param_groups]
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in chosen.param_groups]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.memory_report()["total_bytes"] == chosen.predicted_total

    # a string budget, as the planner parses it: 80% of 32-bit AdamW state fits Stable-SPAM's
    # 8-bit preset (embedding and head in 8 bits, the small matrices fall back to 32) but not full-32
    assert sl.plan(model, "80%", optimizer="stable-spam").name == "8bit"
    stable = build_optimizer(model, "stable-spam", budget="80%")
    assert isinstance(stable, sl.StableSPAM)
    assert [g["state_bits"] for g in stable.param_groups] == [8]
    with pytest.raises(ValueError, match="sparse momentum"):
        build_optimizer(model, "stable-spam", preset="8bit-sparse-0.25")
    with pytest.raises(ValueError, match="smallest feasible budget"):
        build_optimizer(model, "spam", budget=100)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "sgd")


def test_build_optimizer_weight_decay_spares_biases_and_norms() -> None:
    model = tiny_llama()
    opt = build_optimizer(model, "adamw")  # sl.AdamW's default weight decay, 0.01
    assert isinstance(opt, sl.AdamW)
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert set(by_decay) == {0.01, 0.0}
    assert all(p.dim() >= 2 for p in by_decay[0.01]) and all(p.dim() == 1 for p in by_decay[0.0])
    assert sum(len(ps) for ps in by_decay.values()) == len(list(model.parameters()))
    # SPAM's default is 0 (the papers): one group, nothing to split
    assert len(build_optimizer(model, "spam").param_groups) == 1
    assert len(build_optimizer(model, "spam", weight_decay=0.1, decay_vectors=True).param_groups) == 1
    # no budget: state_bits / density are plain keywords
    sparse = build_optimizer(model, "spam", density=0.5, state_bits=8)
    assert {g["density"] for g in sparse.param_groups} == {0.5, 1.0}


# ------------------------------------------------------------------ collectives discipline
class _Recorder(TrainerCallback):
    """Stands in for a report_to integration: keeps the logs it is shown."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        self.seen.append(dict(logs or {}))


def test_attach_puts_the_callback_before_the_integrations(tmp_path: Path) -> None:
    model = tiny_llama()
    recorder = _Recorder()
    trainer = Trainer(
        model=model,
        args=args(tmp_path, 4),
        train_dataset=RandomTokens(),
        optimizers=(build_optimizer(model, "spam"), None),
        callbacks=[recorder],  # where the integrations sit: before user callbacks
    )
    SpikeStatsCallback().attach(trainer)
    trainer.train()
    assert [h["spam/clipped"] >= 0 for h in recorder.seen if "loss" in h] == [True, True]


def test_reads_happen_on_every_rank_at_step_end_never_in_on_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spike_stats()/memory_report() are collectives under FSDP2: the callback reads them at
    on_step_end of logging steps and on_epoch_end, the events every rank runs; on_log only
    writes what was read, and only on the main process."""
    model = tiny_llama()
    opt = build_optimizer(model, "spam")
    calls: list[str] = []
    for name in ("spike_stats", "memory_report"):
        real = getattr(opt, name)
        monkeypatch.setattr(opt, name, lambda real=real, name=name: calls.append(name) or real())
    targs = args(tmp_path, 10)
    for main in (True, False):
        cb = SpikeStatsCallback(opt)
        state = TrainerState(is_world_process_zero=main, logging_steps=2)
        control = TrainerControl()
        calls.clear()
        state.global_step = 1
        cb.on_step_end(targs, state, control)
        assert calls == []  # not a logging step
        state.global_step = 2
        cb.on_step_end(targs, state, control)  # should_log not set: the rule is applied itself
        assert calls == ["spike_stats", "memory_report"]
        logs = {"loss": 1.0}
        state.log_history.append({**logs, "step": 2})
        cb.on_log(targs, state, control, logs=logs)
        assert calls == ["spike_stats", "memory_report"]  # nothing read in on_log
        assert ("spam/state_bytes" in logs) is main and ("spam/state_bytes" in state.log_history[-1]) is main
        cb.on_epoch_end(targs, state, control)
        assert len(calls) == 4
        eval_logs = {"eval_loss": 1.0}
        cb.on_log(targs, state, control, logs=eval_logs)
        assert eval_logs == {"eval_loss": 1.0}  # evaluation logs are left alone


def test_import_spam_lowmem_does_not_import_transformers(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys, spam_lowmem, spam_lowmem.integrations as i; "
        "i.build_optimizer; assert 'transformers' not in sys.modules, 'imported'"
    )
    # cwd away from the source checkout, whose uncompiled package would shadow the installed one
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
