"""Multi-query associative recall (MQAR) across the attention window: a fast synthetic probe
of the memory.

A sample is `seq_length` tokens. Its first `fact_length` tokens hold `num_pairs` key-value
pairs (`k v`) scattered among filler tokens; its last 2 * num_pairs tokens ask for every key
again in a shuffled order (`k ?`), and the model must predict the value after each key. With
the attention window set to `fact_length` (megatron_lm2.model.attention_mask), the questions
cannot see the facts through self-attention: only the memory carries them, and a model
without memory is at chance (1 / num_values).

Token ids: 0 is unused, then filler, keys and values in disjoint ranges (see MQARSpec).
Deterministic given the torch.Generator (or seed) passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MQARSpec:
    seq_length: int = 128
    fact_length: int = 64  # the facts live in tokens [0, fact_length)
    num_pairs: int = 4
    num_keys: int = 64
    num_values: int = 16
    num_filler: int = 64

    def __post_init__(self):
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} exceeds num_keys={self.num_keys}")
        if 2 * self.num_pairs > self.fact_length:
            raise ValueError(
                f"{self.num_pairs} pairs need {2 * self.num_pairs} tokens but fact_length="
                f"{self.fact_length}"
            )
        if self.fact_length + 2 * self.num_pairs > self.seq_length:
            raise ValueError(
                f"fact_length={self.fact_length} + {2 * self.num_pairs} question tokens exceed "
                f"seq_length={self.seq_length}"
            )

    @property
    def filler_ids(self) -> range:
        return range(1, 1 + self.num_filler)

    @property
    def key_ids(self) -> range:
        start = 1 + self.num_filler
        return range(start, start + self.num_keys)

    @property
    def value_ids(self) -> range:
        start = 1 + self.num_filler + self.num_keys
        return range(start, start + self.num_values)

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_filler + self.num_keys + self.num_values

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values


@dataclass
class MQARBatch:
    tokens: Tensor  # [B, S] int64
    labels: Tensor  # [B, S] next-token targets (tokens shifted left; last = 0)
    loss_mask: Tensor  # [B, S] float, 1 where the label is a queried value
    values: Tensor  # [B, num_pairs] the expected answers, in question order


def mqar_batch(spec: MQARSpec, batch_size: int, generator: torch.Generator | int) -> MQARBatch:
    """One batch of MQAR samples; the same generator state (or seed) gives the same batch."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    B, S, P = batch_size, spec.seq_length, spec.num_pairs
    g = generator
    f0, k0, v0 = spec.filler_ids.start, spec.key_ids.start, spec.value_ids.start
    tokens = torch.randint(f0, f0 + spec.num_filler, (B, S), generator=g)
    # Distinct keys per sample; values drawn with replacement. Earlier answers in the question
    # block still say something about later ones to a model that sees the facts' values: the
    # remaining values are the rest of that multiset. Without the keys that elimination scores
    # ~55 % with 4 pairs and 26-33 % with 16 (issue 10, 2026-12-03 at 4d2add7), far above 1/num_values.
    keys = torch.argsort(torch.rand(B, spec.num_keys, generator=g), dim=1)[:, :P] + k0
    values = torch.randint(v0, v0 + spec.num_values, (B, P), generator=g)
    # Pair slots: choose P of the fact_length // 2 aligned two-token cells of the fact block.
    cells = torch.argsort(torch.rand(B, spec.fact_length // 2, generator=g), dim=1)[:, :P]
    cells, _ = torch.sort(cells, dim=1)
    rows = torch.arange(B)[:, None]
    tokens[rows, 2 * cells] = keys
    tokens[rows, 2 * cells + 1] = values
    order = torch.argsort(torch.rand(B, P, generator=g), dim=1)
    asked_keys = torch.gather(keys, 1, order)
    asked_values = torch.gather(values, 1, order)
    question_start = S - 2 * P
    key_pos = question_start + 2 * torch.arange(P)
    tokens[:, key_pos] = asked_keys
    tokens[:, key_pos + 1] = asked_values
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    loss_mask = torch.zeros(B, S)
    loss_mask[:, key_pos] = 1.0
    return MQARBatch(tokens=tokens, labels=labels, loss_mask=loss_mask, values=asked_values)
