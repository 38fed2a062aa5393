"""The dry run's activation estimate (training/plan.py activation_bytes) against the bytes
autograd really keeps for backward, measured with saved-tensor hooks over a real forward."""

import os
import sys

import pytest
import torch

from megatron_lm2.flavors import get_flavor
from megatron_lm2.model import attention_mask, build_model
from megatron_lm2.training.plan import activation_bytes

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from bench_memory import saved_bytes_counter  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_world", "one_thread")

SHAPE = dict(num_layers=2, hidden_size=128, ffn_hidden_size=384, vocab_size=512, seq_length=256,
             memory_slots=128, memory_chunk_size=128)


def measured_bytes(cfg, batch: int) -> int:
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length))
    positions = torch.arange(cfg.seq_length).expand(batch, -1)
    with saved_bytes_counter(exclude=list(model.parameters()) + list(model.buffers())) as total:
        model(tokens, positions, attention_mask(cfg.seq_length, cfg.attention_window), labels=tokens)
    return total[0]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(memory_layers=()),
        dict(),
        dict(num_layers=3, memory_layers=(2,), seq_length=512, memory_slots=256),  # 4 chunks, N = 2C
        dict(memory_write="aligned"),
        dict(memory_write="token"),
        dict(memory_init="learned", memory_slots=64, memory_chunk_size=64),
        dict(memory_scores="qknorm"),
        dict(memory_scores="qknorm", memory_write="token"),
        dict(num_layers=3, memory_layers=(2,), seq_length=512, memory_slots=256, memory_init="identity-signs"),
    ],
    ids=["vanilla", "lm2", "subset-4chunks", "aligned", "token", "learned", "qknorm", "qknorm-token",
         "identity-signs-N>d"],
)
def test_activation_estimate_within_15_percent(overrides):
    cfg = get_flavor("debug", **{**SHAPE, **overrides})
    batch = 2
    measured = measured_bytes(cfg, batch)
    estimate = activation_bytes(cfg, batch, tp=1, flash_attention=False, bytes_per_value=4)
    assert abs(estimate - measured) / measured < 0.15, (estimate / 2**20, measured / 2**20)


@pytest.mark.parametrize("write, slots", [("attention", 256), ("token", 128)])
def test_forget_bias_saves_nothing_more(write, slots):
    """The forget gate's constant replaces the logits the write update saves; it adds none
    (4 written chunks), so activation_bytes needs no term for it."""
    shape = dict(SHAPE, num_layers=3, memory_layers=(2,), seq_length=512, memory_chunk_size=128,
                 memory_write=write, memory_slots=slots)
    plain = measured_bytes(get_flavor("debug", **shape), 2)
    assert measured_bytes(get_flavor("debug", **shape, memory_forget_bias=3.0), 2) == plain


def test_memory_module_saves_at_most_half_of_the_old_path():
    """At the CPU shape of issue 11 (T=2048, d=512, N=C=1024, 2 heads, fp32): <= 32 MiB,
    against 64 MiB for the explicit-score path it replaced (benchmarks/memory_baseline.py)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.specs import get_memory_local_spec
    from memory_baseline import explicit_forward

    cfg = get_flavor("debug", hidden_size=512, num_attention_heads=4, memory_slots=1024,
                     memory_heads=2, memory_chunk_size=1024, seq_length=2048)
    module = build_module(get_memory_local_spec(), config=cfg, layer_number=1)
    tokens = torch.randn(2048, 1, 512, requires_grad=True)
    params = list(module.parameters())
    with saved_bytes_counter(exclude=params + list(module.buffers())) as new:
        module(tokens)
    with saved_bytes_counter(exclude=params + list(module.buffers())) as old:
        explicit_forward(module, tokens)
    assert new[0] <= 32 * 2**20 and old[0] >= 2 * new[0], (new[0] / 2**20, old[0] / 2**20)
