"""LM2Config for Hugging Face transformers: a Llama-3 decoder plus the LM2 memory knobs.

This file is copied next to the weights of every exported LM2 model and loaded with
`trust_remote_code=True`, so it imports only torch and transformers. Its memory knobs (the
__init__ defaults and CHOICES) are therefore a copy of the declaration in megatron_lm2/config.py
(LM2Config, hf=True); tests/test_model_fields.py checks that the two agree field by field.
"""

from transformers import PretrainedConfig

MEMORY_WRITE_MODES = ("attention", "token", "aligned")
MEMORY_INIT_MODES = ("identity", "learned", "identity-signs")
MEMORY_SCORE_MODES = ("dot", "qknorm")
CHOICES = {"memory_write": MEMORY_WRITE_MODES, "memory_init": MEMORY_INIT_MODES,
           "memory_scores": MEMORY_SCORE_MODES}


class LM2Config(PretrainedConfig):
    """Field names follow LlamaConfig where the meaning is the same.

    memory_layers: 1-based numbers of the decoder blocks that carry a memory bank (as in
        megatron_lm2.config.LM2Config); None = every block, [] = none.
    memory_chunk_size: tokens per memory chunk; the bank is written once per complete chunk and
        tokens of chunk j read the bank as it stood after chunk j-1.
    attention_window: None = causal attention over the whole sequence; W = causal attention
        inside segments of W tokens, blocked across them (the memory carries what crosses).
    memory_scores: 'dot' = Q K^T / sqrt(d_h); 'qknorm' = the cosine of RMS-normalised queries
        and slot keys times a learned per-head scale (read_logit_scale, and write_logit_scale
        for the attention write), initialised to memory_logit_scale.
    memory_forget_bias: a constant added to the forget gate's logits (0 = the paper's gate).
    memory_write_shift: k; the attention and token writes take each token plus the k tokens before
        it in its chunk (0 = the token alone).
    prefill_piece_size: with a cache, a prompt longer than this is consumed in pieces of this
        many tokens (streaming prefill); None = memory_chunk_size. (Not named
        prefill_chunk_size: generate() would take that for its own chunked prefill.)
    """

    model_type = "lm2"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_cache=True,
        memory_slots=2048,
        memory_heads=8,
        memory_chunk_size=1024,
        memory_write="attention",
        memory_init="identity",
        memory_layers=None,
        attention_window=None,
        prefill_piece_size=None,
        memory_scores="dot",
        memory_logit_scale=10.0,
        memory_forget_bias=0.0,
        memory_write_shift=0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float(rope_theta)
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.memory_slots = memory_slots
        self.memory_heads = memory_heads
        self.memory_chunk_size = memory_chunk_size
        self.memory_write = memory_write
        self.memory_init = memory_init
        self.memory_scores = memory_scores
        self.memory_logit_scale = float(memory_logit_scale)
        self.memory_forget_bias = float(memory_forget_bias)
        self.memory_write_shift = int(memory_write_shift)
        self.memory_layers = None if memory_layers is None else sorted(int(n) for n in memory_layers)
        self.attention_window = attention_window
        self.prefill_piece_size = prefill_piece_size
        self._validate_lm2()
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @property
    def memory_layer_numbers(self):
        if self.memory_layers is None:
            return list(range(1, self.num_hidden_layers + 1))
        return list(self.memory_layers)

    def _validate_lm2(self):
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: LM2 uses SwiGLU ('silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        bad = [n for n in self.memory_layer_numbers if not 1 <= n <= self.num_hidden_layers]
        if bad:
            raise ValueError(f"memory_layers {bad} outside 1..{self.num_hidden_layers} (1-based)")
        if not self.memory_layer_numbers:
            return
        if self.memory_write not in MEMORY_WRITE_MODES:
            raise ValueError(f"memory_write={self.memory_write!r}: expected one of {MEMORY_WRITE_MODES}")
        if self.memory_init not in MEMORY_INIT_MODES:
            raise ValueError(f"memory_init={self.memory_init!r}: expected one of {MEMORY_INIT_MODES}")
        if self.memory_scores not in MEMORY_SCORE_MODES:
            raise ValueError(f"memory_scores={self.memory_scores!r}: expected one of {MEMORY_SCORE_MODES}")
        if self.hidden_size % self.memory_heads:
            raise ValueError(
                f"memory_heads={self.memory_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.memory_write in ("aligned", "token") and self.memory_slots != self.memory_chunk_size:
            raise ValueError(
                f"memory_write={self.memory_write!r} needs memory_slots ({self.memory_slots}) == "
                f"memory_chunk_size ({self.memory_chunk_size})"
            )
