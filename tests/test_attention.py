"""The local spec's self-attention core through torch's scaled_dot_product_attention (what
GPUs run, megatron_lm2/attention.py) against megatron-core's own DotProductAttention path (what
CPUs run): the whole model's logits and every gradient, float64, for the plain causal mask, the
attention-window mask and grouped-query attention. On CPU the SDPA path is forced."""

import pytest
import torch

from megatron_lm2.attention import SDPADotProductAttention
from megatron_lm2.flavors import get_flavor
from megatron_lm2.model import build_model

pytestmark = pytest.mark.usefixtures("megatron_world")


def _run(overrides, sdpa: bool, monkeypatch):
    import types

    import megatron_lm2.attention as attention

    monkeypatch.setattr(attention, "sdpa_wanted", lambda query: sdpa)
    calls = []  # the self-attention's SDPA calls (the memory's own go to torch directly)

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "F", types.SimpleNamespace(scaled_dot_product_attention=counting))
    cfg = get_flavor("debug", **{"num_layers": 2, "vocab_size": 256, "seq_length": 48, "memory_slots": 16,
                                 "memory_chunk_size": 12, "params_dtype": torch.float64, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(48).expand(2, 48)
    logits = model(tokens, positions, None)
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    cores = [m for m in model.modules() if isinstance(m, SDPADotProductAttention)]
    return logits.detach(), grads, calls, len(cores)


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_window": 16},
    {"num_query_groups": 2},
], ids=["causal", "window-mask", "gqa"])
def test_sdpa_core_attention_equals_megatrons(monkeypatch, overrides):
    want, want_grads, calls, cores = _run(overrides, False, monkeypatch)
    assert cores == 2 and calls == []  # the spec builds the SDPA core in every self-attention
    got, got_grads, calls, _ = _run(overrides, True, monkeypatch)
    causal = "attention_window" not in overrides  # flash's is_causal, or the window's mask
    assert calls == [causal, causal], calls  # one forward call per layer
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (got - want).abs().max()
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], rtol=1e-9, atol=1e-12), name


def test_executed_kernel_and_its_flops(monkeypatch):
    """What the step log's TFLOP/s counts for each path: TE and the local spec's SDPA on CUDA
    without a window run flash (the causal half of the keys); with the window's mask SDPA runs
    every key (backward 2.5x); the CPU path runs every key (backward 2x)."""
    from megatron_lm2.accounting import attention_core_flops_per_token, executed_attention_kernel

    plain = get_flavor("debug", seq_length=256)
    windowed = get_flavor("debug", seq_length=256, attention_window=64)
    assert executed_attention_kernel("te", True, plain) == "te"
    assert executed_attention_kernel("local", True, plain) == "te"
    assert executed_attention_kernel("local", True, windowed) == "sdpa_masked"
    assert executed_attention_kernel("local", False, windowed) == "local"
    monkeypatch.setenv("LM2_LOCAL_ATTENTION", "unfused")
    assert executed_attention_kernel("local", True, plain) == "local"
    per_key = 4 * plain.num_attention_heads * (plain.hidden_size // plain.num_attention_heads)
    assert attention_core_flops_per_token(windowed, kernel="sdpa_masked") == 3.5 * per_key * 256
    assert attention_core_flops_per_token(plain, kernel="te") == 3.5 * per_key * 257 / 2
    assert attention_core_flops_per_token(plain, kernel="local") == 3.0 * per_key * 256
