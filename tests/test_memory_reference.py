"""The memory module equals an independent float64 statement of the equations."""

import math
import random

import pytest
import torch

from megatron_lm2.memory import identity_bank, initial_bank_rows
from megatron_lm2.memory_state import carry_memory, memory_banks
from reference import memory_reference, weights_of
from reference import random_memory as _memory

pytestmark = pytest.mark.usefixtures("megatron_world")


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _qknorm_scales(module):
    """Distinct per-head scales, as training leaves them (random_memory draws N(0, 0.3))."""
    with torch.no_grad():
        for name in ("read_logit_scale", "write_logit_scale"):
            if hasattr(module, name):
                scale = getattr(module, name)
                scale.copy_(torch.linspace(2.0, 12.0, scale.numel(), dtype=scale.dtype).flip(0)
                            if name == "write_logit_scale" else torch.linspace(2.0, 12.0, scale.numel()))


@pytest.mark.parametrize("scores", ["dot", "qknorm"])
@pytest.mark.parametrize("write", ["attention", "token", "aligned"])
@pytest.mark.parametrize("init", ["identity", "learned"])
def test_module_equals_float64_reference(write, init, scores):
    slots = 12 if write == "attention" else 8
    cfg, module = _memory(memory_write=write, memory_init=init, memory_slots=slots, memory_scores=scores)
    _qknorm_scales(module)
    tokens = torch.randn(40, 3, 64, dtype=torch.float64)  # 5 chunks of 8
    with carry_memory(module):
        out, bias = module(tokens)
        bank = memory_banks(module)[1]
    assert bias is None
    ref_out, ref_bank = memory_reference(
        tokens, weights_of(module, cfg.memory_heads), cfg.memory_heads, cfg.memory_chunk_size, write,
        qk_norm=scores == "qknorm",
    )
    assert _rel_err(out, ref_out) < 1e-10
    assert _rel_err(bank, ref_bank) < 1e-10
    # The comparison is not vacuous: the output is far from zero and the bank moved from M_0.
    assert ref_out.abs().max() > 1e-2
    assert (ref_bank - weights_of(module, cfg.memory_heads)["initial"]).abs().max() > 1e-2
    if scores == "qknorm":  # and the scores are not the dot product's
        dot, _ = memory_reference(tokens, weights_of(module, cfg.memory_heads), cfg.memory_heads,
                                  cfg.memory_chunk_size, write)
        assert _rel_err(dot, ref_out) > 1e-2


@pytest.mark.parametrize("write", ["attention", "token", "aligned"])
def test_forget_bias_equals_float64_reference(write):
    """memory_forget_bias shifts every forget-gate logit by a constant, in every write mode."""
    slots = 12 if write == "attention" else 8
    cfg, module = _memory(memory_write=write, memory_slots=slots, memory_forget_bias=2.5)
    module.record_gates = True
    tokens = torch.randn(40, 3, 64, dtype=torch.float64)
    with carry_memory(module):
        out, _ = module(tokens)
        bank = memory_banks(module)[1]
    w = weights_of(module, cfg.memory_heads)
    ref_out, ref_bank = memory_reference(tokens, w, cfg.memory_heads, cfg.memory_chunk_size, write,
                                         forget_bias=2.5)
    assert _rel_err(out, ref_out) < 1e-10
    assert _rel_err(bank, ref_bank) < 1e-10
    unbiased_out, unbiased_bank = memory_reference(tokens, w, cfg.memory_heads, cfg.memory_chunk_size, write)
    assert _rel_err(unbiased_bank, ref_bank) > 1e-2 and _rel_err(unbiased_out, ref_out) > 1e-3
    # The recorded gate means are the biased gates' (the step log's memory-gate stats).
    biased = float(module.gate_stats["forget"])
    module.config.memory_forget_bias = 0.0  # the same weights, the paper's gate
    module(tokens)
    assert biased > float(module.gate_stats["forget"]) + 0.2


@pytest.mark.parametrize("write, scores", [("attention", "dot"), ("token", "qknorm"), ("token", "dot")])
@pytest.mark.parametrize("shift", [1, 3])
def test_write_shift_equals_float64_reference(write, scores, shift):
    """memory_write_shift = k: the write takes e_t + ... + e_(t-k) within the chunk (the values
    of the attention write, the content and gates of the token write); the read keeps e_t."""
    slots = 12 if write == "attention" else 8
    cfg, module = _memory(memory_write=write, memory_slots=slots, memory_scores=scores, memory_write_shift=shift)
    _qknorm_scales(module)
    tokens = torch.randn(40, 3, 64, dtype=torch.float64)
    with carry_memory(module):
        out, _ = module(tokens)
        bank = memory_banks(module)[1]
    w = weights_of(module, cfg.memory_heads)
    qk = scores == "qknorm"
    ref_out, ref_bank = memory_reference(tokens, w, cfg.memory_heads, cfg.memory_chunk_size, write,
                                         qk_norm=qk, shift=shift)
    assert _rel_err(out, ref_out) < 1e-10
    assert _rel_err(bank, ref_bank) < 1e-10
    plain_out, plain_bank = memory_reference(tokens, w, cfg.memory_heads, cfg.memory_chunk_size, write, qk_norm=qk)
    assert _rel_err(plain_bank, ref_bank) > 1e-2 and _rel_err(plain_out, ref_out) > 1e-3


def test_write_shift_is_refused_where_it_means_nothing():
    from megatron_lm2.config import ConfigError

    with pytest.raises(ConfigError, match="memory_write_shift"):
        _memory(memory_write="aligned", memory_slots=8, memory_write_shift=1)
    with pytest.raises(ConfigError, match="memory_write_shift"):
        _memory(memory_write_shift=8)  # chunk 8: a token has at most 7 before it in its chunk


def test_ragged_last_chunk_and_carried_bank_match_reference():
    cfg, module = _memory()
    first = torch.randn(40, 2, 64, dtype=torch.float64)
    second = torch.randn(13, 2, 64, dtype=torch.float64)  # 8 + a partial chunk of 5
    w = weights_of(module, cfg.memory_heads)
    with carry_memory(module):
        module(first)
        out, _ = module(second)
    _, bank_after_first = memory_reference(first, w, cfg.memory_heads, cfg.memory_chunk_size)
    ref_out, _ = memory_reference(
        second, w, cfg.memory_heads, cfg.memory_chunk_size, initial_banks=bank_after_first
    )
    assert _rel_err(out, ref_out) < 1e-10


@pytest.mark.parametrize("scores", ["dot", "qknorm"])
@pytest.mark.parametrize("write, shift", [("attention", 0), ("token", 0), ("aligned", 0), ("attention", 2),
                                          ("token", 2)])
def test_streaming_in_uneven_calls_equals_one_call(write, scores, shift):
    """Pieces that split chunks (5, 14, 1, 20 tokens): a held partial chunk is written when it
    completes, its shifted tokens included, exactly as in one call."""
    cfg, module = _memory(memory_write=write, memory_slots=8, memory_scores=scores, memory_write_shift=shift)
    _qknorm_scales(module)
    tokens = torch.randn(40, 2, 64, dtype=torch.float64)
    with carry_memory(module):
        whole, _ = module(tokens)
        whole_bank = memory_banks(module)[1]
    with carry_memory(module):
        pieces = [module(tokens[a:b])[0] for a, b in ((0, 5), (5, 19), (19, 20), (20, 40))]
        streamed_bank = memory_banks(module)[1]
    assert _rel_err(torch.cat(pieces), whole) < 1e-12
    assert _rel_err(streamed_bank, whole_bank) < 1e-12


def test_identity_initial_bank():
    bank = identity_bank(5, 3)
    assert torch.equal(bank[:3], torch.eye(3)) and torch.equal(bank[3:], torch.zeros(2, 3))


def _sign_bank(slots, d):
    """identity-signs stated bit by bit: e_i for i < d; past d, entry (r, c) of the extra rows is
    +1/sqrt(d) where bit r*d + c of one getrandbits(rows*d) draw (seed 0x4C4D32) is 1, else -."""
    bank = torch.zeros(slots, d, dtype=torch.float64)
    for i in range(min(slots, d)):
        bank[i, i] = 1.0
    rows = slots - d
    if rows > 0:
        draw = random.Random(0x4C4D32).getrandbits(rows * d)
        for r in range(rows):
            for c in range(d):
                bank[d + r, c] = (1.0 if (draw >> (r * d + c)) & 1 else -1.0) / math.sqrt(d)
    return bank


def test_identity_signs_bank():
    """Slots past d get distinct unit rows instead of the identity's zeros (which make every
    slot past d the same slot for ever); up to d it is the identity."""
    bank = initial_bank_rows("identity-signs", 80, 16, dtype=torch.float64)
    assert torch.equal(bank, _sign_bank(80, 16))
    assert torch.equal(initial_bank_rows("identity-signs", 16, 16), identity_bank(16, 16))
    assert torch.equal(initial_bank_rows("identity", 80, 16), identity_bank(80, 16))
    norms = bank.norm(dim=1)
    assert torch.allclose(norms, torch.ones(80, dtype=torch.float64))
    cos = bank[16:] @ bank[16:].T - torch.eye(64, dtype=torch.float64)
    assert cos.abs().max() < 0.9  # no two rows alike (random signs: ~1/sqrt(d) = 0.25)


@pytest.mark.parametrize("write", ["attention", "token"])
def test_identity_signs_module_equals_float64_reference(write):
    """N > d: the module's M_0 is the bit-by-bit sign bank, and the memory computes the
    reference's equations from it (chunk 0's keys and values by a GEMM, not W_KV's columns)."""
    slots = 72  # > d = 64
    chunk = 8 if write == "attention" else slots
    cfg, module = _memory(memory_write=write, memory_slots=slots, memory_chunk_size=chunk,
                          seq_length=5 * chunk, memory_init="identity-signs")
    assert torch.equal(module.initial_bank, _sign_bank(slots, 64))
    tokens = torch.randn(5 * chunk, 2, 64, dtype=torch.float64, requires_grad=True)
    with carry_memory(module):
        out, _ = module(tokens)
        bank = memory_banks(module)[1]
    w = weights_of(module, cfg.memory_heads)
    w["initial"] = _sign_bank(slots, 64)
    ref_out, ref_bank = memory_reference(tokens, w, cfg.memory_heads, chunk, write)
    assert _rel_err(out, ref_out) < 1e-10 and _rel_err(bank, ref_bank) < 1e-10
    (grad,) = torch.autograd.grad(out.square().sum(), tokens)
    (ref_grad,) = torch.autograd.grad(ref_out.square().sum(), tokens)
    assert _rel_err(grad, ref_grad) < 1e-10
    # Not vacuous: chunk 0 reads different slots than with the identity's zeros.
    plain_out, _ = memory_reference(tokens, dict(w, initial=identity_bank(slots, 64).double()),
                                    cfg.memory_heads, chunk, write)
    assert _rel_err(plain_out[:chunk], ref_out[:chunk]) > 1e-3


def _built_memory(**overrides):
    """An LM2Memory as the model builds it (its own initialisation, seed 0): debug shapes, 4 heads."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_lm2.flavors import get_flavor
    from megatron_lm2.specs import get_memory_local_spec

    cfg = get_flavor("debug", hidden_size=64, num_attention_heads=4, memory_heads=4, memory_slots=8,
                     memory_chunk_size=8, seq_length=32, **overrides)
    torch.manual_seed(0)
    return cfg, build_module(get_memory_local_spec(), config=cfg, layer_number=1)


@pytest.mark.parametrize("write", ["attention", "token"])
def test_tied_qk_init_starts_each_heads_keys_as_its_queries(write):
    """memory_qk_init="tied": W_K of head h (linear_kv rows [k_h; v_h]) equals W_Q of head h; every
    other weight, W_V included, is what the independent init draws from the same seed."""
    _, plain = _built_memory(memory_write=write)
    cfg, tied = _built_memory(memory_write=write, memory_qk_init="tied")
    h, dh, d = cfg.memory_heads, cfg.memory_head_dim, cfg.hidden_size
    kv, plain_kv = tied.linear_kv.weight.view(h, 2, dh, d), plain.linear_kv.weight.view(h, 2, dh, d)
    assert torch.equal(kv[:, 0], tied.linear_q.weight.view(h, dh, d))
    assert not torch.equal(plain_kv[:, 0], plain.linear_q.weight.view(h, dh, d))  # not so by chance
    assert torch.equal(kv[:, 1], plain_kv[:, 1])
    plain_state = plain.state_dict()
    for name, value in tied.state_dict().items():
        if name != "linear_kv.weight" and isinstance(value, torch.Tensor):
            assert torch.equal(value, plain_state[name]), name


def test_unknown_qk_init_is_refused_by_name():
    from megatron_lm2.config import ConfigError

    with pytest.raises(ConfigError, match="memory_qk_init"):
        _built_memory(memory_qk_init="shared")


def test_truncated_backprop_keeps_values_and_cuts_gradient():
    cfg, full = _memory()
    _, cut = _memory(memory_bptt_chunks=2)
    cut.load_state_dict(full.state_dict())
    tokens = torch.randn(40, 2, 64, dtype=torch.float64, requires_grad=True)
    out_full, _ = full(tokens)
    out_cut, _ = cut(tokens)
    assert torch.equal(out_full, out_cut)
    # Chunk 3 (tokens 24..31) reads the bank written after chunks 0..2. Cut every 2 chunks,
    # its gradient reaches chunk 2's write but nothing before the cut at chunk 2.
    (g_full,) = torch.autograd.grad(out_full[24:32].sum(), tokens)
    (g_cut,) = torch.autograd.grad(out_cut[24:32].sum(), tokens)
    assert g_full[:8].abs().max() > 1e-8  # full backprop reaches chunk 0
    assert g_cut[:16].abs().max() == 0
    assert g_cut[16:24].abs().max() > 1e-8
