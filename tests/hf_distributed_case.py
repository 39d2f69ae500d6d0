"""One rank of tests/test_hf_distributed.py: transformers' Trainer under torchrun (DDP, gloo,
CPU) with SPAM and SpikeStatsCallback; each rank writes what it saw to OUT/rank{r}.json.

Not a test module (no ``test_`` prefix): ``python -m torch.distributed.run --nproc-per-node 2
hf_distributed_case.py OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from spam_lowmem.integrations.transformers import SpikeStatsCallback, build_optimizer

CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, CONFIG["vocab_size"], (16, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    opt = build_optimizer(model, "spam", lr=1e-2, threshold=2.0, clip_delay=1)
    reads: list[list[Any]] = []
    real = opt.spike_stats

    def spike_stats() -> dict[str, Any]:  # record when each rank reads (a collective under FSDP2)
        reads.append([trainer.state.global_step, trainer.state.epoch])
        return real()

    opt.spike_stats = spike_stats  # type: ignore[method-assign]
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=6,
        per_device_train_batch_size=2,  # 2 ranks x 2: 4 steps per epoch
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
    SpikeStatsCallback().attach(trainer)
    trainer.train()
    rank = torch.distributed.get_rank()
    record = {
        "rank": rank,
        "world": torch.distributed.get_world_size(),
        "reads": reads,
        "log_history": trainer.state.log_history,
        "local_total_bytes": opt.memory_report()["local_total_bytes"],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
