"""LM2Config: Megatron-core's TransformerConfig plus the memory knobs and the few model-level
facts (vocabulary, sequence length, embeddings) that GPTModel takes as arguments.

One config object describes a model; flavors (flavors.py) build them; the trainer overrides
fields from its flags. Invalid combinations fail here, naming the knob and the values.

The model's fields are declared once, here: each of LM2Config's own knobs with its type, default
and `knob(...)` metadata (help, choices, whether lm2-train has a flag for it, whether the
exported Hugging Face config has it), and the architecture fields megatron-core declares in
MEGATRON_KNOBS. MODEL_FIELDS lists them all; lm2-train's model flags, the checkpoint's
lm2_config.json and the converter's field lists are derived from it. (The exported HF config,
convert/hf_lm2/configuration_lm2.py, must stand alone and keeps a copy; a test compares them.)
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lm2.cli_errors import UserInputError

# attention: slots gather the chunk by the read's scores; token: slot i <- token i (N = C), no
# scores; aligned: the paper's equations literally (N = C). docs/memory.md.
MEMORY_WRITE_MODES = ("attention", "token", "aligned")
MEMORY_INIT_MODES = ("identity", "learned", "identity-signs")
# dot: Q K^T / sqrt(d_h); qknorm: every head's queries and slot keys RMS-normalised, the score
# their cosine times a learned per-head logit scale (one for the read, one for the attention
# write), initialised to memory_logit_scale. docs/memory.md, issue 10.
MEMORY_SCORE_MODES = ("dot", "qknorm")
# independent: W_K drawn like every weight; tied: each memory head's W_K starts as a copy of its W_Q,
# so a token's query matches the slots holding its own content from step 0 (issue 10, 2026-12-06 at 097fc56).
MEMORY_QK_INIT_MODES = ("independent", "tied")


class ConfigError(UserInputError):
    """A configuration value that cannot work; the message names the knob.

    Raised with knobs (`ConfigError("{memory_slots} must be >= 1", memory_slots=0)`), the message
    is a template whose {name} fields read `name=value`; `named(flag_of)` gives the same error
    naming each knob by flag_of(name) instead (lm2-train names its flags).
    """

    def __init__(self, message: str, **knobs):
        self.template, self.knobs = message, knobs
        super().__init__(self._render(str))

    def _render(self, name_of) -> str:
        if not self.knobs:
            return self.template
        return self.template.format(**{name: f"{name_of(name)}={_shown(value)}"
                                       for name, value in self.knobs.items()})

    def named(self, name_of) -> "ConfigError":
        return ConfigError(self._render(name_of))


def _shown(value) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def knob(default, help: str, *, choices: Optional[tuple] = None, positive: bool = False,
         flag: bool = True, hf: bool = False, optional_in_record: bool = False):
    """A model field of LM2Config. flag: lm2-train has a flag overriding it (--memory-slots);
    hf: the exported Hugging Face LM2Config has it under the same name, default and choices;
    optional_in_record: added after the first lm2_config.json, so a record may lack it (meaning
    the default)."""
    return field(default=default, metadata={"knob": dict(
        help=help, choices=choices, positive=positive, flag=flag, hf=hf,
        optional_in_record=optional_in_record)})


# The architecture fields megatron-core's TransformerConfig declares (types and defaults are its
# own); same keys as knob().
MEGATRON_KNOBS = {
    "num_layers": dict(help="number of transformer blocks", positive=True),
    "hidden_size": dict(help="hidden size", positive=True),
    "ffn_hidden_size": dict(help="MLP width", positive=True),
    "num_attention_heads": dict(help="attention heads", positive=True),
    "num_query_groups": dict(help="GQA groups (key/value heads)", positive=True),
    "kv_channels": dict(help="attention head dimension (None: hidden_size / heads)", flag=False),
    "layernorm_epsilon": dict(help="RMSNorm epsilon", flag=False),
    "params_dtype": dict(help="dtype of the weights", flag=False, optional_in_record=True),
}


@dataclass
class LM2Config(TransformerConfig):
    # Model-level facts GPTModel takes as arguments.
    vocab_size: int = knob(32000, "model vocabulary (lm2-train: default the data's tokenizer, else the "
                           "flavor's; padded to a multiple of 128*TP)", positive=True)
    seq_length: int = knob(2048, "training sequence length in tokens", positive=True)
    tie_embeddings: bool = knob(False, "the output layer shares the input embedding", flag=False)
    rotary_base: int = knob(10000, "RoPE base (theta)", flag=False)

    # Memory (docs/memory.md).
    memory_slots: int = knob(2048, "memory bank slots N", positive=True, hf=True)
    memory_heads: int = knob(8, "memory read heads", positive=True, hf=True)
    memory_chunk_size: int = knob(1024, "tokens per memory chunk (the bank is written once per chunk; "
                                  "must divide the sequence length)", positive=True, hf=True)
    memory_write: str = knob("attention", "memory write mode", choices=MEMORY_WRITE_MODES, hf=True)
    memory_init: str = knob("identity", "memory start value M_0", choices=MEMORY_INIT_MODES, hf=True)
    memory_scores: str = knob("dot", "memory read/write scores: 'dot' = Q K^T / sqrt(d_h); 'qknorm' = "
                              "cosine of RMS-normalised Q and K times a learned per-head scale",
                              choices=MEMORY_SCORE_MODES, hf=True, optional_in_record=True)
    memory_logit_scale: float = knob(10.0, "qknorm: initial per-head logit scale of the memory's scores "
                                     "(it stays near this value in training: pick it for N, docs/memory.md)",
                                     positive=True, hf=True, optional_in_record=True)
    # A prior on retention: the paper's gates have no bias, so g_forget starts at 0.5 and a fact
    # written once fades by half per chunk (issue 10's persistence task: chance across 4 chunks).
    memory_forget_bias: float = knob(0.0, "constant added to the memory forget gate's logits, "
                                     "g_forget = sigmoid(x W_f + b) (0 = the paper's; 3 starts it at 0.95)",
                                     hf=True, optional_in_record=True)
    # A value's state holds its key (the token before it) only once self-attention has learned a
    # previous-token head; adding the k tokens before each written token gives every slot its left
    # context from the start (issue 10, 2026-12-03 at 5f6b12d: multi-query recall used the key only with it).
    memory_write_shift: int = knob(0, "the memory write takes each token plus the k tokens before it in "
                                   "its chunk, E_i + ... + E_(i-k), so a value's slot also holds its key "
                                   "(0 = the token alone; attention and token writes)",
                                   hf=True, optional_in_record=True)
    # A content-match prior: with qk-norm scores and a write shift, the question's key finds the slot
    # that holds the key next to its value before anything is learned (issue 10, 2026-12-06 at 097fc56). Only the
    # initial weights differ, so checkpoints and the HF export carry it without a field of their own.
    memory_qk_init: str = knob("independent", "how the memory's key projection starts: 'independent' (drawn "
                               "like every weight) or 'tied' (each head's W_K a copy of its W_Q, so tokens "
                               "first read the slots that hold their own content)",
                               choices=MEMORY_QK_INIT_MODES, optional_in_record=True)
    # None = every layer, () = none (the vanilla twin).
    memory_layers: Optional[Tuple[int, ...]] = knob(
        None, "1-based block numbers that carry a memory bank (default: every block; for none, use "
        "a vanilla flavor such as debug-vanilla)", hf=True)
    # Truncated backprop through the recurrence; None = backprop through every chunk.
    memory_bptt_chunks: Optional[int] = knob(
        None, "truncate backprop through the bank every k chunks", positive=True, optional_in_record=True)
    # None = the whole sequence (Megatron's causal mask). With a window W < seq_length, attention
    # is causal within segments of W tokens and the memory is the only path from one segment to
    # the next.
    attention_window: Optional[int] = knob(None, "self-attention window in tokens", positive=True, hf=True,
                                           optional_in_record=True)

    # Per-layer checkpoint keys (decoder.layers.<n>.*) instead of Megatron's layer-stacked
    # ones: memory tensors exist only in memory layers, so a stacked key would have holes
    # whenever `memory_layers` is a subset. Uniform across flavors, so a vanilla checkpoint's
    # layer keys match its LM2 twin's. (The field name is Megatron's spelling.) Not a model
    # field: every model has it.
    hetereogenous_dist_checkpoint: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.validate_memory()

    # ----------------------------------------------------------------------------------
    @property
    def memory_layer_numbers(self) -> Tuple[int, ...]:
        if self.memory_layers is None:
            return tuple(range(1, self.num_layers + 1))
        return tuple(self.memory_layers)

    @property
    def has_memory(self) -> bool:
        return len(self.memory_layer_numbers) > 0

    @property
    def memory_logit_scales(self) -> Tuple[str, ...]:
        """The memory module's learned per-head logit scales: with qk-norm the read's, and the
        attention write's (the other writes have no write scores); none with dot scores."""
        if self.memory_scores != "qknorm":
            return ()
        return ("read_logit_scale",) + (("write_logit_scale",) if self.memory_write == "attention" else ())

    @property
    def memory_initial_is_identity(self) -> bool:
        """M_0 is the fixed identity (zeros past d), so chunk 0's keys and values are columns of
        W_KV and cost no GEMM. A learned M_0, or identity-signs with slots past d, is one GEMM."""
        if self.memory_init == "identity-signs":
            return self.memory_slots <= self.hidden_size
        return self.memory_init == "identity"

    @property
    def memory_head_dim(self) -> int:
        return self.hidden_size // self.memory_heads

    @property
    def num_memory_chunks(self) -> int:
        return -(-self.seq_length // self.memory_chunk_size)

    def validate_memory(self) -> None:
        tp = self.tensor_model_parallel_size
        if self.memory_layers is not None:
            self.memory_layers = tuple(sorted(set(int(n) for n in self.memory_layers)))
            bad = [n for n in self.memory_layers if not 1 <= n <= self.num_layers]
            if bad:
                raise ConfigError(
                    f"{{memory_layers}} has layer numbers {bad} outside 1..{{num_layers}} (layer "
                    f"numbers are 1-based)", memory_layers=self.memory_layers, num_layers=self.num_layers)
        if not self.has_memory:
            return
        if self.memory_write not in MEMORY_WRITE_MODES:
            raise ConfigError(f"{{memory_write}}: expected one of {MEMORY_WRITE_MODES}",
                              memory_write=self.memory_write)
        if self.memory_init not in MEMORY_INIT_MODES:
            raise ConfigError(f"{{memory_init}}: expected one of {MEMORY_INIT_MODES}",
                              memory_init=self.memory_init)
        if self.memory_scores not in MEMORY_SCORE_MODES:
            raise ConfigError(f"{{memory_scores}}: expected one of {MEMORY_SCORE_MODES}",
                              memory_scores=self.memory_scores)
        if self.memory_qk_init not in MEMORY_QK_INIT_MODES:
            raise ConfigError(f"{{memory_qk_init}}: expected one of {MEMORY_QK_INIT_MODES}",
                              memory_qk_init=self.memory_qk_init)
        if not self.memory_logit_scale > 0:
            raise ConfigError("{memory_logit_scale} must be > 0", memory_logit_scale=self.memory_logit_scale)
        if self.memory_slots < 1:
            raise ConfigError("{memory_slots} must be >= 1", memory_slots=self.memory_slots)
        if self.memory_heads < 1 or self.hidden_size % self.memory_heads:
            raise ConfigError("{memory_heads} must divide {hidden_size}",
                              memory_heads=self.memory_heads, hidden_size=self.hidden_size)
        if self.memory_heads % tp:
            raise ConfigError(
                "{memory_heads} is not divisible by {tensor_model_parallel_size}: each TP rank holds "
                "memory_heads/tp heads", memory_heads=self.memory_heads, tensor_model_parallel_size=tp)
        if self.memory_slots % tp:
            raise ConfigError("{memory_slots} is not divisible by {tensor_model_parallel_size}",
                              memory_slots=self.memory_slots, tensor_model_parallel_size=tp)
        if self.memory_chunk_size < 1 or self.seq_length % self.memory_chunk_size:
            raise ConfigError(
                "{memory_chunk_size} does not divide {seq_length}: a training sequence must be a "
                "whole number of memory chunks",
                memory_chunk_size=self.memory_chunk_size, seq_length=self.seq_length)
        if self.memory_write in ("aligned", "token") and self.memory_slots != self.memory_chunk_size:
            raise ConfigError(
                "{memory_write} lines slot i up with token i of a chunk, so {memory_slots} must "
                "equal {memory_chunk_size}", memory_write=self.memory_write,
                memory_slots=self.memory_slots, memory_chunk_size=self.memory_chunk_size)
        if not 0 <= self.memory_write_shift < self.memory_chunk_size:
            raise ConfigError("{memory_write_shift} must be in [0, {memory_chunk_size}): the write adds "
                              "that many earlier tokens of the same chunk",
                              memory_write_shift=self.memory_write_shift, memory_chunk_size=self.memory_chunk_size)
        if self.memory_write_shift and self.memory_write == "aligned":
            raise ConfigError("{memory_write_shift} applies to the attention and token writes; the aligned "
                              "write takes the reads, not the tokens", memory_write_shift=self.memory_write_shift,
                              memory_write=self.memory_write)
        if self.memory_bptt_chunks is not None and self.memory_bptt_chunks < 2:
            raise ConfigError(
                "{memory_bptt_chunks} must be >= 2 (backprop windows of k chunks; with 1 no gradient "
                "would ever reach the write) or None (no truncation)",
                memory_bptt_chunks=self.memory_bptt_chunks)
        if self.attention_window is not None:
            if self.attention_window < 1 or self.seq_length % self.attention_window:
                raise ConfigError("{attention_window} does not divide {seq_length}",
                                  attention_window=self.attention_window, seq_length=self.seq_length)

    def replace(self, **overrides) -> "LM2Config":
        """A copy with some fields changed, validated again."""
        known = {f.name for f in fields(self) if f.init}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(overrides)
        return type(self)(**values)


# ------------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class ModelField:
    """One model field as declared (LM2Config's knob() metadata, or MEGATRON_KNOBS): `type` is
    the resolved annotation (e.g. Optional[Tuple[int, ...]]), `default` LM2Config's default."""

    name: str
    type: Any
    default: Any
    help: str
    choices: Optional[tuple] = None
    positive: bool = False
    flag: bool = True
    hf: bool = False
    optional_in_record: bool = False

    @property
    def value_type(self):
        """The type without Optional."""
        return without_optional(self.type)

    def coerce(self, value):
        """A value from outside (JSON, a saved command line) as the declared type: a list becomes
        a tuple of the element type, a dtype name the torch dtype; None stays None."""
        kind = self.value_type
        if value is None:
            return None
        if get_origin(kind) is tuple:
            element = get_args(kind)[0]
            return tuple(element(v) for v in value)
        if kind is torch.dtype and isinstance(value, str):
            dtype = getattr(torch, value, None)
            if not isinstance(dtype, torch.dtype):
                raise ConfigError(f"{{{self.name}}}: not a torch dtype", **{self.name: value})
            return dtype
        return value

    def plain(self, value):
        """The value as JSON holds it (tuples as lists, dtypes by name)."""
        if isinstance(value, tuple):
            return list(value)
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        return value


def without_optional(kind):
    """Optional[X] (or X | None) -> X; any other type unchanged."""
    if get_origin(kind) in (Union, types.UnionType):
        rest = [arg for arg in get_args(kind) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def _declared() -> Tuple[ModelField, ...]:
    hints = get_type_hints(LM2Config)
    by_name = {f.name: f for f in fields(LM2Config)}
    declared = [ModelField(name, hints[name], by_name[name].default, **meta)
                for name, meta in MEGATRON_KNOBS.items()]
    declared += [ModelField(f.name, hints[f.name], f.default, **f.metadata["knob"])
                 for f in fields(LM2Config) if "knob" in f.metadata]
    return tuple(declared)


# Every field that defines a model (what lm2_config.json holds), in a stable order.
MODEL_FIELDS: Tuple[ModelField, ...] = _declared()
