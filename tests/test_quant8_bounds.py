"""8-bit moments never blow up an update (issue 14, the blocker).

Oracle: the analytic bound of exact Adam on one step (spam_lowmem/step_bounds.py). Every
Adam-family optimizer, 32- and 8-bit, dense and sparse, steps on heterogeneous, zero and
denormal gradient streams; every step of every entry is checked against

* the bound the issue names, lr * (1 - b1) / sqrt(1 - b2) (Kingma and Ba's), plus weight decay;
* lr * K_t (adam_direction_bound, the exact bound at step t) for 32-bit state, and that times
  QUANT_SLACK for 8-bit state. Before the v map lost its zero, 8-bit steps on these streams
  reached 50 to 350,000 times the bound (an entry whose v read back as 0 moved lr * m / eps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import spam_lowmem as sl
from spam_lowmem.step_bounds import STREAMS, adam_direction_bound, adam_ratio_bound

LR, BETAS = 1e-3, (0.9, 0.999)
SHAPE = (64, 512)  # 32768 entries: 128 blocks of 256, 8-bit state (>= min_8bit_size)
STEPS = 40
#: 8-bit rounding of m and v (nearest code, up to half a gap apart) can take |m| / sqrt(v)
#: past exact Adam's bound; the worst measured on these streams is 1.9x (bitsandbytes'
#: AdamW8bit: 1.6x, benchmarks/bench_8bit_fidelity.py).
QUANT_SLACK = 2.5

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def optimizers(weight_decay: float) -> dict[str, Factory]:
    """No resets and no beta decay: bias-correction count = step count, where the bound holds."""
    kw = dict(lr=LR, betas=BETAS, weight_decay=weight_decay)
    return {
        "adamw": lambda ps, bits: sl.AdamW(ps, **kw, state_bits=bits),
        "spam": lambda ps, bits: sl.SPAM(ps, **kw, reset_interval=0, state_bits=bits),
        "stable_spam": lambda ps, bits: sl.StableSPAM(ps, **kw, reset_interval=0, state_bits=bits),
        "sparse_spam": lambda ps, bits: sl.SPAM(
            [{"params": ps, "density": 0.5}], **kw, reset_interval=0, state_bits=bits, subset_seed=3
        ),
    }


def worst_moves(
    factory: Callable[..., torch.optim.Optimizer], bits: int, stream: str, weight_decay: float
) -> tuple[float, float]:
    """(max over steps of move / flat bound, max over steps of move / K_t bound), weight decay's
    share of the move taken off first."""
    p = torch.nn.Parameter(torch.full(SHAPE, 0.5))
    opt = factory([p], bits)
    flat = (1.0 - BETAS[0]) / math.sqrt(1.0 - BETAS[1])
    worst_flat = worst_t = 0.0
    for t, g in enumerate(STREAMS[stream](SHAPE, STEPS, seed=1), start=1):
        before = p.detach().clone()
        p.grad = g
        opt.step()
        after = p.detach()
        assert bool(torch.isfinite(after).all())
        # decay moves an entry by at most lr * wd * |p| (before or after its Adam step)
        decay = LR * weight_decay * torch.maximum(before.abs(), after.abs())
        move = float(((after - before).abs() - decay).max())
        worst_flat = max(worst_flat, move / (LR * flat))
        worst_t = max(worst_t, move / (LR * adam_direction_bound(*BETAS, t)))
    return worst_flat, worst_t


@pytest.mark.parametrize("stream", list(STREAMS))
@pytest.mark.parametrize("name", ["adamw", "spam", "stable_spam", "sparse_spam"])
def test_8bit_step_never_exceeds_adam_bound(name: str, stream: str) -> None:
    weight_decay = 0.1 if name == "adamw" else 0.0
    factory = optimizers(weight_decay)[name]
    _, t32 = worst_moves(factory, 32, stream, weight_decay)
    flat8, t8 = worst_moves(factory, 8, stream, weight_decay)
    tol = 1e-4  # float32 rounding of the bound's own arithmetic
    assert t32 <= 1.0 + tol, f"32-bit {name} broke exact Adam's bound: {t32}"
    assert flat8 <= 1.0 + tol, f"8-bit {name} moved {flat8:.3g}x lr(1-b1)/sqrt(1-b2) on {stream}"
    assert t8 <= QUANT_SLACK, f"8-bit {name} moved {t8:.3g}x the step-t bound on {stream}"


def test_8bit_split_scale_small_half_stays_near_adamw() -> None:
    """The issue's measurement: half the entries with gradients 1e4x smaller. After 60 steps
    the small half of torch AdamW has moved ~lr * sqrt(steps); the 8-bit optimizers must not
    move it further (they moved it 100x further before the fix)."""
    shape = (128, 512)
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(shape, generator=gen) < 0.5  # the stream's first draw: its mask
    results = {}
    for name, make in (
        ("torch", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.0)),
        ("adamw8", lambda ps: sl.AdamW(ps, lr=LR, weight_decay=0.0, state_bits=8)),
        ("spam8", lambda ps: sl.SPAM(ps, lr=LR, reset_interval=0, state_bits=8)),
        ("stable8", lambda ps: sl.StableSPAM(ps, lr=LR, reset_interval=0, state_bits=8)),
    ):
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = make([p])
        for g in STREAMS["split_scale"](shape, 60, seed=0):
            p.grad = g
            opt.step()
        results[name] = float(p.detach()[small].abs().max())
    assert 0.0 < results["torch"] < 60 * LR
    for name in ("adamw8", "spam8", "stable8"):
        assert results[name] <= 1.5 * results["torch"], results


def test_adam_ratio_bound_is_tight_and_correct() -> None:
    """The oracle itself: brute force over the worst gradient sequence (g_{t-j} proportional to
    (b1/b2)^j, the Cauchy-Schwarz equality case) reaches K_t, and random ones stay below."""
    b1, b2 = BETAS
    for t in (1, 2, 7, 50):
        worst = torch.tensor([(b1 / b2) ** (t - i) for i in range(1, t + 1)], dtype=torch.float64)
        m = v = torch.zeros((), dtype=torch.float64)
        for g in worst:
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        assert float(m / v.sqrt()) == pytest.approx(adam_ratio_bound(b1, b2, t), rel=1e-12)
        gs = torch.randn(1000, t, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        m = v = torch.zeros(1000, dtype=torch.float64)
        for i in range(t):
            m, v = b1 * m + (1 - b1) * gs[:, i], b2 * v + (1 - b2) * gs[:, i] ** 2
        assert float((m.abs() / v.sqrt()).max()) <= adam_ratio_bound(b1, b2, t) * (1 + 1e-12)
    assert adam_direction_bound(b1, b2, 1) == pytest.approx(1.0, rel=1e-12)


def test_tiny_llama_rare_token_rows_do_not_jump() -> None:
    """The issue's real case: in a tiny LlamaForCausalLM trained with 8-bit AdamW, embedding rows
    of tokens absent from a batch (gradient exactly 0 that step) jumped by up to 5.8 in one
    step. Tokens are drawn from a Zipf-like law so that most rows are rare."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg)
    embed = model.get_input_embeddings().weight
    lr = 1e-3
    opt = sl.AdamW(model.parameters(), lr=lr, weight_decay=0.0, state_bits=8)
    weights = 1.0 / torch.arange(1, 513, dtype=torch.float64) ** 1.2
    gen = torch.Generator().manual_seed(0)
    flat = (1.0 - BETAS[0]) / math.sqrt(1.0 - BETAS[1])
    worst = 0.0
    for _ in range(30):
        ids = torch.multinomial(weights, 4 * 32, replacement=True, generator=gen).view(4, 32)
        before = embed.detach().clone()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        worst = max(worst, float((embed.detach() - before).abs().max()) / lr)
    assert opt.state[embed]["exp_avg_codes"].dtype == torch.uint8  # the embedding is 8-bit
    assert worst <= flat * (1 + 1e-4), f"an embedding entry moved {worst:.3g} lr in one step"
