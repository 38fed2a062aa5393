"""Parameter and FLOP accounting from an LM2Config alone (no model built).

`num_parameters` must equal the parameters of the model build_model creates (a test builds
every flavor on the meta device and compares). `flops_per_token` is what the step log's
TFLOP/s and MFU use: matmul FLOPs, forward + backward (3x forward), memory read and write
counted, attention over the full window (no causal halving, as Megatron-LM counts).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lm2.config import LM2Config


@dataclass(frozen=True)
class ParameterCount:
    embedding: int  # input embedding (+ output layer when untied)
    decoder: int  # the Llama blocks and final norm, without memory
    memory: int  # all memory modules and their norms

    @property
    def base(self) -> int:
        return self.embedding + self.decoder

    @property
    def total(self) -> int:
        return self.base + self.memory

    def as_dict(self) -> dict:
        return dict(base=self.base, memory=self.memory, total=self.total,
                    embedding=self.embedding, decoder=self.decoder)


def _kv_channels(config: LM2Config) -> int:
    return config.kv_channels or config.hidden_size // config.num_attention_heads


def block_parameters(config: LM2Config) -> int:
    """One Llama block (no memory): norms, fused QKV with GQA, output projection, SwiGLU MLP."""
    d, dh = config.hidden_size, _kv_channels(config)
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    ffn = config.ffn_hidden_size
    bias = config.add_bias_linear
    qkv_out = (heads + 2 * groups) * dh
    fc1_out = 2 * ffn if config.gated_linear_unit else ffn
    params = 2 * d  # input and pre-MLP norms
    params += d * qkv_out + (qkv_out if (bias or config.add_qkv_bias) else 0)
    params += heads * dh * d + (d if bias else 0)
    params += d * fc1_out + (fc1_out if bias else 0)
    params += ffn * d + (d if bias else 0)
    return params


def memory_parameters(config: LM2Config) -> int:
    """One memory module: its norm, Q, fused K/V, out/in/forget gates, projection (7 d^2)."""
    d = config.hidden_size
    params = d + 7 * d * d
    if config.add_bias_linear:
        params += 7 * d
    if config.memory_init == "learned":
        params += config.memory_slots * d
    return params


def num_parameters(config: LM2Config) -> ParameterCount:
    embedding = config.vocab_size * config.hidden_size
    if not config.tie_embeddings:
        embedding *= 2
    decoder = config.num_layers * block_parameters(config) + config.hidden_size  # + final norm
    memory = len(config.memory_layer_numbers) * memory_parameters(config) if config.has_memory else 0
    return ParameterCount(embedding=embedding, decoder=decoder, memory=memory)


def memory_flops_per_token(config: LM2Config) -> float:
    """Forward FLOPs per token of one memory layer.

    Token side: Q, output gate, projection (3 x 2d^2); read attention 4Nd; write gather 2Nd.
    Bank side, once per chunk of C tokens: K/V of N slots (4Nd^2) and, for the attention
    write, the two gates on N slots (4Nd^2); per token that is divided by C. The aligned
    write's gates act on the C tokens instead (4d^2 per token).
    """
    d, n, c = config.hidden_size, config.memory_slots, config.memory_chunk_size
    flops = 6 * d * d + 4 * n * d + 2 * n * d + 4 * n * d * d / c
    flops += 4 * n * d * d / c if config.memory_write == "attention" else 4 * d * d
    return flops


def flops_per_token(config: LM2Config, seq_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token."""
    seq = seq_length or config.seq_length
    window = min(config.attention_window or seq, seq)
    d, dh = config.hidden_size, _kv_channels(config)
    block_matmul = block_parameters(config) - 2 * d  # weights only (norms are not matmuls)
    attention = 4 * window * config.num_attention_heads * dh  # QK^T and AV
    forward = config.num_layers * (2 * block_matmul + attention)
    if config.has_memory:
        forward += len(config.memory_layer_numbers) * memory_flops_per_token(config)
    forward += 2 * d * config.vocab_size  # output logits
    return 3.0 * forward


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
