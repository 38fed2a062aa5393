"""Checks that need a CUDA GPU or Transformer Engine. They skip, with the reason, on the
CPU machines this project is developed and tested on; run them where the hardware is."""

import pytest
import torch

from megatron_lm2.flavors import get_flavor
from megatron_lm2.memory_state import carry_memory, memory_banks
from megatron_lm2.model import build_model

pytestmark = pytest.mark.usefixtures("megatron_world")

SMALL = dict(num_layers=2, vocab_size=256, seq_length=64, memory_slots=16, memory_chunk_size=16)


def _logits(model, tokens):
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None)


def test_cpu_compat_redirects_cuda_calls_only_without_cuda():
    from megatron_lm2 import compat

    if torch.cuda.is_available():
        assert compat.enable_cpu_compat() is False
        assert isinstance(torch.cuda.current_device(), int)
    else:
        assert compat.enable_cpu_compat() is True  # already on via the fixture; idempotent
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"


@pytest.mark.gpu
def test_local_spec_on_cuda_matches_cpu_fp32():
    cfg = get_flavor("debug", **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    with torch.no_grad():
        cpu = _logits(model, tokens)
        with carry_memory(model):
            _logits(model, tokens)
            cpu_banks = memory_banks(model)
        model.cuda()
        gpu = _logits(model, tokens.cuda()).cpu()
        with carry_memory(model):
            _logits(model, tokens.cuda())
            gpu_banks = memory_banks(model)
    assert (gpu - cpu).abs().max() < 1e-3  # TF32 may be on for matmuls
    for n, bank in cpu_banks.items():
        assert (gpu_banks[n].cpu() - bank).abs().max() < 1e-3


@pytest.mark.gpu
def test_local_spec_bf16_trains_on_cuda():
    cfg = get_flavor("debug", bf16=True, params_dtype=torch.bfloat16, **SMALL)
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), device="cuda")
    positions = torch.arange(cfg.seq_length, device="cuda").expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if ".memory." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.te
def test_te_spec_matches_local_spec(tmp_path):
    """The TE spec is a mapping of the local spec: the same checkpoint gives the same logits."""
    from megatron.core import dist_checkpointing

    cfg = get_flavor("debug", **SMALL)
    torch.manual_seed(0)
    local = build_model(cfg).cuda().eval()
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path))
    te = build_model(cfg, backend="te").cuda().eval()
    te.load_state_dict(dist_checkpointing.load(te.sharded_state_dict(), str(tmp_path)))
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), device="cuda")
    with torch.no_grad():
        diff = (_logits(te, tokens) - _logits(local, tokens)).abs().max().item()
    assert diff < 1e-2  # TE's fused kernels round differently from torch's


@pytest.mark.gpu
@pytest.mark.te
def test_te_spec_fp8_forward_backward():
    from megatron.core.fp8_utils import get_fp8_context

    cfg = get_flavor("debug", bf16=True, params_dtype=torch.bfloat16, fp8="hybrid",
                     **{**SMALL, "seq_length": 128, "memory_chunk_size": 32})
    torch.manual_seed(0)
    model = build_model(cfg, backend="te").cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), device="cuda")
    positions = torch.arange(cfg.seq_length, device="cuda").expand_as(tokens)
    with get_fp8_context(cfg):
        loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
