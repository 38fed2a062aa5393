"""The LM2 memory: one bank per memory layer, read by cross-attention with an output gate,
written once per chunk with input and forget gates. docs/memory.md states the semantics and
every deviation from the paper (Kang et al. 2025, arXiv 2502.06049) and from its code.

Shapes (per TP rank; tp = tensor-parallel size, H_m = memory heads, d_h = d / H_m):
    tokens E          [T, B, d]            normed block input, replicated on TP ranks
    bank M            [B, N, d/tp]         this rank's columns of every slot
    queries Q         [T, B, H_m/tp, d_h]  this rank's heads
    keys, values K,V  [B, N, H_m/tp, d_h]

The sequence is cut into chunks of C tokens. Chunk j reads the bank as it stood after chunk
j-1 (chunk 0 reads M_0), and the bank is written once after each chunk. Nothing a token reads
was written from itself or a later token: causal by construction, for any T, N and d.

Sequence parallelism (with the TE spec): the block's tokens arrive split along the sequence;
the memory gathers them once and reduce-scatters its output, like Megatron's attention.

Tensor parallelism: rank r owns memory heads [r*H_m/tp, (r+1)*H_m/tp) and the matching d/tp
columns of the bank, of the tokens' values for the write, and of every gate. Per layer and
chunk the memory adds two all-gathers of [B, N, d] (the bank before K/V, the write content
before the gates); per layer, one all-gather of E_mem [T, B, d] before the output gate and
the all-reduce of linear_proj (as self-attention's linear_proj).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_lm2.config import LM2Config


@dataclass
class LM2MemorySubmodules:
    linear_q: Union[ModuleSpec, type] = None  # Eq. 1: tokens -> queries (column-parallel)
    linear_kv: Union[ModuleSpec, type] = None  # Eq. 1: bank -> keys, values (column-parallel)
    linear_out_gate: Union[ModuleSpec, type] = None  # Eq. 2: E_mem -> g_out (column-parallel)
    linear_in_gate: Union[ModuleSpec, type] = None  # Eq. 4: input gate (column-parallel)
    linear_forget_gate: Union[ModuleSpec, type] = None  # Eq. 5: forget gate (column-parallel)
    linear_proj: Union[ModuleSpec, type] = None  # gated read -> residual (row-parallel)


def identity_bank(num_slots: int, hidden_size: int, dtype=torch.float32, device=None) -> Tensor:
    """The paper's M_0: slot i is the unit vector e_i for i < min(N, d), zeros after. [N, d]"""
    bank = torch.zeros(num_slots, hidden_size, dtype=dtype, device=device)
    n = min(num_slots, hidden_size)
    bank[torch.arange(n), torch.arange(n)] = 1.0
    return bank


def _softmax(scores: Tensor) -> Tensor:
    """Softmax over the last axis in at least fp32 (bf16/fp16 scores are upcast)."""
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


class LM2Memory(MegatronModule):
    """Memory read (Eq. 1-3) and gated write (Eq. 4-6) for one decoder block.

    forward(E) returns (output, bias) like Megatron's attention modules, so the layer adds it
    to the residual stream with its bias-dropout-add.

    State: `self.bank` is the bank after the last forward, kept only while `carry` is True
    (streaming: the next call starts from it; a partial last chunk waits in
    `self.pending_tokens` and is written when a later call completes it, so any split of a
    stream into calls computes what one call would). Otherwise every forward starts from M_0,
    so unrelated training sequences never share memory. megatron_lm2.memory_state drives it.
    """

    def __init__(
        self,
        config: LM2Config,
        submodules: LM2MemorySubmodules,
        layer_number: int,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.config: LM2Config = config
        self.layer_number = layer_number
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        d = config.hidden_size
        self.num_slots = config.memory_slots
        self.num_heads = config.memory_heads // tp
        self.head_dim = config.memory_head_dim
        self.local_hidden = self.num_heads * self.head_dim  # d / tp
        self.chunk_size = config.memory_chunk_size
        self.write_mode = config.memory_write

        # Sequence parallel: tokens arrive split along the sequence and are gathered once in
        # forward; the bank-side linears never see a sequence. So every linear but the
        # output projection (which reduce-scatters back) is built without sequence parallel.
        self.sequence_parallel = config.sequence_parallel
        inner_config = config.replace(sequence_parallel=False) if config.sequence_parallel else config

        def column(spec, out_features, name):
            return build_module(
                spec,
                d,
                out_features,
                config=inner_config,
                init_method=config.init_method,
                gather_output=False,
                bias=config.add_bias_linear,
                skip_bias_add=False,
                is_expert=False,
                tp_comm_buffer_name=name,
            )

        self.linear_q = column(submodules.linear_q, d, "mem_q")
        # Output rows are laid out per head as [k_h; v_h], so a rank's slice holds whole heads.
        self.linear_kv = column(submodules.linear_kv, 2 * d, "mem_kv")
        self.linear_out_gate = column(submodules.linear_out_gate, d, "mem_out_gate")
        self.linear_in_gate = column(submodules.linear_in_gate, d, "mem_in_gate")
        self.linear_forget_gate = column(submodules.linear_forget_gate, d, "mem_forget_gate")
        self.linear_proj = build_module(
            submodules.linear_proj,
            d,
            d,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="mem_proj",
        )

        lo = self.tp_rank * self.local_hidden
        initial = identity_bank(self.num_slots, d)[:, lo : lo + self.local_hidden]
        if config.memory_init == "learned":
            self.initial_bank = torch.nn.Parameter(initial.to(config.params_dtype))
            # TP-sharded along the hidden dimension, like a column-parallel weight's rows.
            self.initial_bank.tensor_model_parallel = True
            self.initial_bank.partition_dim = 1
            self.initial_bank.partition_stride = 1
        else:
            self.register_buffer("initial_bank", initial.to(config.params_dtype), persistent=False)

        self.carry = False
        self.bank: Optional[Tensor] = None
        # Carry only: normed tokens of a partial chunk waiting for the next call [c, B, d].
        self.pending_tokens: Optional[Tensor] = None
        self.gate_stats: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------ state
    def start_bank(self, batch_size: int, dtype: torch.dtype) -> Tensor:
        if self.carry and self.bank is not None:
            if self.bank.shape[0] != batch_size:
                raise ValueError(
                    f"layer {self.layer_number}: carried memory bank has batch size "
                    f"{self.bank.shape[0]} but the input has {batch_size}; reset the memory "
                    f"(megatron_lm2.memory_state.reset_memory) before a new batch"
                )
            return self.bank
        return self.initial_bank.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    # ---------------------------------------------------------------------------- forward
    def forward(self, hidden_states: Tensor, **unused) -> tuple[Tensor, Optional[Tensor]]:
        if self.sequence_parallel:
            # [T/tp, B, d] -> [T, B, d]. Backward splits: every consumer below already returns
            # the complete gradient (column-parallel all-reduce, the scatter's all-gather).
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        # Streaming: a partial chunk left by the previous call is not written yet; its tokens
        # are prepended here so the chunk completes exactly as in one long call. Their reads
        # were returned by that call and are dropped below.
        held = self.pending_tokens if self.carry else None
        if held is not None:
            hidden_states = torch.cat([held, hidden_states], dim=0)
        num_held = 0 if held is None else held.shape[0]
        seq_len, batch, _ = hidden_states.shape
        h, dh = self.num_heads, self.head_dim

        query, _ = self.linear_q(hidden_states)  # Eq. 1: Q = E W_Q
        query = query.view(seq_len, batch, h, dh)
        # The write gathers token states per head, in the same columns as this rank's bank.
        # A scatter, not a plain slice: its backward all-gathers, so every rank's gradient of
        # the (replicated) tokens includes the other ranks' columns.
        token_values = scatter_to_tensor_model_parallel_region(hidden_states)
        token_values = token_values.view(seq_len, batch, h, dh)

        bank = self.start_bank(batch, hidden_states.dtype)
        reads, stats = [], []
        starts = list(range(0, seq_len, self.chunk_size))
        for j, start in enumerate(starts):
            end = min(start + self.chunk_size, seq_len)
            bptt = self.config.memory_bptt_chunks
            if bptt is not None and j > 0 and j % bptt == 0:
                # Truncated backprop through the recurrence: windows of `bptt` chunks.
                bank = bank.detach()
            read, scores = self._read(query[start:end], bank)
            reads.append(read)
            # The last chunk is written only if a later call will read it (carry) and only
            # once it is complete.
            last = j + 1 == len(starts)
            if not last or (self.carry and end - start == self.chunk_size):
                bank, gates = self._write(
                    bank, scores, token_values[start:end], hidden_states[start:end], read
                )
                stats.append(gates)

        e_mem = torch.cat(reads, dim=0)[num_held:].reshape(-1, batch, self.local_hidden)
        # Eq. 2: g_out = sigma(E_mem W_out); the gate of a column needs every column of E_mem.
        gate_logits, _ = self.linear_out_gate(gather_from_tensor_model_parallel_region(e_mem))
        g_out = torch.sigmoid(gate_logits)
        # Eq. 3: E_gated = g_out * E_mem, projected into the residual stream.
        output, bias = self.linear_proj(g_out * e_mem)

        if self.carry:
            self.bank = bank
            partial = seq_len % self.chunk_size
            self.pending_tokens = hidden_states[seq_len - partial :] if partial else None
        self._record_gate_stats(g_out, stats)
        return output, bias

    def _read(self, query: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 1: E_mem = softmax(Q K^T / sqrt(d_h)) V with K, V from the bank. No mask: the
        bank holds only the past. Returns E_mem [c, B, h, d_h] and the scores [B, h, c, N]."""
        batch = bank.shape[0]
        kv, _ = self.linear_kv(gather_from_tensor_model_parallel_region(bank))
        kv = kv.view(batch, self.num_slots, self.num_heads, 2, self.head_dim)
        key, value = kv[..., 0, :], kv[..., 1, :]
        scores = torch.einsum("cbhe,bnhe->bhcn", query, key) / math.sqrt(self.head_dim)
        attn = _softmax(scores).to(value.dtype)
        return torch.einsum("bhcn,bnhe->cbhe", attn, value), scores

    def _write(
        self, bank: Tensor, scores: Tensor, token_values: Tensor, tokens: Tensor, read: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Eq. 4-6: M <- g_in * tanh(U) + g_forget * M, once per chunk."""
        batch = bank.shape[0]
        if self.write_mode == "attention":
            # Slots gather the chunk: the read's score matrix, soft-maxed over tokens instead
            # of slots, weights the tokens' states (this rank's heads and columns).
            attn = _softmax(scores.transpose(-1, -2)).to(tokens.dtype)
            content = torch.einsum("bhnc,cbhe->bnhe", attn, token_values)
            content = content.reshape(batch, self.num_slots, self.local_hidden)
            content_full = gather_from_tensor_model_parallel_region(content)
            g_in = torch.sigmoid(self.linear_in_gate(content_full)[0])  # Eq. 4
            g_forget = torch.sigmoid(self.linear_forget_gate(content_full)[0])  # Eq. 5
        else:
            # "aligned": the paper's equations literally, slot i <- token i of the chunk:
            # g_in = sigma(E W_in), g_forget = sigma(E_mem W_forget), content = E_mem.
            content_tokens = read.reshape(read.shape[0], batch, self.local_hidden)
            g_in = torch.sigmoid(self.linear_in_gate(tokens)[0]).transpose(0, 1)
            g_forget = torch.sigmoid(
                self.linear_forget_gate(gather_from_tensor_model_parallel_region(content_tokens))[0]
            ).transpose(0, 1)
            content = content_tokens.transpose(0, 1)
        new_bank = g_in * torch.tanh(content) + g_forget * bank  # Eq. 6
        return new_bank, (g_in, g_forget)

    @torch.no_grad()
    def _record_gate_stats(self, g_out: Tensor, write_gates: list) -> None:
        """Means of the gates over this forward (this rank's columns), for the step log."""
        stats = {"out": g_out.float().mean()}
        if write_gates:
            stats["in"] = torch.stack([g.float().mean() for g, _ in write_gates]).mean()
            stats["forget"] = torch.stack([f.float().mean() for _, f in write_gates]).mean()
        self.gate_stats = stats

    # ----------------------------------------------------------------------- checkpoints
    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        sharded = {}
        for name, child in self.named_children():
            sharded.update(child.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        if isinstance(self.initial_bank, torch.nn.Parameter):
            own = {"initial_bank": self.initial_bank}
            sharded.update(
                make_sharded_tensors_for_checkpoint(
                    own, prefix, {"initial_bank": 1}, sharded_offsets
                )
            )
        return sharded
