"""Ladders from one knob: width (or depth) -> a whole model, for both families.

The rule (defaults reproduce lm2-1.7b and llama-1.7b at width 2048, tests/test_scaling.py):

    num_layers          = hidden_size / aspect_ratio            (128: d 2048 -> 16 blocks)
    num_attention_heads = hidden_size / head_dim                (64: 32 heads)
    num_query_groups    = heads / heads_per_group               (1: MHA)
    ffn_hidden_size     = ffn_ratio * hidden_size, rounded up to ffn_multiple   (4: 8192)

and for LM2 the memory, whose rules set the family's scaling exponent and so are explicit:

    memory_slots        chunk: = memory_chunk_size (the token write's N = C; the default) |
                        proportional: slots_per_width * hidden_size | fixed: slots
    memory_heads        head_dim: hidden_size / memory head_dim (256: 8) | fixed: heads
    memory_chunk_size   seq_length / chunks_per_sequence        (4: 512; the ratio is fixed, so
                        every rung writes its bank the same number of times per sequence)
    memory_layers       all | every:K | first:K | last:K

With the depth knob, hidden_size = aspect_ratio * num_layers and the rest follows.

A rung is a base flavor plus lm2-train model flags (TrainConfig.MODEL_FIELDS), so the model
the trainer builds from the launch line is exactly the one the plan counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from megatron_lm2.config import LM2Config
from megatron_lm2.scaling.sweepfile import LadderSection, MemorySection, ModelSection, SweepFileError


@dataclass(frozen=True)
class Rung:
    family: str  # "lm2" | "vanilla"
    value: int  # the ladder knob's value (width or depth)
    flavor: str  # base flavor the overrides apply to
    overrides: Dict[str, object] = field(hash=False)  # TrainConfig model fields

    def config(self, **parallel) -> LM2Config:
        from megatron_lm2.flavors import get_flavor

        return get_flavor(self.flavor, **self.overrides, **parallel)

    def flags(self) -> list:
        """The lm2-train flags that build this rung."""
        args = ["--flavor", self.flavor]
        for name, value in self.overrides.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, (tuple, list)):
                args += [flag, *(str(v) for v in value)]
            else:
                args += [flag, str(value)]
        return args


def memory_layer_numbers(rule: str, num_layers: int) -> Optional[Tuple[int, ...]]:
    """'all' -> None (every block); 'every:K' -> K, 2K, ...; 'first:K' -> 1..K; 'last:K'."""
    if rule == "all":
        return None
    kind, _, count = rule.partition(":")
    if kind not in ("every", "first", "last") or not count.isdigit() or int(count) < 1:
        raise SweepFileError(f"memory layers rule {rule!r}: expected all, every:K, first:K or last:K")
    k = int(count)
    if k > num_layers:
        raise SweepFileError(f"memory layers rule {rule!r}: K={k} is more than the {num_layers} blocks")
    if kind == "every":
        return tuple(range(k, num_layers + 1, k))
    if kind == "first":
        return tuple(range(1, k + 1))
    return tuple(range(num_layers - k + 1, num_layers + 1))


def decoder_shape(ladder: LadderSection, value: int) -> dict:
    if ladder.knob == "width":
        hidden, layers = value, value // ladder.aspect_ratio
        if layers < 1 or value % ladder.aspect_ratio:
            raise SweepFileError(f"[ladder] values: width {value} is not a multiple of aspect_ratio "
                                 f"{ladder.aspect_ratio}")
    else:
        layers, hidden = value, value * ladder.aspect_ratio
    if hidden % ladder.head_dim:
        raise SweepFileError(f"[ladder] head_dim: {ladder.head_dim} does not divide hidden size {hidden} "
                             f"(rung {value})")
    heads = hidden // ladder.head_dim
    if heads % ladder.heads_per_group:
        raise SweepFileError(f"[ladder] heads_per_group: {ladder.heads_per_group} does not divide {heads} heads "
                             f"(rung {value})")
    ffn = ladder.ffn_multiple * math.ceil(ladder.ffn_ratio * hidden / ladder.ffn_multiple)
    return dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                num_query_groups=heads // ladder.heads_per_group)


def memory_shape(memory: MemorySection, hidden: int, layers: int, seq_length: int,
                 base_layers: Optional[Tuple[int, ...]]) -> dict:
    if memory.slots_rule == "proportional":
        slots = max(1, round(memory.slots_per_width * hidden))
    elif memory.slots_rule == "chunk":
        slots = seq_length // memory.chunks_per_sequence
    else:
        slots = memory.slots
    if memory.heads_rule == "head_dim":
        heads = max(1, hidden // memory.head_dim)
        while hidden % heads:  # the largest head count <= d / head_dim that divides d
            heads -= 1
    else:
        heads = memory.heads
        if hidden % heads:
            raise SweepFileError(f"[memory] heads: {heads} does not divide hidden size {hidden}")
    if seq_length % memory.chunks_per_sequence:
        raise SweepFileError(f"[memory] chunks_per_sequence: {memory.chunks_per_sequence} does not divide "
                             f"seq_length {seq_length}")
    shape = dict(memory_slots=slots, memory_heads=heads,
                 memory_chunk_size=seq_length // memory.chunks_per_sequence,
                 memory_write=memory.write, memory_init=memory.init, memory_scores=memory.scores,
                 memory_forget_bias=memory.forget_bias, memory_write_shift=memory.write_shift,
                 memory_qk_init=memory.qk_init)
    numbers = memory_layer_numbers(memory.layers, layers)
    if numbers is None:
        numbers = None if base_layers is None else tuple(range(1, layers + 1))
    if numbers is not None:
        shape["memory_layers"] = numbers
    return shape


def make_rung(family: str, value: int, model: ModelSection, ladder: LadderSection,
              memory: MemorySection) -> Rung:
    from megatron_lm2.flavors import get_flavor

    overrides = decoder_shape(ladder, value)
    overrides.update(vocab_size=model.vocab_size, seq_length=model.seq_length)
    if family == "lm2":
        flavor = model.lm2_flavor
        base = get_flavor(flavor)
        if not base.has_memory:
            raise SweepFileError(f"[model] lm2_flavor: {flavor!r} has no memory layers")
        overrides.update(memory_shape(memory, overrides["hidden_size"], overrides["num_layers"],
                                      model.seq_length, base.memory_layers))
    else:
        flavor = model.vanilla_flavor
        if get_flavor(flavor).has_memory:
            raise SweepFileError(f"[model] vanilla_flavor: {flavor!r} has memory layers; use a vanilla twin "
                                 f"such as llama-1.7b")
    return Rung(family=family, value=value, flavor=flavor, overrides=overrides)
