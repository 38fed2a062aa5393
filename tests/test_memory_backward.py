"""The memory's backward (SDPA read and write, fused gate GEMM and gating, M_0's keys from
the weights, storage released until backward) against autograd through the independent
float64 statement of the equations (tests/reference.py)."""

import pytest
import torch

from megatron_lm2.memory import LM2Memory, _out_gate, _OutGate, _write_update, _WriteUpdate
from megatron_lm2.memory_state import carry_memory, gate_stats, record_gate_stats
from reference import memory_reference, random_memory

pytestmark = pytest.mark.usefixtures("megatron_world", "one_thread")

D, HEADS = 32, 4


def _memory(**overrides):
    return random_memory(**{"hidden_size": D, "memory_heads": HEADS, **overrides})


def _leaf_weights(module: LM2Memory) -> dict:
    """The module's weights as [out, in] float64 leaves, unfused, for the reference."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if v is not None}
    head_dim = D // HEADS
    kv = state["linear_kv.weight"].view(HEADS, 2, head_dim, D)
    weights = dict(
        q=state["linear_q.weight"], k=kv[:, 0].reshape(D, D), v=kv[:, 1].reshape(D, D),
        out_gate=state["linear_out_gate.weight"], in_gate=state["linear_in_gate.weight"],
        forget_gate=state["linear_forget_gate.weight"], proj=state["linear_proj.weight"],
        initial=module.initial_bank.detach().clone(),
    )
    for name in ("read", "write"):  # qk-norm's per-head logit scales
        if hasattr(module, f"{name}_logit_scale"):
            weights[f"{name}_scale"] = getattr(module, f"{name}_logit_scale").detach()
    return {k: v.clone().requires_grad_(True) for k, v in weights.items()}


def _module_grads(module: LM2Memory) -> dict:
    """The module's parameter gradients in the reference's unfused names."""
    head_dim = D // HEADS
    kv = module.linear_kv.weight.grad.view(HEADS, 2, head_dim, D)
    if hasattr(module, "linear_gates"):
        g_in, g_forget = module.linear_gates.weight.grad.chunk(2, dim=0)
    else:
        g_in, g_forget = module.linear_in_gate.weight.grad, module.linear_forget_gate.weight.grad
    grads = dict(q=module.linear_q.weight.grad, k=kv[:, 0].reshape(D, D), v=kv[:, 1].reshape(D, D),
                 out_gate=module.linear_out_gate.weight.grad, in_gate=g_in, forget_gate=g_forget,
                 proj=module.linear_proj.weight.grad)
    if isinstance(module.initial_bank, torch.nn.Parameter):
        grads["initial"] = module.initial_bank.grad
    for name in ("read", "write"):
        if hasattr(module, f"{name}_logit_scale"):
            grads[f"{name}_scale"] = getattr(module, f"{name}_logit_scale").grad
    return grads


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # 5 chunks, attention write, identity M_0
        dict(memory_write="aligned", memory_slots=8),
        dict(memory_write="token", memory_slots=8),
        dict(memory_write="token", memory_slots=8, memory_bptt_chunks=2),
        dict(memory_init="learned"),
        dict(memory_slots=40),  # N > d: slots past d start at zero
        dict(memory_bptt_chunks=2),
        dict(memory_scores="qknorm"),
        dict(memory_write="token", memory_slots=8, memory_scores="qknorm"),
        dict(memory_write="aligned", memory_slots=8, memory_scores="qknorm", memory_init="learned"),
        dict(memory_forget_bias=2.0),
        dict(memory_write="token", memory_slots=8, memory_scores="qknorm", memory_forget_bias=2.0),
        dict(memory_write_shift=2),
        dict(memory_write="token", memory_slots=8, memory_scores="qknorm", memory_forget_bias=2.0,
             memory_write_shift=1),
    ],
    ids=["attention", "aligned", "token", "token-bptt2", "learned", "slots>d", "bptt2", "qknorm",
         "qknorm-token", "qknorm-aligned-learned", "forget-bias", "qknorm-token-forget-bias", "shift2",
         "qknorm-token-forget-bias-shift1"],
)
def test_gradients_equal_float64_reference(overrides):
    cfg, module = _memory(**overrides)
    tokens = torch.randn(40, 3, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 3, D, dtype=torch.float64)
    out, _ = module(tokens)
    (out * weight).sum().backward()

    leaves = _leaf_weights(module)
    ref_tokens = tokens.detach().clone().requires_grad_(True)
    bptt = overrides.get("memory_bptt_chunks")
    if bptt:  # the reference has no truncation: compare the values and the cut instead
        with torch.no_grad():
            ref_out, _ = memory_reference(ref_tokens, leaves, HEADS, 8, cfg.memory_write)
        assert _rel(out.detach(), ref_out) < 1e-10
        return
    ref_out, _ = memory_reference(ref_tokens, leaves, HEADS, 8, cfg.memory_write,
                                  qk_norm=cfg.memory_scores == "qknorm", forget_bias=cfg.memory_forget_bias,
                                  shift=cfg.memory_write_shift)
    (ref_out * weight).sum().backward()
    assert _rel(out.detach(), ref_out.detach()) < 1e-10
    assert _rel(tokens.grad, ref_tokens.grad) < 1e-10
    grads = _module_grads(module)
    for name, grad in grads.items():
        assert grad is not None, name
        assert _rel(grad, leaves[name].grad) < 1e-10, name
        assert leaves[name].grad.abs().max() > 1e-6, name  # not vacuous


def test_released_activations_survive_autograd_grad_and_retain_graph():
    """Storage freed after the forward is refilled before backward, also under
    torch.autograd.grad and a second backward of a retained graph."""
    _, module = _memory()
    tokens = torch.randn(40, 2, D, dtype=torch.float64, requires_grad=True)
    out, _ = module(tokens)
    (g1,) = torch.autograd.grad(out.square().sum(), tokens, retain_graph=True)
    (g2,) = torch.autograd.grad(out.square().sum(), tokens)
    with torch.no_grad():
        reference = module(tokens)[0]
    assert torch.equal(out.detach(), reference)
    assert torch.equal(g1, g2) and g1.abs().max() > 1e-6


def test_carried_training_calls_match_one_call_with_gradients():
    _, module = _memory()
    tokens = torch.randn(40, 2, D, dtype=torch.float64, requires_grad=True)
    with carry_memory(module):
        whole, _ = module(tokens)
    (whole_grad,) = torch.autograd.grad(whole.sum(), tokens)
    with carry_memory(module):
        pieces = torch.cat([module(tokens[:16])[0], module(tokens[16:])[0]])
    (pieces_grad,) = torch.autograd.grad(pieces.sum(), tokens)
    assert _rel(pieces, whole) < 1e-12 and _rel(pieces_grad, whole_grad) < 1e-12


@pytest.mark.parametrize("bias", [False, True])
def test_initial_keys_from_weights_equal_the_linear_on_m0(bias):
    """Identity M_0: K, V are columns of W_KV (+ bias), no GEMM; equal to linear_kv(M_0)."""
    _, module = _memory(add_bias_linear=bias, memory_slots=40)  # 40 > d: zero slots too
    key, value = module.initial_keys_values(torch.float64)
    ref_key, ref_value = module.keys_values(module.start_bank(1, torch.float64))
    assert key.shape == (1, HEADS, 40, D // HEADS)
    assert torch.allclose(key, ref_key, atol=1e-14) and torch.allclose(value, ref_value, atol=1e-14)


def test_fused_gating_backward_equals_autograd():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    content = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_WriteUpdate.apply, (logits, content, bank))
    assert torch.autograd.gradcheck(_OutGate.apply, (logits, torch.randn_like(logits, requires_grad=True)))
    assert torch.equal(_WriteUpdate.apply(logits, content, bank), _write_update(logits, content, bank))
    read = torch.randn_like(logits)
    assert torch.equal(_OutGate.apply(logits, read), _out_gate(logits, read))


def test_gate_statistics_only_when_asked():
    _, module = _memory()
    tokens = torch.randn(40, 2, D, dtype=torch.float64)
    module.train()
    module(tokens)
    assert module.gate_stats == {} and gate_stats(module) == {}
    with record_gate_stats(module):
        module(tokens)
    stats = gate_stats(module)[1]
    module.eval()
    with torch.no_grad():  # eval forwards record by default (memory inspection)
        module(tokens)
    assert gate_stats(module)[1] == pytest.approx(stats, abs=1e-12)
    # The means are the gates' own: recompute them from the reference's equations.
    leaves = {k: v.detach() for k, v in _leaf_weights(module).items()}
    chunk = tokens[:8]
    q = chunk @ leaves["q"].T
    bank = leaves["initial"]
    k = bank @ leaves["k"].T
    g_in = []
    for b in range(2):
        content = torch.zeros_like(bank)
        for h in range(HEADS):
            cols = slice(h * 8, (h + 1) * 8)
            s = q[:, b, cols] @ k[:, cols].T / 8 ** 0.5
            content[:, cols] = torch.softmax(s.T, dim=1) @ chunk[:, b, cols]
        g_in.append(torch.sigmoid(content @ leaves["in_gate"].T))
    first_chunk_mean = torch.stack(g_in).mean().item()
    module.train()
    with record_gate_stats(module):
        module(tokens[:16])  # two chunks: only chunk 0 is written
    assert gate_stats(module)[1]["in"] == pytest.approx(first_chunk_mean, abs=1e-6)  # fp32 means


def test_inside_torch_checkpoint_gradients_are_unchanged():
    """torch.utils.checkpoint (non-reentrant) recomputes the forward from its own saved-tensor
    hooks; the module releases nothing there, and its gradients equal the plain backward's."""
    _, module = _memory()
    tokens = torch.randn(40, 2, D, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(module(tokens)[0].square().sum(), tokens)
    # Without early stop the recomputation runs the whole forward, release code included.
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        out = torch.utils.checkpoint.checkpoint(lambda t: module(t)[0], tokens, use_reentrant=False)
        (checkpointed,) = torch.autograd.grad(out.square().sum(), tokens)
    assert torch.equal(plain, checkpointed)


@pytest.mark.parametrize("overrides", [{}, {"memory_write": "token", "memory_slots": 8}],
                         ids=["attention-write", "token-write"])
def test_refilled_activations_equal_the_forwards_under_a_compiled_kernel(monkeypatch, overrides):
    """On a GPU the forward's gating runs through jit_fuser's compiled kernels, which may round
    differently from eager PyTorch in bf16. The released activations must be recomputed through
    the same path, bit for bit. A stand-in "compiled kernel" that differs from eager (scaled by
    1 + 2^-10) shows it on CPU: every refilled tensor equals the one the forward made (with the
    eager recompute the bank and the gated read differed)."""
    import megatron_lm2.memory as memory

    monkeypatch.setattr(memory, "_use_kernel", lambda tensor: True)
    def compiled(fn):
        def run(*tensors):
            result = fn(*tensors)
            if isinstance(result, tuple):
                return tuple(r * (1 + 2.0 ** -10) for r in result)
            return result * (1 + 2.0 ** -10)
        return run

    monkeypatch.setattr(memory, "_kernel", compiled)
    seen = []
    original = LM2Memory._release_until_backward

    def recording(output, released):
        seen.extend((tensor, tensor.detach().clone()) for tensor, _ in released)
        original(output, released)

    monkeypatch.setattr(LM2Memory, "_release_until_backward", staticmethod(recording))
    _, module = _memory(**overrides)
    tokens = torch.randn(40, 2, D, dtype=torch.float64, requires_grad=True)
    out, _ = module(tokens)
    assert len(seen) >= 3  # banks of chunks 1.., the read, the gated read
    out.square().sum().backward()
    for k, (tensor, before) in enumerate(seen):
        assert torch.equal(tensor.detach(), before), (k, (tensor - before).abs().max().item())
