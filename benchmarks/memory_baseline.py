"""The memory's forward as it was before the SDPA rewrite (commit fd285d0), kept as the
"old path" of the benchmarks: explicit [B, h, C, N] score matrices for the read and, soft-maxed
the other way, for the write; chunk 0's keys from a per-sample GEMM on M_0; unfused gating.
Same equations and weights as megatron_lm2.memory.LM2Memory (training path: no carry)."""

from __future__ import annotations

import math

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)

from megatron_lm2.memory import LM2Memory, _softmax


def explicit_forward(module: LM2Memory, hidden_states: torch.Tensor):
    """module(hidden_states) computed the old way; returns (output, bias)."""
    seq_len, batch, _ = hidden_states.shape
    h, dh = module.num_heads, module.head_dim
    query = module.linear_q(hidden_states)[0].view(seq_len, batch, h, dh)
    token_values = scatter_to_tensor_model_parallel_region(hidden_states).view(seq_len, batch, h, dh)
    bank = module.initial_bank.to(hidden_states.dtype).unsqueeze(0).expand(batch, -1, -1)
    reads = []
    starts = list(range(0, seq_len, module.chunk_size))
    for j, start in enumerate(starts):
        end = min(start + module.chunk_size, seq_len)
        kv = module.linear_kv(gather_from_tensor_model_parallel_region(bank))[0]
        kv = kv.view(batch, module.num_slots, h, 2, dh)
        key, value = kv[..., 0, :], kv[..., 1, :]
        scores = torch.einsum("cbhe,bnhe->bhcn", query[start:end], key) / math.sqrt(dh)
        read = torch.einsum("bhcn,bnhe->cbhe", _softmax(scores).to(value.dtype), value)
        reads.append(read)
        if j + 1 < len(starts):
            if module.write_mode == "attention":
                attn = _softmax(scores.transpose(-1, -2)).to(hidden_states.dtype)
                content = torch.einsum("bhnc,cbhe->bnhe", attn, token_values[start:end])
                content = content.reshape(batch, module.num_slots, module.local_hidden)
                logits = module.linear_gates(gather_from_tensor_model_parallel_region(content))[0]
                a, f = logits.chunk(2, dim=-1)
            else:
                content = read.reshape(end - start, batch, module.local_hidden).transpose(0, 1)
                a = module.linear_in_gate(hidden_states[start:end])[0].transpose(0, 1)
                f = module.linear_forget_gate(gather_from_tensor_model_parallel_region(
                    content.transpose(0, 1)))[0].transpose(0, 1)
            bank = torch.sigmoid(a) * torch.tanh(content) + torch.sigmoid(f) * bank
    e_mem = torch.cat(reads, dim=0).reshape(seq_len, batch, module.local_hidden)
    g_out = torch.sigmoid(module.linear_out_gate(gather_from_tensor_model_parallel_region(e_mem))[0])
    return module.linear_proj(g_out * e_mem)
