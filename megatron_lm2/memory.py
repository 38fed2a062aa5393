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

Both the read and the write are attention, computed by
torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on GPUs,
the fused CPU kernel here), so no [C, N] score matrix is ever stored:
    read   E_mem = SDPA(Q, K, V)                 tokens attend over slots
    write  U     = SDPA(K, Q, E)                 slots attend over the chunk's tokens: the
                                                 read's scores, soft-maxed over tokens
           U     = E  (memory_write="token")     slot i <- token i of the chunk, N = C
In both writes E may be E_i + E_(i-1) + ... + E_(i-k) (memory_write_shift = k, within the chunk):
a slot then holds a token with the tokens before it, a value with its key.
Chunk 0 of a fresh sequence reads M_0, the same for every sample: its keys and values are
computed once, not per sample (with the identity M_0 they are columns of W_KV, no GEMM).

Sequence parallelism (with the TE spec): the block's tokens arrive split along the sequence;
the memory gathers them once and reduce-scatters its output, like Megatron's attention.

Tensor parallelism: rank r owns memory heads [r*H_m/tp, (r+1)*H_m/tp) and the matching d/tp
columns of the bank, of the tokens' values for the write, and of every gate. Per layer and
chunk the memory adds two all-gathers of [B, N, d] (the bank before K/V, the write content
before the gates); per layer, one all-gather of E_mem [T, B, d] before the output gate and
the all-reduce of linear_proj (as self-attention's linear_proj).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.jit import jit_fuser
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
    # Eq. 4 + 5 in one GEMM when both gates read the same input (the attention write);
    # None = the linear_in_gate spec with twice the outputs.
    linear_gates: Union[ModuleSpec, type] = None


def identity_bank(num_slots: int, hidden_size: int, dtype=torch.float32, device=None) -> Tensor:
    """The paper's M_0: slot i is the unit vector e_i for i < min(N, d), zeros after. [N, d]"""
    bank = torch.zeros(num_slots, hidden_size, dtype=dtype, device=device)
    n = min(num_slots, hidden_size)
    bank[torch.arange(n), torch.arange(n)] = 1.0
    return bank


SIGNS_SEED = 0x4C4D32  # "LM2": the one seed of memory_init="identity-signs"


def sign_rows(rows: int, hidden_size: int) -> Tensor:
    """[rows, d] float64 rows of +-1/sqrt(d), from Python's Mersenne Twister (getrandbits is
    reproducible across Python versions and machines, unlike torch's generators): unit vectors,
    pairwise cosines ~ 1/sqrt(d). The HF modeling file computes the same bits."""
    n = rows * hidden_size
    if n == 0:  # torch.frombuffer refuses an empty buffer
        return torch.zeros(rows, hidden_size, dtype=torch.float64)
    raw = random.Random(SIGNS_SEED).getrandbits(n).to_bytes((n + 7) // 8, "little")
    bytes_ = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    bits = ((bytes_[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:n]
    return (bits.to(torch.float64) * 2 - 1).view(rows, hidden_size) / math.sqrt(hidden_size)


def initial_bank_rows(mode: str, num_slots: int, hidden_size: int, dtype=torch.float32, device=None) -> Tensor:
    """M_0 [N, d] of a memory_init mode. "identity" and "learned" start at the paper's identity
    (zeros past d). "identity-signs": the same for i < d, and slots i >= d get distinct random
    sign vectors instead of zeros, so N > d slots are not d + 1 distinct ones (issue 10)."""
    bank = identity_bank(num_slots, hidden_size, dtype=dtype, device=device)
    if mode == "identity-signs" and num_slots > hidden_size:
        bank[hidden_size:] = sign_rows(num_slots - hidden_size, hidden_size).to(dtype=dtype, device=device)
    return bank


def _rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis (the head dimension), the mean in >= fp32."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def chunk_shift_sum(x: Tensor, chunk: int, shift: int) -> Tensor:
    """x [T, B, d], T a multiple of `chunk` -> y_t = x_t + x_(t-1) + ... + x_(t-shift), the terms
    before t's chunk left out: what `memory_write_shift` writes (a slot holds a token with its
    left context). A sum, not a learned convolution: no parameter, nothing to shard or export."""
    if not shift:
        return x
    chunks = x.view(x.shape[0] // chunk, chunk, *x.shape[1:])
    out = chunks
    for k in range(1, shift + 1):
        out = out + F.pad(chunks[:, :-k], (0, 0) * (x.dim() - 1) + (k, 0))
    return out.reshape(x.shape)


def _softmax(scores: Tensor) -> Tensor:
    """Softmax over the last axis in at least fp32 (bf16/fp16 scores are upcast)."""
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))


# ------------------------------------------------------------------ fused elementwise gating
# Forward and backward as separate pure functions, compiled by Megatron's jit_fuser on GPUs
# (one kernel each instead of ~8); on CPU they run eagerly (same code, same numbers). The
# autograd functions save only their inputs, never sigmoid/tanh intermediates.


def _write_update(logits: Tensor, content: Tensor, bank: Tensor) -> Tensor:
    """Eq. 4-6: sigma(a) * tanh(U) + sigma(f) * M, logits = [a | f] along the last axis."""
    a, f = logits.chunk(2, dim=-1)
    return torch.sigmoid(a) * torch.tanh(content) + torch.sigmoid(f) * bank


def _write_update_backward(grad: Tensor, logits: Tensor, content: Tensor, bank: Tensor):
    a, f = logits.chunk(2, dim=-1)
    g_in, g_forget, t = torch.sigmoid(a), torch.sigmoid(f), torch.tanh(content)
    grad_a = grad * t * g_in * (1.0 - g_in)
    grad_f = grad * bank * g_forget * (1.0 - g_forget)
    return torch.cat((grad_a, grad_f), dim=-1), grad * g_in * (1.0 - t * t), grad * g_forget


def _out_gate(logits: Tensor, read: Tensor) -> Tensor:
    """Eq. 2-3: sigma(E_mem W_out) * E_mem."""
    return torch.sigmoid(logits) * read


def _out_gate_backward(grad: Tensor, logits: Tensor, read: Tensor):
    g = torch.sigmoid(logits)
    return grad * read * g * (1.0 - g), grad * g


_FUSED = {}


def _kernel(fn):
    """The jit_fuser-compiled version of fn for CUDA tensors (compiled on first use)."""
    if fn not in _FUSED:
        _FUSED[fn] = jit_fuser(fn)
    return _FUSED[fn]


def _use_kernel(tensor: Tensor) -> bool:
    return tensor.is_cuda


def _run(fn, *tensors):
    """fn through the compiled kernel on CUDA, eagerly elsewhere. Every caller that recomputes
    a forward value (the released activations) goes through here too: the compiled kernel and
    eager PyTorch may round differently in bf16, and a refilled tensor must be bit-identical to
    the one the forward made."""
    return (_kernel(fn) if _use_kernel(tensors[0]) else fn)(*tensors)


class _WriteUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, content, bank):
        ctx.save_for_backward(logits, content, bank)
        return _run(_write_update, logits, content, bank)

    @staticmethod
    def backward(ctx, grad):
        logits, content, bank = ctx.saved_tensors
        grad_logits, grad_content, grad_bank = _run(
            _write_update_backward, grad.contiguous(), logits, content, bank
        )
        return grad_logits, grad_content, grad_bank if ctx.needs_input_grad[2] else None


class _OutGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, read):
        ctx.save_for_backward(logits, read)
        return _run(_out_gate, logits, read)

    @staticmethod
    def backward(ctx, grad):
        logits, read = ctx.saved_tensors
        return _run(_out_gate_backward, grad.contiguous(), logits, read)


class _WeightColumnsT(torch.autograd.Function):
    """weight[:, :n]^T as a tensor: the keys and values of the identity M_0's slots.

    Its weight gradient goes where the linear's own GEMM puts it: with Megatron's gradient-
    accumulation fusion (local or TE linears) straight into `main_grad`, returning a dummy,
    because DDP ignores `.grad` of a parameter marked `grad_added_to_main_grad`."""

    @staticmethod
    def forward(ctx, weight, n, fused):
        ctx.n, ctx.fused = n, fused
        ctx.weight = weight
        return weight[:, :n].t().clone(memory_format=torch.contiguous_format)  # never a view

    @staticmethod
    def backward(ctx, grad):
        weight, n = ctx.weight, ctx.n
        if ctx.fused and getattr(weight, "main_grad", None) is not None:
            weight.main_grad[:, :n].add_(grad.t())
            if hasattr(weight, "grad_added_to_main_grad"):
                weight.grad_added_to_main_grad = True
                zero = getattr(weight, "zero_out_wgrad", False)
                dummy = (torch.zeros if zero else torch.empty)(
                    weight.main_grad.shape, dtype=grad.dtype, device=grad.device
                )
                return dummy, None, None
        full = grad.new_zeros(weight.shape)
        full[:, :n] = grad.t()
        return full, None, None


def _in_torch_checkpoint() -> bool:
    """Inside torch.utils.checkpoint's non-reentrant forward or recomputation: there the
    tensors autograd keeps are the checkpoint's (recomputed on unpack), and the refill hook
    on a recomputed output would never fire, so nothing may be released."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return bool(hooks) and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint"


class _GateHalf:
    """Read-only view of one gate inside the fused gate GEMM (`memory.linear_in_gate.weight`
    keeps working for code that inspects the gates)."""

    def __init__(self, fused: torch.nn.Module, index: int):
        self._fused, self._index = fused, index

    @property
    def weight(self) -> Tensor:
        return self._fused.weight.chunk(2, dim=0)[self._index]

    @property
    def bias(self) -> Optional[Tensor]:
        bias = getattr(self._fused, "bias", None)
        return bias.chunk(2, dim=0)[self._index] if isinstance(bias, Tensor) and bias.numel() else None


class LM2Memory(MegatronModule):
    """Memory read (Eq. 1-3) and gated write (Eq. 4-6) for one decoder block.

    forward(E) returns (output, bias) like Megatron's attention modules, so the layer adds it
    to the residual stream with its bias-dropout-add.

    State: `self.bank` is the bank after the last forward, kept only while `carry` is True
    (streaming: the next call starts from it; a partial last chunk waits in
    `self.pending_tokens` and is written when a later call completes it, so any split of a
    stream into calls computes what one call would). Otherwise every forward starts from M_0,
    so unrelated training sequences never share memory. megatron_lm2.memory_state drives it.

    Gate statistics (`gate_stats`: mean gates of the last recorded forward) are computed
    only when asked: `record_gates = True` (memory_state.record_gate_stats, on the steps the
    trainer logs), or in eval mode while `record_gates` is None. A training forward that
    is not asked stores nothing on the module (CUDA-graph safe).
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
        self.score_mode = config.memory_scores
        self.score_scale = 1.0 / math.sqrt(self.head_dim)
        self.sequence_parallel = config.sequence_parallel

        # The memory's linears get their own config copy: Megatron's TE wrapper switches
        # `tp_comm_overlap` off on the config it is given for buffer names it does not know
        # ("mem_*"), which would silently turn it off for every later layer sharing it.
        # Sequence parallel: tokens arrive split along the sequence and are gathered once in
        # forward; the bank-side linears never see a sequence, so every linear but the output
        # projection (which reduce-scatters back) is built without sequence parallel.
        inner_config = config.replace(sequence_parallel=False)
        proj_config = config.replace()

        def column(spec, out_features, name, **extra):
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
                **extra,
            )

        self.linear_q = column(submodules.linear_q, d, "mem_q")
        # Output rows are laid out per head as [k_h; v_h], so a rank's slice holds whole heads.
        self.linear_kv = column(submodules.linear_kv, 2 * d, "mem_kv")
        if config.memory_qk_init == "tied":
            self._tie_keys_to_queries()
        self.linear_out_gate = column(submodules.linear_out_gate, d, "mem_out_gate")
        if self.write_mode in ("attention", "token"):
            # Both gates read the write content U (the token itself for "token"): one GEMM.
            # Per rank the output rows are [this rank's input-gate rows; its forget-gate rows];
            # checkpoints and state dicts keep the two gates' own names and layouts
            # (_split_gates / _fuse_gates).
            # stride=2: a CPU-initialised master weight [W_in; W_forget] is dealt out the same way
            # (as Megatron's SwiGLU fc1), so the weights do not depend on the TP size.
            self.linear_gates = column(
                submodules.linear_gates or submodules.linear_in_gate, 2 * d, "mem_gates", stride=2
            )
        else:
            # "aligned": the gates read different inputs (tokens, reads): two GEMMs.
            self.linear_in_gate = column(submodules.linear_in_gate, d, "mem_in_gate")
            self.linear_forget_gate = column(submodules.linear_forget_gate, d, "mem_forget_gate")
        self.linear_proj = build_module(
            submodules.linear_proj,
            d,
            d,
            config=proj_config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="mem_proj",
        )

        lo = self.tp_rank * self.local_hidden
        initial = initial_bank_rows(config.memory_init, self.num_slots, d)[:, lo : lo + self.local_hidden]
        if config.memory_init == "learned":
            self.initial_bank = torch.nn.Parameter(initial.to(config.params_dtype))
            # TP-sharded along the hidden dimension, like a column-parallel weight's rows.
            self.initial_bank.tensor_model_parallel = True
            self.initial_bank.partition_dim = 1
            self.initial_bank.partition_stride = 1
        else:
            self.register_buffer("initial_bank", initial.to(config.params_dtype), persistent=False)

        # qk-norm: one learned logit scale per head for the read, and one for the attention write
        # (its softmax runs over tokens, not slots: it may want another sharpness). 1-D and
        # TP-sharded with the heads, like a column-parallel bias.
        for name in config.memory_logit_scales:
            scale = torch.nn.Parameter(
                torch.full((self.num_heads,), float(config.memory_logit_scale), dtype=config.params_dtype)
            )
            scale.tensor_model_parallel = True
            scale.partition_dim = 0
            scale.partition_stride = 1
            setattr(self, name, scale)

        self.carry = False
        self.bank: Optional[Tensor] = None
        # Carry only: normed tokens of a partial chunk waiting for the next call [c, B, d].
        self.pending_tokens: Optional[Tensor] = None
        self.record_gates: Optional[bool] = None
        self.gate_stats: dict[str, Tensor] = {}
        if self.write_mode in ("attention", "token"):
            self._register_state_dict_hook(LM2Memory._split_gates)
            self._register_load_state_dict_pre_hook(self._fuse_gates, with_module=False)

    @torch.no_grad()
    def _tie_keys_to_queries(self) -> None:
        """memory_qk_init="tied": every head's W_K := its W_Q (linear_kv's rows are [k_h; v_h] per
        head; a TP rank holds whole heads of both, so the copy is local and the same at any TP).
        Called after both are drawn, so every other weight is what "independent" gives."""
        d = self.config.hidden_size
        queries = self.linear_q.weight.view(self.num_heads, self.head_dim, d)
        self.linear_kv.weight.view(self.num_heads, 2, self.head_dim, d)[:, 0].copy_(queries)

    def __getattr__(self, name: str):
        if name in LM2Memory._GATE_NAMES:
            modules = self.__dict__.get("_modules", {})
            if name not in modules and "linear_gates" in modules:
                return _GateHalf(modules["linear_gates"], LM2Memory._GATE_NAMES.index(name))
        return super().__getattr__(name)

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

    def _recording(self) -> bool:
        return self.record_gates if self.record_gates is not None else not self.training

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
        recording = self._recording()

        query, _ = self.linear_q(hidden_states)  # Eq. 1: Q = E W_Q
        # qk-norm: normalised once, for every chunk's read and (attention) write scores.
        query = self._normalized(query.view(seq_len, batch, h, dh))
        starts = list(range(0, seq_len, self.chunk_size))
        # The last chunk is written only if a later call will read it (carry) and only once
        # it is complete; the written chunks are a prefix.
        tail = seq_len - starts[-1]
        num_written = len(starts) - 1 + (1 if self.carry and tail == self.chunk_size else 0)
        # What the writes take: the written chunks' tokens, each plus the memory_write_shift
        # tokens before it in its chunk (held tokens start a chunk, so streaming writes the same).
        written = self.write_tokens(hidden_states[: num_written * self.chunk_size])
        # The write gathers token states per head, in the same columns as this rank's bank.
        # A scatter, not a plain slice: its backward all-gathers, so every rank's gradient of
        # the (replicated) tokens includes the other ranks' columns.
        token_values = scatter_to_tensor_model_parallel_region(written)
        token_values = token_values.view(written.shape[0], batch, h, dh)

        carried = self.carry and self.bank is not None
        bank = self.start_bank(batch, hidden_states.dtype)
        # Tensors whose storage is released once their consumers have run and recomputed
        # (elementwise, from tensors autograd keeps anyway) when backward reaches this module.
        # Training only: with carried banks a later call could backprop into this call's
        # write without passing through its output, where the refill hook sits.
        releasing = torch.is_grad_enabled() and not self.carry and not _in_torch_checkpoint()
        released: list = []
        recompute_bank = None
        reads, write_logits = [], []
        if releasing and self.config.memory_write_shift and written.numel():
            # The shifted tokens: inputs of the gate GEMM and the write only, recomputed by adds.
            released.append((written, lambda: self.write_tokens(hidden_states[: written.shape[0]])))
        in_logits = None
        if self.write_mode != "attention" and num_written:
            # The aligned input gate, and both gates of the token write, read the tokens, all
            # known now: one GEMM for every write.
            gates = self.linear_in_gate if self.write_mode == "aligned" else self.linear_gates
            in_logits = gates(written)[0]
        for j, start in enumerate(starts):
            end = min(start + self.chunk_size, seq_len)
            bptt = self.config.memory_bptt_chunks
            if bptt is not None and j > 0 and j % bptt == 0:
                # Truncated backprop through the recurrence: windows of `bptt` chunks.
                bank = bank.detach()
            # Chunk 0 of a fresh sequence: M_0's keys and values, shared by the batch [1, ...].
            initial = j == 0 and not carried
            if initial:
                initial_kv = self._initial_kv(hidden_states.dtype)
                key, value = self._split_kv(initial_kv)
            else:
                key, value = self.keys_values(bank)
            key = self._normalized(key)  # shared by the read and the attention write
            q_chunk = query[start:end]
            read = self._read(q_chunk, key, value)
            reads.append(read)
            read_bank = bank
            if j < num_written:
                bank, logits, update = self._write_chunk(
                    bank, key, q_chunk, token_values[start:end], written[start:end], read,
                    None if in_logits is None else in_logits[start:end],
                )
                write_logits.append(logits)
            if releasing and j > 0:
                # bank_j: its consumers (linear_kv, this chunk's write) are done. M_0 is a buffer.
                released.append((read_bank, recompute_bank))
            if releasing and initial and self.config.memory_initial_is_identity:
                # M_0's keys and values: a copy of W_KV's columns, copied again for backward.
                dtype = hidden_states.dtype
                released.append((initial_kv, lambda: self._initial_kv(dtype)))
            if read_bank is not bank:
                recompute_bank = functools.partial(_run, _write_update, *update)

        def gather_reads(*chunks):
            return torch.cat(chunks, dim=0)[num_held:].reshape(-1, batch, self.local_hidden)

        e_mem = gather_reads(*reads)
        # Eq. 2: g_out = sigma(E_mem W_out); the gate of a column needs every column of E_mem.
        gate_logits, _ = self.linear_out_gate(gather_from_tensor_model_parallel_region(e_mem))
        # Eq. 3: E_gated = g_out * E_mem, projected into the residual stream.
        gated = _OutGate.apply(gate_logits, e_mem)
        output, bias = self.linear_proj(gated)
        if recording:
            self._record_gate_stats(gate_logits, write_logits)

        if self.carry:
            self.bank = bank
            partial = seq_len % self.chunk_size
            self.pending_tokens = hidden_states[seq_len - partial :] if partial else None
        if releasing and output.requires_grad:
            released.append((e_mem, lambda: gather_reads(*reads)))
            released.append((gated, lambda: _run(_out_gate, gate_logits, e_mem)))
            self._release_until_backward(output, released)
        return output, bias

    def write_tokens(self, hidden_states: Tensor) -> Tensor:
        """The tokens the write takes from whole chunks [k C, B, d]: each plus the
        `memory_write_shift` tokens before it in its chunk (the tokens themselves when 0)."""
        return chunk_shift_sum(hidden_states, self.chunk_size, self.config.memory_write_shift)

    # ------------------------------------------------------- released activations
    @staticmethod
    def _release_until_backward(output: Tensor, released: list) -> None:
        """Free the storage of tensors that autograd holds only as later ops' inputs, and
        refill it (a storage-level copy: no version bump, so autograd's checks still hold)
        when the gradient reaches `output`, i.e. before any backward of this module needs
        them. `released`: (tensor, recompute) in forward order, each recompute elementwise or a
        copy, from tensors autograd keeps anyway. Megatron's CheckpointWithoutOutput does the
        same for activations; this one also works under torch.autograd.grad."""
        for tensor, _ in released:
            tensor.untyped_storage().resize_(0)

        def refill(_grad):
            with torch.no_grad():
                for tensor, recompute in released:
                    value = recompute()
                    storage = tensor.untyped_storage()
                    storage.resize_(value.untyped_storage().nbytes())
                    storage.copy_(value.untyped_storage())
            released.clear()

        output.register_hook(refill)

    # ------------------------------------------------------------------- keys and values
    def keys_values(self, bank: Tensor) -> tuple[Tensor, Tensor]:
        """Eq. 1: K = M W_K, V = M W_V (one fused GEMM), each [B, H_m/tp, N, d_h]."""
        kv, _ = self.linear_kv(gather_from_tensor_model_parallel_region(bank))
        return self._split_kv(kv)

    def initial_keys_values(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """K, V of M_0, [1, H_m/tp, N, d_h]: the same for every sample."""
        return self._split_kv(self._initial_kv(dtype))

    def _initial_kv(self, dtype: torch.dtype) -> Tensor:
        """[1, N, 2d/tp] fused K/V of M_0. Identity M_0: slot i is e_i, so its keys and values
        are column i of W_KV (+ bias) and slots past d are the bias alone: no GEMM. Learned
        M_0, and identity-signs with slots past d: one GEMM on one bank."""
        if not self.config.memory_initial_is_identity:
            bank = gather_from_tensor_model_parallel_region(self.initial_bank.to(dtype)[None])
            return self.linear_kv(bank)[0]
        weight = self.linear_kv.weight
        n = min(self.num_slots, self.config.hidden_size)
        fused = bool(self.config.gradient_accumulation_fusion)
        kv = _WeightColumnsT.apply(weight, n, fused).to(dtype)  # [n, 2d/tp]
        if n < self.num_slots:
            kv = torch.cat([kv, kv.new_zeros(self.num_slots - n, kv.shape[1])])
        bias = getattr(self.linear_kv, "bias", None)
        if bias is not None and bias.numel():
            kv = kv + bias.to(dtype)
        return kv[None]

    def _split_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        kv = kv.view(kv.shape[0], self.num_slots, self.num_heads, 2, self.head_dim)
        # [B, N, h, d_h] -> [B, h, N, d_h]: views, the last axis stays contiguous.
        return kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)

    # ------------------------------------------------------------------------ attention
    # The scores of a role ("read": soft-maxed over slots; "write": the attention write's, over
    # tokens) are SDPA's (q k^T) * score_scale of q = _scaled(_normalized(Q), role) and
    # k = _normalized(K). qknorm: Q and K are divided by their root mean square per head, so
    # q k^T / d_h is their cosine, and the score is that cosine times the role's learned per-head
    # scale s_h (the query carries s_h / sqrt(d_h), SDPA's 1/sqrt(d_h) the rest). The scores are
    # bounded by s_h at any weight norm, and with s_h = 10 at init the softmax over N slots is not
    # flat (issue 10: the dot-product read starts uniform and its Q gradient falls with N). The
    # forward normalises each query and each bank's keys once, for the read and the write.
    def _normalized(self, x: Tensor) -> Tensor:
        """qk-norm's RMS normalisation per head (queries and slot keys); dot scores: x itself."""
        return _rms_normalize(x) if self.score_mode == "qknorm" else x

    def _scaled(self, query: Tensor, role: str) -> Tensor:
        """A normalised query [B, h, L, d_h] carrying the role's per-head logit scale (qk-norm)."""
        if self.score_mode == "dot":
            return query
        scale = self.read_logit_scale if role == "read" else self.write_logit_scale
        return query * (scale.to(query.dtype).view(1, -1, 1, 1) * self.score_scale)

    def scores(self, query: Tensor, key: Tensor, role: str = "read") -> Tensor:
        """The scores as an explicit matrix [B, h, c, N] for the raw query [c, B, h, d_h] and key
        [B, N, h, d_h] (eval.inspect replays the memory with them); the forward's SDPA calls
        compute the same without storing it."""
        q = self._scaled(self._normalized(query.permute(1, 2, 0, 3)), role)
        k = self._normalized(key.transpose(1, 2))
        return torch.einsum("bhce,bhne->bhcn", q, k) * self.score_scale

    def _read(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Eq. 1: E_mem = softmax(Q K^T / sqrt(d_h)) V, no mask (the bank holds only the past).
        query [c, B, h, d_h]; key, value [B or 1, h, N, d_h]; query and key already `_normalized`.
        Returns [c, B, h, d_h]."""
        c, batch, h, dh = query.shape
        if key.shape[0] == 1 and batch > 1:
            # One bank for the whole batch: the batch's tokens are one long query sequence.
            q = self._scaled(query.reshape(1, c * batch, h, dh).transpose(1, 2), "read")
            out = F.scaled_dot_product_attention(q, key, value, scale=self.score_scale)
            return out.transpose(1, 2).reshape(c, batch, h, dh)
        q = self._scaled(query.permute(1, 2, 0, 3), "read")
        out = F.scaled_dot_product_attention(q, key, value, scale=self.score_scale)
        return out.permute(2, 0, 1, 3)

    def _write_chunk(
        self, bank: Tensor, key: Tensor, query: Tensor, token_values: Tensor, tokens: Tensor,
        read: Tensor, in_logits: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, tuple]:
        """Eq. 4-6: M <- g_in * tanh(U) + g_forget * M, once per chunk. Returns the new bank,
        the gates' logits [B, N, 2 d/tp] and the update's inputs (to recompute the bank)."""
        batch = bank.shape[0]
        if self.write_mode == "attention":
            # Slots gather the chunk: the read's scores, soft-maxed over tokens instead of
            # slots, weight the tokens' states (this rank's heads and columns). As attention:
            # the slots' keys are the queries, the tokens' queries the keys.
            q = self._scaled(query.permute(1, 2, 0, 3), "write")  # query, key: `_normalized`
            k = key.expand(batch, -1, -1, -1)
            content = F.scaled_dot_product_attention(
                k, q, token_values.permute(1, 2, 0, 3), scale=self.score_scale
            )  # [B, h, N, d_h]
            content = content.transpose(1, 2).reshape(batch, self.num_slots, self.local_hidden)
            return self._gate_content(bank, content)
        if self.write_mode == "token":
            # Slot i <- token i of the chunk (N = C), no scores: a fact is written at full
            # strength whatever C is, and the read's softmax over slots is the one thing to
            # learn (issue 10). g_in, g_forget = sigma(E_i [W_in; W_forget]).
            content = token_values.reshape(token_values.shape[0], batch, self.local_hidden)
            if in_logits is None:
                in_logits = self.linear_gates(tokens)[0]
            return self._update(in_logits.transpose(0, 1), content.transpose(0, 1), bank)
        # "aligned": the paper's equations literally, slot i <- token i of the chunk:
        # g_in = sigma(E W_in), g_forget = sigma(E_mem W_forget), content = E_mem.
        content_tokens = read.reshape(read.shape[0], batch, self.local_hidden)
        if in_logits is None:
            in_logits = self.linear_in_gate(tokens)[0]
        in_logits = in_logits.transpose(0, 1)
        forget_logits = self.linear_forget_gate(
            gather_from_tensor_model_parallel_region(content_tokens)
        )[0].transpose(0, 1)
        logits = torch.cat((in_logits, forget_logits), dim=-1)
        return self._update(logits, content_tokens.transpose(0, 1), bank)

    def _gate_content(self, bank: Tensor, content: Tensor) -> tuple[Tensor, Tensor, tuple]:
        logits, _ = self.linear_gates(gather_from_tensor_model_parallel_region(content))
        return self._update(logits, content, bank)

    def _update(self, logits: Tensor, content: Tensor, bank: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """Eq. 4-6 from the gates' logits [B, N, 2 d/tp] (this rank's [input; forget] columns)."""
        bias = self.config.memory_forget_bias
        if bias:  # the forget gate's prior; the returned logits are the gates' own (stats, inspector)
            half = logits.shape[-1] // 2
            logits = torch.cat((logits[..., :half], logits[..., half:] + bias), dim=-1)
        return _WriteUpdate.apply(logits, content, bank), logits, (logits, content, bank)

    def _write(self, bank: Tensor, scores: Tensor, token_values: Tensor, tokens: Tensor, read: Tensor):
        """The write from an explicit write-score matrix [B, h, c, N] (`scores(..., "write")`;
        eval.inspect replays the memory with it; None for the writes without scores). Same
        equations as the forward's SDPA write."""
        if self.write_mode == "attention":
            attn = _softmax(scores.transpose(-1, -2)).to(tokens.dtype)
            content = torch.einsum("bhnc,cbhe->bnhe", attn, token_values)
            content = content.reshape(bank.shape[0], self.num_slots, self.local_hidden)
            bank, logits, _ = self._gate_content(bank, content)
        else:
            bank, logits, _ = self._write_chunk(bank, None, None, token_values, tokens, read)
        g_in, g_forget = torch.sigmoid(logits).chunk(2, dim=-1)
        return bank, (g_in, g_forget)

    # ------------------------------------------------------------------------ statistics
    @torch.no_grad()
    def _record_gate_stats(self, out_logits: Tensor, write_logits: list) -> None:
        """Means of the gates over this forward (this rank's columns), for the step log."""
        stats = {"out": torch.sigmoid(out_logits.float()).mean()}
        if write_logits:
            halves = [torch.sigmoid(x.float()).chunk(2, dim=-1) for x in write_logits]
            stats["in"] = torch.stack([a.mean() for a, _ in halves]).mean()
            stats["forget"] = torch.stack([f.mean() for _, f in halves]).mean()
        self.gate_stats = stats

    # ----------------------------------------------------------------------- checkpoints
    _GATE_NAMES = ("linear_in_gate", "linear_forget_gate")

    @staticmethod
    def _split_gates(module, state_dict, prefix, local_metadata):
        """state_dict hook: the fused gate GEMM's tensors under the two gates' own names, as
        checkpoints and the HF converter (convert/mapping.py) know them."""
        for suffix in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}linear_gates.{suffix}", None)
            if fused is not None:
                for name, half in zip(LM2Memory._GATE_NAMES, fused.chunk(2, dim=0)):
                    state_dict[f"{prefix}{name}.{suffix}"] = half
        if f"{prefix}linear_gates._extra_state" in state_dict:
            extra = state_dict.pop(f"{prefix}linear_gates._extra_state")
            for name in LM2Memory._GATE_NAMES:
                state_dict[f"{prefix}{name}._extra_state"] = extra
        return state_dict

    def _fuse_gates(self, state_dict, prefix, *args):
        """load_state_dict pre-hook: the two gates' tensors back into the fused GEMM (or, from a
        dist checkpoint, the already fused tensor under the input gate's name)."""
        for suffix in ("weight", "bias"):
            names = [f"{prefix}{name}.{suffix}" for name in self._GATE_NAMES]
            first = state_dict.get(names[0])
            if names[1] not in state_dict and first is not None and first.shape[0] == 2 * self.local_hidden:
                state_dict[f"{prefix}linear_gates.{suffix}"] = state_dict.pop(names[0])
            elif all(n in state_dict for n in names):
                state_dict[f"{prefix}linear_gates.{suffix}"] = torch.cat(
                    [state_dict.pop(n) for n in names], dim=0
                )
        names = [f"{prefix}{name}._extra_state" for name in self._GATE_NAMES]
        if names[0] in state_dict:
            state_dict[f"{prefix}linear_gates._extra_state"] = state_dict.pop(names[0])
            state_dict.pop(names[1], None)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        sharded = {}
        for name, child in self.named_children():
            if name == "linear_gates":
                continue
            sharded.update(child.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        if hasattr(self, "linear_gates"):
            sharded.update(self._gates_sharded_state_dict(prefix, sharded_offsets, metadata))
        # The module's own tensors, TP-sharded: M_0 along the hidden axis, logit scales by head.
        own, axes = {}, {}
        if isinstance(self.initial_bank, torch.nn.Parameter):
            own["initial_bank"], axes["initial_bank"] = self.initial_bank, 1
        for name in self.config.memory_logit_scales:
            own[name], axes[name] = self._parameters[name], 0
        if own:
            sharded.update(make_sharded_tensors_for_checkpoint(own, prefix, axes, sharded_offsets))
        return sharded

    def _gates_sharded_state_dict(self, prefix, sharded_offsets, metadata) -> ShardedStateDict:
        """The fused gate GEMM checkpointed as the two gates, each TP-sharded on its rows, so
        checkpoints keep the layout of separate gates and reshard across TP sizes. A factory
        (as Megatron's SwiGLU fc1): it holds the parameter itself, so the distributed
        optimizer maps its states through the same split."""
        child = self.linear_gates.sharded_state_dict(f"{prefix}linear_gates.", sharded_offsets, metadata)
        result = {}
        for suffix in ("weight", "bias"):
            original = child.get(f"{prefix}linear_gates.{suffix}")
            if isinstance(original, ShardedTensor):
                # Under the input gate's state-dict name (what state_dict() calls the first half),
                # so code that loads `{k: loaded[k] for k in model.state_dict()}` finds it; on load
                # it holds both gates, which _fuse_gates recognises by its row count.
                result[f"{prefix}linear_in_gate.{suffix}"] = _split_gates_factory(original, sharded_offsets)
        extra = child.get(f"{prefix}linear_gates._extra_state")
        if isinstance(extra, ShardedObject):
            # TE's FP8 metadata: stored under the input gate's key (the old layout's name).
            extra.key = extra.key.replace("linear_gates._extra_state", "linear_in_gate._extra_state")
        if extra is not None:
            result[f"{prefix}linear_in_gate._extra_state"] = extra  # state_dict()'s name for it
        return result


def _split_gates_factory(original: ShardedTensor, sharded_offsets: tuple) -> ShardedTensorFactory:
    """This rank's fused [in rows; forget rows] as two ShardedTensors with the separate gates'
    keys (linear_in_gate.*, linear_forget_gate.*); merged back by concatenation on load."""
    axis = len(sharded_offsets)  # rows, after the prepended (layer-stacking) axes
    rank = original.global_offset[axis] // original.local_shape[0]
    fragments = original.axis_fragmentations[axis]

    @torch.no_grad()
    def build(key, tensor, replica_id, flattened_range):
        return [
            ShardedTensor.from_rank_offsets(
                key.replace("linear_gates.", f"{name}."), half, *sharded_offsets,
                (axis, rank, fragments), replica_id=replica_id, prepend_axis_num=axis,
            )
            for name, half in zip(LM2Memory._GATE_NAMES, torch.chunk(tensor, 2, dim=0))
        ]

    def merge(halves):
        with torch.no_grad():
            return torch.cat(halves)

    return ShardedTensorFactory(
        original.key, original.data, build, merge, original.replica_id,
        flattened_range=original.flattened_range,
    )
