"""LM2 (Kang et al. 2025, arXiv 2502.06049) for Hugging Face transformers, as megatron-lm2 trains it.

A Llama-3 decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases) where the blocks
named in `config.memory_layers` add a memory branch after self-attention:

    h = x + SelfAttention(norm(x))
    h = h + Memory(memory_norm(h))          # LM2 blocks only
    y = h + SwiGLU(post_attention_layernorm(h))

Memory (one bank M of N slots x d per block and sequence). The stream of tokens is cut into
chunks of C = `memory_chunk_size` tokens counted from the start of the sequence. Tokens of chunk
j read the bank as it stood after chunk j-1 (chunk 0 reads M_0); once chunk j is complete the
bank is written from its C tokens:

    read   E_mem = softmax(Q K^T / sqrt(d_h)) V,  Q = E W_q,  K = M W_k,  V = M W_v  (H_m heads)
           out   = W_o (sigmoid(E_mem W_out) * E_mem)
    write  'attention': U = slots attend over the chunk (the read's scores soft-maxed over tokens)
                        M <- sigmoid(U W_in) * tanh(U) + sigmoid(U W_forget) * M
           'token'    : slot i <- token i (N = C), no scores
                        M <- sigmoid(E W_in) * tanh(E) + sigmoid(E W_forget) * M
           'aligned'  : slot i <- token i (N = C)
                        M <- sigmoid(E W_in) * tanh(E_mem) + sigmoid(E_mem W_forget) * M
           every forget gate's logits plus the constant b = `memory_forget_bias` (0 by default);
           with `memory_write_shift` k the attention and token writes take, for E, each token of
           the chunk plus the k tokens before it in the chunk (E_i + ... + E_(i-k))
    M_0    slot i = e_i (zeros past d); 'identity-signs': slots past d are fixed +-1/sqrt(d) rows;
           'learned': a parameter

Self-attention is causal; with `attention_window` W it is causal inside segments of W tokens and
blocked across segments, so the KV cache never holds more than W tokens.

Generation: `LM2Cache` holds the KV cache inside the window, the memory banks and the tokens of
the chunk being filled; `generate()` carries it from step to step. With a cache, a long prompt
is consumed `prefill_piece_size` tokens at a time (streaming prefill). `reset_memory`,
`memory_banks` and `load_memory_banks` on the model reset, save and restore banks.

This file is copied next to exported weights and loaded with trust_remote_code=True: it imports
only torch, transformers and the standard library.
"""

import functools
import math
import random

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_lm2 import LM2Config

_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5
# transformers >= 5.24 names the cache `cache` (in generate(), in forward() and in model
# outputs); earlier releases name it `past_key_values`. Both are accepted on the way in; outputs
# carry it under the installed release's name.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`")
    return cache if cache is not None else past_key_values


def _rms(x, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) over the head dimension, the mean in at least fp32."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def identity_bank(num_slots, hidden_size, dtype=torch.float32, device=None):
    """The paper's M_0: slot i is the unit vector e_i for i < min(N, d), zeros after. [N, d]"""
    bank = torch.zeros(num_slots, hidden_size, dtype=dtype, device=device)
    n = min(num_slots, hidden_size)
    bank[torch.arange(n), torch.arange(n)] = 1.0
    return bank


def initial_bank(mode, num_slots, hidden_size, dtype=torch.float32, device=None):
    """M_0 of `memory_init`: the identity, except that "identity-signs" gives slots i >= d rows
    of +-1/sqrt(d) from Python's Mersenne Twister seeded 0x4C4D32 (bit r*d + c of one
    getrandbits draw is 1 for +), where the identity leaves zeros."""
    bank = identity_bank(num_slots, hidden_size, dtype=dtype, device=device)
    if mode == "identity-signs" and num_slots > hidden_size:
        bank[hidden_size:] = _sign_rows(num_slots - hidden_size, hidden_size).to(dtype=dtype, device=device)
    return bank


@functools.lru_cache(maxsize=8)
def _sign_rows(rows, hidden_size):
    n = rows * hidden_size
    raw = random.Random(0x4C4D32).getrandbits(n).to_bytes((n + 7) // 8, "little")
    bits = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    bits = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[:n]
    return (bits.to(torch.float64) * 2 - 1).view(rows, hidden_size) / math.sqrt(hidden_size)


# --------------------------------------------------------------------------------- cache
class _MemoryState:
    """One memory layer's state: its bank [B, N, d] and the pieces of the chunk being filled
    (queries, normed tokens, reads), kept until the chunk completes and is written."""

    def __init__(self, bank):
        self.bank = bank
        self.queries, self.tokens, self.reads = [], [], []
        self.fill = 0

    def clear_chunk(self):
        self.queries, self.tokens, self.reads = [], [], []
        self.fill = 0

    def map_tensors(self, fn):
        self.bank = fn(self.bank)
        self.queries = [fn(t) for t in self.queries]
        self.tokens = [fn(t) for t in self.tokens]
        self.reads = [fn(t) for t in self.reads]


# transformers 4.x generate() reads any cache that is not a `Cache` as a legacy tuple of
# tensors (cache[0][0]); 5.x duck-types caches and must not see 4.x Cache's machinery.
_CacheBase = object if _TRANSFORMERS_V5 else transformers.cache_utils.Cache


class LM2Cache(_CacheBase):
    """Streaming state of an LM2 model: the KV cache of the current attention segment (all
    tokens without a window), the memory banks and the partial memory chunk. `generate()`
    creates one; pass it back as `past_key_values` (or `cache`, transformers >= 5.24) with the
    full token sequence as input_ids to continue a stream. `copy()` snapshots it."""

    is_compileable = False
    is_croppable = False  # the banks are a recurrent state: no rollback (assisted decoding)
    # transformers >= 5.24 asks whether every layer is a linear-attention (recurrent-only)
    # state; ours also holds a KV cache, so generate() may count the tokens it has seen.
    is_linear = (False,)
    seen_tokens = 0  # shadows 4.x Cache's read-only `seen_tokens` property; set per instance

    def __init__(self):
        super().__init__()
        self.seen_tokens = 0
        self.key_cache = {}  # layer index -> [B, G, S, d_h] (RoPE applied)
        self.value_cache = {}
        self.key_positions = None  # [S] absolute positions of the cached keys
        self.memory = {}  # 1-based layer number -> _MemoryState

    def get_seq_length(self, layer_idx=0):
        return self.seen_tokens

    def get_max_cache_shape(self):
        return None

    def memory_banks(self):
        """{layer_number: bank [B, N, d]} as they stand now (the banks themselves, not copies)."""
        return {number: state.bank for number, state in sorted(self.memory.items())}

    def copy(self):
        """An independent snapshot (tensors detached and cloned)."""
        snapshot = LM2Cache()
        snapshot.seen_tokens = self.seen_tokens
        snapshot.key_cache, snapshot.value_cache = dict(self.key_cache), dict(self.value_cache)
        if self.key_positions is not None:
            snapshot.key_positions = self.key_positions.clone()
        for number, state in self.memory.items():
            copied = _MemoryState(state.bank)
            copied.queries, copied.tokens, copied.reads = list(state.queries), list(state.tokens), list(state.reads)
            copied.fill = state.fill
            snapshot.memory[number] = copied
        snapshot._map(lambda t: t.detach().clone())
        return snapshot

    def _map(self, fn):
        self.key_cache = {i: fn(t) for i, t in self.key_cache.items()}
        self.value_cache = {i: fn(t) for i, t in self.value_cache.items()}
        for state in self.memory.values():
            state.map_tensors(fn)

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices])


# ------------------------------------------------------------------------------- modules
class LM2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(positions, head_dim, theta, dtype):
    """RoPE tables for absolute positions [T] -> cos, sin [T, d_h] (non-interleaved halves)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    )
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


class LM2Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past_k = cache.key_cache.get(self.layer_idx)
        if past_k is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((cache.value_cache[self.layer_idx], v), dim=2)
        cache.key_cache[self.layer_idx], cache.value_cache[self.layer_idx] = k, v
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class LM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, ffn = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LM2MemoryBlock(nn.Module):
    """Read (Eq. 1-3) every token, gated write (Eq. 4-6) once per complete chunk."""

    def __init__(self, config, layer_number):
        super().__init__()
        self.layer_number = layer_number
        d = config.hidden_size
        self.hidden_size = d
        self.num_slots = config.memory_slots
        self.num_heads = config.memory_heads
        self.head_dim = d // config.memory_heads
        self.chunk_size = config.memory_chunk_size
        self.write_mode = config.memory_write
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_gate = nn.Linear(d, d, bias=False)
        self.in_gate = nn.Linear(d, d, bias=False)
        self.forget_gate = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.memory_init = getattr(config, "memory_init", "identity")
        if self.memory_init == "learned":
            self.initial_bank = nn.Parameter(identity_bank(self.num_slots, d))
        else:
            self.initial_bank = None
        self.qk_norm = config.memory_scores == "qknorm"
        self.logit_scale_init = config.memory_logit_scale
        self.forget_bias = float(getattr(config, "memory_forget_bias", 0.0))  # configs exported before it: 0
        self.write_shift = int(getattr(config, "memory_write_shift", 0))  # likewise
        if self.qk_norm:
            self.read_logit_scale = nn.Parameter(torch.full((self.num_heads,), self.logit_scale_init))
            if self.write_mode == "attention":
                self.write_logit_scale = nn.Parameter(torch.full((self.num_heads,), self.logit_scale_init))

    def start_bank(self, batch_size, dtype, device):
        if self.initial_bank is not None:
            bank = self.initial_bank.to(dtype)
        else:
            bank = initial_bank(self.memory_init, self.num_slots, self.hidden_size, dtype=dtype, device=device)
        return bank.unsqueeze(0).expand(batch_size, -1, -1)

    def _scores(self, queries, bank, scale=None):
        """Scores [B, H_m, c, N] of queries [B, c, H_m, d_h] against the bank: Q K^T / sqrt(d_h),
        or with qk-norm the cosine of the RMS-normalised query and key times scale[h]."""
        keys = self.k_proj(bank).view(bank.shape[0], self.num_slots, self.num_heads, self.head_dim)
        if not self.qk_norm:
            return torch.einsum("bchd,bnhd->bhcn", queries, keys) / math.sqrt(self.head_dim)
        cosine = torch.einsum("bchd,bnhd->bhcn", _rms(queries), _rms(keys)) / self.head_dim
        return cosine * scale.to(cosine.dtype).view(1, -1, 1, 1)

    def _read(self, queries, bank):
        values = self.v_proj(bank).view(bank.shape[0], self.num_slots, self.num_heads, self.head_dim)
        scores = self._scores(queries, bank, self.read_logit_scale if self.qk_norm else None)
        attn = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        return torch.einsum("bhcn,bnhd->bchd", attn, values)  # Eq. 1

    def _write(self, bank, queries, tokens, reads):
        """Eq. 4-6 for one complete chunk: M <- g_in * tanh(U) + g_forget * M."""
        batch = bank.shape[0]
        if self.write_shift and self.write_mode != "aligned":
            # Each token plus the write_shift tokens before it in this chunk: a value with its key.
            tokens = tokens + sum(F.pad(tokens[:, :-k], (0, 0, k, 0)) for k in range(1, self.write_shift + 1))
        if self.write_mode == "attention":
            scores = self._scores(queries, bank, self.write_logit_scale if self.qk_norm else None)
            attn = torch.softmax(scores.transpose(-1, -2).float(), dim=-1).to(tokens.dtype)
            per_head = tokens.view(batch, -1, self.num_heads, self.head_dim)
            content = torch.einsum("bhnc,bchd->bnhd", attn, per_head)
            content = content.reshape(batch, self.num_slots, self.hidden_size)
            g_in = torch.sigmoid(self.in_gate(content))
            g_forget = torch.sigmoid(self.forget_gate(content) + self.forget_bias)
        elif self.write_mode == "token":  # slot i <- token i, both gates from the token
            content = tokens
            g_in = torch.sigmoid(self.in_gate(tokens))
            g_forget = torch.sigmoid(self.forget_gate(tokens) + self.forget_bias)
        else:  # aligned
            content = reads
            g_in = torch.sigmoid(self.in_gate(tokens))
            g_forget = torch.sigmoid(self.forget_gate(reads) + self.forget_bias)
        return g_in * torch.tanh(content) + g_forget * bank

    def forward(self, tokens, state):
        batch, length, d = tokens.shape
        queries = self.q_proj(tokens).view(batch, length, self.num_heads, self.head_dim)
        reads, start = [], 0
        while start < length:
            end = start + min(self.chunk_size - state.fill, length - start)
            read = self._read(queries[:, start:end], state.bank).reshape(batch, end - start, d)
            reads.append(read)
            state.queries.append(queries[:, start:end])
            state.tokens.append(tokens[:, start:end])
            state.reads.append(read)
            state.fill += end - start
            if state.fill == self.chunk_size:
                state.bank = self._write(
                    state.bank,
                    torch.cat(state.queries, dim=1),
                    torch.cat(state.tokens, dim=1),
                    torch.cat(state.reads, dim=1),
                )
                state.clear_chunk()
            start = end
        e_mem = torch.cat(reads, dim=1)
        g_out = torch.sigmoid(self.out_gate(e_mem))  # Eq. 2
        return self.o_proj(g_out * e_mem)  # Eq. 3


class LM2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_number = layer_idx + 1
        self.input_layernorm = LM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LM2Attention(config, layer_idx)
        if self.layer_number in config.memory_layer_numbers:
            self.memory_norm = LM2RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.memory = LM2MemoryBlock(config, self.layer_number)
        else:
            self.memory_norm = self.memory = None
        self.post_attention_layernorm = LM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LM2MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        if self.memory is not None:
            h = h + self.memory(self.memory_norm(h), cache.memory[self.layer_number])
        return h + self.mlp(self.post_attention_layernorm(h))


# -------------------------------------------------------------------------------- models
class LM2PreTrainedModel(PreTrainedModel):
    config_class = LM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LM2DecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4.x: generate() may be handed an LM2Cache

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, LM2RMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, LM2MemoryBlock):
            if module.initial_bank is not None:
                module.initial_bank.data.copy_(identity_bank(module.num_slots, module.hidden_size))
            for name in ("read_logit_scale", "write_logit_scale"):
                if hasattr(module, name):
                    getattr(module, name).data.fill_(module.logit_scale_init)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # the model makes its own LM2Cache (KV + memory banks)


def _check_no_padding(attention_mask):
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "LM2 does not support padded batches: a padding token would be written into the "
            "memory bank. Generate prompts of unequal length one at a time (or batch prompts "
            "of equal length)."
        )


class LM2Model(LM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._start_banks = None  # banks a fresh stream starts from (load_memory_banks)
        self._remember(None)  # the cache of the last forward, for memory_banks()
        self.post_init()

    def _remember(self, cache):
        # In __dict__, not nn.Module's registry: under transformers 4.x an LM2Cache is an
        # nn.Module and would otherwise become a submodule of the model.
        self.__dict__["_last_cache"] = cache

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def memory_blocks(self):
        return {layer.layer_number: layer.memory for layer in self.layers if layer.memory is not None}

    # ----------------------------------------------------------------------- memory state
    def _init_memory(self, cache, batch_size, dtype, device):
        for number, block in self.memory_blocks().items():
            if self._start_banks is not None and number in self._start_banks:
                bank = self._start_banks[number].to(device=device, dtype=dtype)
                if bank.shape[0] != batch_size:
                    if bank.shape[0] != 1:
                        raise ValueError(
                            f"layer {number}: loaded memory bank has batch size {bank.shape[0]} "
                            f"but the input has {batch_size}"
                        )
                    bank = bank.expand(batch_size, -1, -1)
            else:
                bank = block.start_bank(batch_size, dtype, device)
            cache.memory[number] = _MemoryState(bank)

    # --------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        return_dict=None,
        cache=None,
        **kwargs,
    ):
        """`position_ids` are ignored: positions count from the start of the stream, as the
        KV cache and the memory chunks do (RoPE only sees relative positions)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        _check_no_padding(attention_mask)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length, _ = inputs_embeds.shape
        cache = _one_cache(cache, past_key_values)
        cache = cache if cache is not None else LM2Cache()
        if not isinstance(cache, LM2Cache):
            raise TypeError(f"the cache must be an LM2Cache, got {type(cache).__name__}")
        if not cache.memory and cache.seen_tokens == 0:
            self._init_memory(cache, batch, inputs_embeds.dtype, inputs_embeds.device)

        # Streaming prefill: with a cache, cut the input at multiples of the piece size
        # (counted from the start of the stream) so attention scores stay [piece, window].
        piece = self.config.prefill_piece_size or self.config.memory_chunk_size
        if not use_cache:
            piece = max(length, 1)
        hidden, start = [], 0
        while start < length:
            end = start + min(length - start, piece - cache.seen_tokens % piece)
            hidden.append(self._forward_piece(inputs_embeds[:, start:end], cache))
            start = end
        self._remember(cache)
        return BaseModelOutputWithPast(
            last_hidden_state=torch.cat(hidden, dim=1), **{_CACHE_FIELD: cache if use_cache else None}
        )

    def _forward_piece(self, x, cache):
        length = x.shape[1]
        device = x.device
        positions = torch.arange(cache.seen_tokens, cache.seen_tokens + length, device=device)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        past = cache.key_positions
        key_positions = positions if past is None else torch.cat((past.to(device), positions))
        window = self.config.attention_window
        mask, is_causal = None, False
        if past is None and window is None:
            is_causal = length > 1
        elif window is not None or length > 1:
            allowed = key_positions[None, :] <= positions[:, None]
            if window is not None:
                allowed &= (key_positions[None, :] // window) == (positions[:, None] // window)
            mask = allowed
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, cache)
        cache.seen_tokens += length
        cache.key_positions = key_positions
        if window is not None:  # keep only the current segment's keys
            keep = (key_positions // window) == (positions[-1] // window)
            if not bool(keep.all()):
                cache.key_positions = key_positions[keep]
                cache.key_cache = {i: t[:, :, keep] for i, t in cache.key_cache.items()}
                cache.value_cache = {i: t[:, :, keep] for i, t in cache.value_cache.items()}
        return self.norm(x)


class LM2ForCausalLM(LM2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_V5 else ["lm_head.weight"]
    )

    def __init__(self, config):
        super().__init__(config)
        self.model = LM2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ------------------------------------------------------------------------ memory API
    def reset_memory(self):
        """Forget loaded banks and the last stream: the next fresh stream starts from M_0."""
        self.model._start_banks = None
        self.model._remember(None)

    def memory_banks(self, cache=None):
        """Copies of the banks {layer_number: [B, N, d]} of `cache`, or of the stream of the
        last forward / generate() call. Save them with safetensors; restore them with
        load_memory_banks."""
        cache = cache if cache is not None else self.model._last_cache
        if cache is None:
            return {}
        return {number: bank.detach().clone() for number, bank in cache.memory_banks().items()}

    def load_memory_banks(self, banks):
        """Every fresh stream (a forward or generate() without past_key_values) starts from
        these banks instead of M_0, as megatron_lm2.memory_state.load_memory_banks does."""
        blocks = self.model.memory_blocks()
        unknown = sorted(set(banks) - set(blocks))
        if unknown:
            raise KeyError(f"no memory layer with number(s) {unknown}; memory layers: {sorted(blocks)}")
        checked = {}
        for number, bank in banks.items():
            expected = (blocks[number].num_slots, blocks[number].hidden_size)
            if bank.dim() == 2:
                bank = bank.unsqueeze(0)
            if bank.dim() != 3 or tuple(bank.shape[1:]) != expected:
                raise ValueError(
                    f"layer {number}: bank shape {tuple(bank.shape)} does not match "
                    f"[B, {expected[0]}, {expected[1]}]"
                )
            checked[int(number)] = bank.detach()
        self.model._start_banks = checked

    # --------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        return_dict=None,
        cache=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        cache_out = {_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_out)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        attention_mask=None,
        inputs_embeds=None,
        use_cache=True,
        logits_to_keep=None,
        cache=None,
        **kwargs,
    ):
        """input_ids is the whole sequence so far; feed only what the cache has not seen."""
        _check_no_padding(attention_mask)
        past_key_values = _one_cache(cache, past_key_values)
        inputs = {_CACHE_FIELD: past_key_values, "use_cache": use_cache}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        if past_key_values is None or past_key_values.seen_tokens == 0:
            if inputs_embeds is not None:
                inputs["inputs_embeds"] = inputs_embeds
                return inputs
            inputs["input_ids"] = input_ids
            return inputs
        seen = past_key_values.seen_tokens
        if input_ids.shape[1] <= seen:
            raise ValueError(
                f"the cache has seen {seen} tokens but input_ids has {input_ids.shape[1]}: pass "
                f"the whole sequence (cached tokens and new ones) as input_ids"
            )
        inputs["input_ids"] = input_ids[:, seen:]
        return inputs
