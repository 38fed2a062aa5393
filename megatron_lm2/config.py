"""LM2Config: Megatron-core's TransformerConfig plus the memory knobs and the few model-level
facts (vocabulary, sequence length, embeddings) that GPTModel takes as arguments.

One config object describes a model; flavors (flavors.py) build them; the trainer overrides
fields from its flags. Invalid combinations fail here, naming the knob and the values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lm2.cli_errors import UserInputError

MEMORY_WRITE_MODES = ("attention", "aligned")
MEMORY_INIT_MODES = ("identity", "learned")


class ConfigError(UserInputError):
    """A configuration value that cannot work; the message names the knob."""


@dataclass
class LM2Config(TransformerConfig):
    # Model-level facts GPTModel takes as arguments.
    vocab_size: int = 32000
    seq_length: int = 2048
    tie_embeddings: bool = False
    rotary_base: int = 10000

    # Memory (docs/memory.md). `memory_layers`: 1-based global layer numbers that carry a bank;
    # None = every layer, () = none (the vanilla twin).
    memory_slots: int = 2048
    memory_heads: int = 8
    memory_chunk_size: int = 1024
    memory_write: str = "attention"
    memory_init: str = "identity"
    memory_layers: Optional[Tuple[int, ...]] = None
    # Detach the bank every k chunks inside one forward (truncated backprop through the
    # recurrence); None = backprop through every chunk.
    memory_bptt_chunks: Optional[int] = None
    # Self-attention window in tokens; None = the whole sequence (Megatron's causal mask).
    # With a window W < seq_length, attention is causal within segments of W tokens and the
    # memory is the only path from one segment to the next.
    attention_window: Optional[int] = None

    # Per-layer checkpoint keys (decoder.layers.<n>.*) instead of Megatron's layer-stacked
    # ones: memory tensors exist only in memory layers, so a stacked key would have holes
    # whenever `memory_layers` is a subset. Uniform across flavors, so a vanilla checkpoint's
    # layer keys match its LM2 twin's. (The field name is Megatron's spelling.)
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
                    f"memory_layers={list(self.memory_layers)} has layer numbers {bad} outside "
                    f"1..num_layers={self.num_layers} (layer numbers are 1-based)"
                )
        if not self.has_memory:
            return
        if self.memory_write not in MEMORY_WRITE_MODES:
            raise ConfigError(
                f"memory_write={self.memory_write!r}: expected one of {MEMORY_WRITE_MODES}"
            )
        if self.memory_init not in MEMORY_INIT_MODES:
            raise ConfigError(
                f"memory_init={self.memory_init!r}: expected one of {MEMORY_INIT_MODES}"
            )
        if self.memory_slots < 1:
            raise ConfigError(f"memory_slots={self.memory_slots} must be >= 1")
        if self.memory_heads < 1 or self.hidden_size % self.memory_heads:
            raise ConfigError(
                f"memory_heads={self.memory_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.memory_heads % tp:
            raise ConfigError(
                f"memory_heads={self.memory_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}: each TP rank holds memory_heads/tp heads"
            )
        if self.memory_slots % tp:
            raise ConfigError(
                f"memory_slots={self.memory_slots} is not divisible by "
                f"tensor_model_parallel_size={tp}"
            )
        if self.memory_chunk_size < 1 or self.seq_length % self.memory_chunk_size:
            raise ConfigError(
                f"memory_chunk_size={self.memory_chunk_size} does not divide "
                f"seq_length={self.seq_length}: a training sequence must be a whole number "
                f"of memory chunks"
            )
        if self.memory_write == "aligned" and self.memory_slots != self.memory_chunk_size:
            raise ConfigError(
                f"memory_write='aligned' lines slot i up with token i of a chunk, so "
                f"memory_slots={self.memory_slots} must equal "
                f"memory_chunk_size={self.memory_chunk_size}"
            )
        if self.memory_bptt_chunks is not None and self.memory_bptt_chunks < 2:
            raise ConfigError(
                f"memory_bptt_chunks={self.memory_bptt_chunks} must be >= 2 (backprop windows of "
                f"k chunks; with 1 no gradient would ever reach the write) or None (no truncation)"
            )
        if self.attention_window is not None:
            if self.attention_window < 1 or self.seq_length % self.attention_window:
                raise ConfigError(
                    f"attention_window={self.attention_window} does not divide "
                    f"seq_length={self.seq_length}"
                )

    def replace(self, **overrides) -> "LM2Config":
        """A copy with some fields changed, validated again."""
        known = {f.name for f in fields(self) if f.init}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(overrides)
        return type(self)(**values)
