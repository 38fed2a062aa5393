"""Parameter and FLOP accounting from an LM2Config alone (no model built).

`num_parameters` must equal the parameters of the model build_model creates (a test builds
every flavor on the meta device and compares). `flops_per_token` is what the step log's
TFLOP/s and MFU and `lm2-flavors` use: the FLOPs the kernels of one training step execute
(tests/test_flops.py checks it against torch's FlopCounterMode over a real forward+backward):

- GEMMs: 2mnk forward; backward = data gradient + weight gradient (2x forward), only the weight
  gradient where the input needs no gradient (a bank detached by memory_bptt_chunks).
- Memory attention (read and write, scaled_dot_product_attention): 4 L_q L_k d_h per head
  forward; the flash / memory-efficient backward recomputes the scores: 2.5x forward.
- Self-attention core, by kernel: "local" (Megatron's DotProductAttention, CPU): both bmm's
  over all S keys (the causal mask or window is applied after them), backward 2x; "te"
  (Transformer Engine's causal flash attention, the GPU default): the (S+1)/2 keys the causal
  mask keeps on average, backward 2.5x (block-tiled kernels compute a little more on the
  diagonal; not counted); the local spec's SDPA on CUDA counts as "te" with the plain causal
  mask and as "sdpa_masked" (all S keys, backward 2.5x) with the window's mask
  (executed_attention_kernel).
- The memory as training runs it: chunk j's keys/values need a GEMM for j >= 1 (chunk 0's
  come from the weights: identity M_0, or one GEMM per micro-batch: learned M_0, and
  identity-signs with N > d), and the
  last chunk is not written (no later chunk reads it).
- Not counted: elementwise work (norms, gates, softmax, RoPE, loss), communication.
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
    """One memory module: its norm, Q, fused K/V, out/in/forget gates, projection (7 d^2), and
    a learned M_0 or qk-norm logit scales where configured."""
    d = config.hidden_size
    params = d + 7 * d * d
    if config.add_bias_linear:
        params += 7 * d
    if config.memory_init == "learned":
        params += config.memory_slots * d
    params += config.memory_heads * len(config.memory_logit_scales)  # qk-norm: a scale per head
    return params


def num_parameters(config: LM2Config) -> ParameterCount:
    embedding = config.vocab_size * config.hidden_size
    if not config.tie_embeddings:
        embedding *= 2
    decoder = config.num_layers * block_parameters(config) + config.hidden_size  # + final norm
    memory = len(config.memory_layer_numbers) * memory_parameters(config) if config.has_memory else 0
    return ParameterCount(embedding=embedding, decoder=decoder, memory=memory)


ATTENTION_KERNELS = ("te", "local", "sdpa_masked")
SDPA_BACKWARD = 2.5  # flash backward: scores recomputed, then dV, dP, dQ, dK


def executed_attention_kernel(backend: str, cuda: bool, config: LM2Config) -> str:
    """The self-attention kernel a training step runs: TE's causal flash attention; on CUDA the
    local spec's SDPA (attention.py), flash ("te"'s count) for the plain causal mask and the
    memory-efficient kernel over all keys for the window's mask ("sdpa_masked"); on CPU
    megatron-core's unfused path ("local")."""
    from megatron_lm2.attention import sdpa_enabled

    if backend == "te":
        return "te"
    if cuda and sdpa_enabled():
        window = config.attention_window
        return "sdpa_masked" if window is not None and window < config.seq_length else "te"
    return "local"


def _memory_flops(config: LM2Config, seq_length: int, micro_batch_size: int) -> tuple[float, float]:
    """(forward, backward) FLOPs per token of one memory layer in a training step."""
    d, n, c = config.hidden_size, config.memory_slots, config.memory_chunk_size
    chunks = -(-seq_length // c)
    written = chunks - 1  # the last chunk's write is skipped in training
    gemm = 6 * d * d * seq_length  # linear_q, linear_out_gate, linear_proj on every token
    kv_forward = written * 4 * n * d * d  # K/V GEMMs on the banks of chunks 1..
    if not config.memory_initial_is_identity:
        kv_forward += 4 * n * d * d / micro_batch_size  # chunk 0: one GEMM on M_0 per micro-batch
    attention = 4 * n * d * seq_length  # the read: every token over N slots
    if config.memory_write == "attention":
        write_gemm, write_attention = 4 * n * d * d, 4 * n * c * d  # gates on N slots; slots over C tokens
    else:
        write_gemm, write_attention = 4 * c * d * d, 0  # in/forget gates on the chunk's tokens and reads
    gemm += written * write_gemm
    attention += written * write_attention
    forward = gemm + kv_forward + attention
    backward = 2 * (gemm + kv_forward) + SDPA_BACKWARD * attention
    # Truncated backprop (memory_bptt_chunks = k): the write that makes a detached bank gets no
    # gradient, so autograd never runs its backward. (The detached bank's K/V GEMM still runs
    # its data gradient: Megatron's linear computes it whether or not the input needs it.)
    bptt = config.memory_bptt_chunks
    cut = sum(1 for j in range(1, chunks) if bptt is not None and j % bptt == 0)
    backward -= cut * (2 * write_gemm + SDPA_BACKWARD * write_attention)
    return forward / seq_length, backward / seq_length


def memory_flops_per_token(config: LM2Config, seq_length: int | None = None,
                           micro_batch_size: int = 1) -> float:
    """Forward FLOPs per token of one memory layer, as a training step executes them (see the
    module docstring); flops_per_token adds the backward."""
    return _memory_flops(config, seq_length or config.seq_length, micro_batch_size)[0]


def attention_core_flops_per_token(config: LM2Config, seq_length: int | None = None,
                                   kernel: str = "te") -> float:
    """Self-attention score and context FLOPs per token of one layer, forward + backward."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {ATTENTION_KERNELS}")
    seq = seq_length or config.seq_length
    per_key = 4 * config.num_attention_heads * _kv_channels(config)
    if kernel == "local":
        return 3.0 * per_key * seq
    if kernel == "sdpa_masked":  # every key computed, the mask applied inside the kernel
        return (1.0 + SDPA_BACKWARD) * per_key * seq
    window = min(config.attention_window or seq, seq)
    return (1.0 + SDPA_BACKWARD) * per_key * (window + 1) / 2


def flops_per_token(config: LM2Config, seq_length: int | None = None, *, kernel: str = "te",
                    micro_batch_size: int = 1) -> float:
    """Training FLOPs (forward + backward) per token, as executed (module docstring). `kernel`:
    the self-attention kernel, "te" (GPU training, the default) or "local"; micro_batch_size
    matters only where M_0 is not the identity (learned, or identity-signs with N > d: its keys
    are one GEMM per micro-batch)."""
    seq = seq_length or config.seq_length
    d = config.hidden_size
    block_matmul = block_parameters(config) - 2 * d  # weights only (norms are not matmuls)
    total = config.num_layers * (6.0 * block_matmul + attention_core_flops_per_token(config, seq, kernel))
    if config.has_memory:
        forward, backward = _memory_flops(config, seq, micro_batch_size)
        total += len(config.memory_layer_numbers) * (forward + backward)
    total += 6.0 * d * config.vocab_size  # output logits
    return total


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
