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


# --------------------------------------------------------------------- activation recompute
def _plain(cfg, **kw):
    return activation_bytes(cfg, 2, tp=1, flash_attention=False, bytes_per_value=4, **kw)


def test_recompute_estimates_follow_the_flags():
    """lm2-train --recompute-*: the dry run's estimate against arithmetic of its own here. One
    layer's activations come from the plain estimate's differences (a layer more or less, with
    and without its memory); selective drops each layer's fp32 scores a*s^2*b*4; full keeps of
    each recomputed unit its input s*b*h*4 and rebuilds the largest unit once in backward."""
    shape = dict(SHAPE, num_layers=4, memory_layers=(2,))  # one memory layer of four
    cfg = get_flavor("debug", **shape)
    s, b, h, a = cfg.seq_length, 2, cfg.hidden_size, cfg.num_attention_heads
    layer_input = s * b * h * 4
    vanilla = dict(shape, memory_layers=())
    block = _plain(get_flavor("debug", **vanilla)) - _plain(get_flavor("debug", **dict(vanilla, num_layers=3)))
    memory = _plain(cfg) - _plain(get_flavor("debug", **vanilla))
    plain = _plain(cfg)
    assert block > 0 and memory > 0 and plain == _plain(get_flavor("debug", **vanilla)) + memory

    def full(method, layers, pp=1, vpp=None):
        return _plain(cfg.replace(recompute_granularity="full", recompute_method=method,
                                  recompute_num_layers=layers, pipeline_model_parallel_size=pp,
                                  virtual_pipeline_model_parallel_size=vpp))

    # uniform 1: every layer keeps its input; backward rebuilds one layer (the memory layer).
    expected = plain - 4 * block - memory + 4 * layer_input + (block + memory)
    assert full("uniform", 1) == pytest.approx(expected, rel=1e-12)
    assert full("uniform", 1) < plain
    # uniform 2: units {1,2} and {3,4}; the largest holds the memory layer.
    expected = plain - 4 * block - memory + 2 * layer_input + (2 * block + memory)
    assert full("uniform", 2) == pytest.approx(expected, rel=1e-12)
    # block 1: only layer 1 of the chunk (no memory) is recomputed.
    expected = plain - block + layer_input + block
    assert full("block", 1) == pytest.approx(expected, rel=1e-12)
    # PP 2, block 1: layers 1 and 3 (the first of each stage's chunk), the memory layer kept.
    expected = plain - 2 * block + 2 * layer_input + block
    assert full("block", 1, pp=2) == pytest.approx(expected, rel=1e-12)
    # selective: no layer keeps its fp32 scores.
    selective = _plain(cfg.replace(recompute_granularity="selective"))
    assert selective == pytest.approx(plain - 4 * a * s * s * b * 4, rel=1e-12)


def test_selective_recompute_estimate_matches_what_autograd_keeps():
    """Measured like the plain estimates (saved-tensor hooks over a training forward): the
    checkpointed core attention keeps only its inputs."""
    cfg = get_flavor("debug", **SHAPE, recompute_granularity="selective")
    measured = measured_bytes(cfg, 2)
    estimate = activation_bytes(cfg, 2, tp=1, flash_attention=False, bytes_per_value=4)
    assert abs(estimate - measured) / measured < 0.15, (estimate / 2**20, measured / 2**20)
    plain = measured_bytes(get_flavor("debug", **SHAPE), 2)
    assert plain - measured >= 0.9 * 2 * cfg.num_attention_heads * cfg.seq_length ** 2 * 2 * 4
