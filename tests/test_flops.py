"""flops_per_token counts what a training step executes: compared with torch's
FlopCounterMode over a real forward + backward of the model (local spec, CPU)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from megatron_lm2.accounting import flops_per_token
from megatron_lm2.flavors import get_flavor
from megatron_lm2.model import attention_mask, build_model

pytestmark = pytest.mark.usefixtures("megatron_world", "one_thread")

aten = torch.ops.aten
# FlopCounterMode knows the CUDA attention kernels; the CPU flash kernel has the same math.


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}
SMALL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
             num_query_groups=2, vocab_size=512, memory_heads=4)


def counted_flops(cfg, batch: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length))
    positions = torch.arange(cfg.seq_length).expand(batch, -1)
    mask = attention_mask(cfg.seq_length, cfg.attention_window)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        loss = model(tokens, positions, mask, labels=tokens).sum()
        loss.backward()
    return counter.get_total_flops()


CASES = {
    "two chunks, N = 4C": dict(seq_length=64, memory_chunk_size=32, memory_slots=128),
    "aligned write": dict(seq_length=96, memory_chunk_size=32, memory_slots=32, memory_write="aligned"),
    "token write": dict(seq_length=96, memory_chunk_size=32, memory_slots=32, memory_write="token"),
    "memory in layer 2 of 3": dict(num_layers=3, memory_layers=(2,), seq_length=96,
                                   memory_chunk_size=32, memory_slots=48),
    "attention window": dict(seq_length=96, attention_window=32, memory_chunk_size=32, memory_slots=24),
    "vanilla": dict(seq_length=96, memory_layers=()),
    "learned M_0, truncated backprop": dict(seq_length=128, memory_chunk_size=32, memory_slots=40,
                                            memory_init="learned", memory_bptt_chunks=2),
    "identity-signs M_0, N > d": dict(seq_length=64, memory_chunk_size=32, memory_slots=160,
                                      memory_init="identity-signs"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_flops_per_token_equals_flop_counter(name):
    batch = 2
    cfg = get_flavor("debug", **{**SMALL, **CASES[name]})
    counted = counted_flops(cfg, batch) / (batch * cfg.seq_length)
    ours = flops_per_token(cfg, kernel="local", micro_batch_size=batch)
    assert abs(ours - counted) / counted < 0.01, (name, ours, counted)


def test_skipping_the_last_write_is_counted():
    """One chunk: no write at all in training, so the gates' GEMMs cost nothing."""
    base = dict(**SMALL, seq_length=32, memory_chunk_size=32, memory_slots=64)
    one_chunk = flops_per_token(get_flavor("debug", **base), kernel="local")
    aligned = flops_per_token(get_flavor("debug", **{**base, "memory_slots": 32, "memory_write": "aligned"}),
                              kernel="local")
    slots32 = flops_per_token(get_flavor("debug", **{**base, "memory_slots": 32}), kernel="local")
    assert aligned == pytest.approx(slots32)  # the write mode does not matter without a write
    assert one_chunk > slots32  # the read over more slots does
