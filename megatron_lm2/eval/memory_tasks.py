"""Synthetic tasks whose answer only the memory can carry: the facts sit in the first memory
chunk, the question at the end of a later chunk, and self-attention is blocked across chunks
(attention_window = chunk size). Used by benchmarks/memory_scaling.py.

    fact         one key-value pair in chunk 0, its key asked at the end of chunk 1
    mqar         P pairs in chunk 0, every key asked (shuffled) at the end of chunk 1
    persist      one pair in chunk 0, asked at the end of chunk k (k - 1 filler chunks between)
    twohop       a bAbI qa2 story (megatron_lm2.eval.babilong_gen) in chunk 0: people carry
                 objects and move; "where is the <object> ?" at the end of chunk 1

Every task returns a TaskBatch: tokens, next-token labels, a loss mask on the answers, and
`fact_mask` (the fact tokens of chunk 0) so an ablation can replace the facts with filler.
Deterministic given the generator (or seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_lm2.eval import babilong_gen
from megatron_lm2.eval.mqar import MQARSpec, mqar_batch

TASKS = ("fact", "mqar", "persist", "twohop")


@dataclass
class TaskBatch:
    tokens: Tensor  # [B, S] int64
    labels: Tensor  # [B, S] next-token targets
    loss_mask: Tensor  # [B, S] float: 1 at the positions whose label is an answer
    fact_mask: Tensor  # [B, S] bool: the fact tokens (chunk 0)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # one of TASKS
    chunk: int  # C: memory chunk = attention window
    pairs: int = 1  # mqar
    hops: int = 1  # persist: the question's chunk index k
    num_keys: int = 32
    num_values: int = 16
    num_filler: int = 64

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; known: {', '.join(TASKS)}")
        if self.hops < 1:
            raise ValueError(f"hops={self.hops} must be >= 1 (the question's chunk index)")
        if self.name == "twohop" and self.chunk < TWOHOP_MIN_CHUNK:
            raise ValueError(f"twohop needs chunk >= {TWOHOP_MIN_CHUNK} (a qa2 story takes 40-150 tokens, "
                             f"median 62); got chunk={self.chunk}")

    @property
    def num_chunks(self) -> int:
        return 1 + (self.hops if self.name == "persist" else 1)

    @property
    def seq_length(self) -> int:
        return self.num_chunks * self.chunk

    def mqar_spec(self) -> MQARSpec:
        pairs = self.pairs if self.name == "mqar" else 1
        return MQARSpec(seq_length=self.seq_length, fact_length=self.chunk, num_pairs=pairs,
                        num_keys=max(self.num_keys, pairs), num_values=self.num_values,
                        num_filler=self.num_filler)

    @property
    def vocab_size(self) -> int:
        if self.name == "twohop":
            return _TWOHOP_VOCAB_START + self.num_filler
        return self.mqar_spec().vocab_size

    @property
    def chance(self) -> float:
        if self.name == "twohop":
            return 1.0 / len(babilong_gen.PLACES)
        return 1.0 / self.num_values

    def filler_range(self) -> range:
        if self.name == "twohop":
            return range(_TWOHOP_VOCAB_START, _TWOHOP_VOCAB_START + self.num_filler)
        return self.mqar_spec().filler_ids


def make_batch(spec: TaskSpec, batch_size: int, generator: torch.Generator | int) -> TaskBatch:
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    if spec.name == "twohop":
        return twohop_batch(spec, batch_size, generator)
    m = spec.mqar_spec()
    b = mqar_batch(m, batch_size, generator)
    fact_mask = torch.zeros_like(b.tokens, dtype=torch.bool)
    fact_mask[:, : spec.chunk] = b.tokens[:, : spec.chunk] >= m.key_ids.start
    return TaskBatch(tokens=b.tokens, labels=b.labels, loss_mask=b.loss_mask, fact_mask=fact_mask)


def without_facts(spec: TaskSpec, batch: TaskBatch, seed: int) -> TaskBatch:
    """The same questions with every fact token replaced by random filler."""
    tokens = batch.tokens.clone()
    g = torch.Generator().manual_seed(seed)
    filler = spec.filler_range()
    tokens[batch.fact_mask] = torch.randint(filler.start, filler.stop, (int(batch.fact_mask.sum()),),
                                            generator=g)
    return TaskBatch(tokens=tokens, labels=batch.labels, loss_mask=batch.loss_mask,
                     fact_mask=torch.zeros_like(batch.fact_mask))


def with_other_keys(spec: TaskSpec, batch: TaskBatch, seed: int) -> TaskBatch:
    """The same samples with every asked key replaced by a key the sample's facts do not hold,
    labels unchanged. A model that still answers with the fact's value does not use the key: with
    one fact it only has to find the one value token in the bank (the runs of 2026-12-03 (4d2add7) found exactly that)."""
    if spec.name == "twohop":
        raise ValueError("with_other_keys: two-hop questions ask an object, not a key")
    keys = spec.mqar_spec().key_ids
    tokens = batch.tokens.clone()
    g = torch.Generator().manual_seed(seed)
    for row in range(tokens.shape[0]):
        held = set(tokens[row][batch.fact_mask[row]].tolist())
        free = torch.tensor([k for k in keys if k not in held])
        asked = batch.loss_mask[row].nonzero()[:, 0]
        tokens[row, asked] = free[torch.randint(len(free), (len(asked),), generator=g)]
    return TaskBatch(tokens=tokens, labels=batch.labels, loss_mask=batch.loss_mask, fact_mask=batch.fact_mask)


# ---------------------------------------------------------------------------- two-hop (qa2)
def last_place_accuracy(batch: TaskBatch) -> float:
    """Two-hop's one-hop shortcut on a batch: answer with the place the story names last. A model
    near this number has not shown two hops (34-35 % of qa2 stories; chance is 1 / 6)."""
    places = torch.tensor(sorted(_TWOHOP_IDS[p.lower()] for p in babilong_gen.PLACES))
    hits = []
    for row in range(batch.tokens.shape[0]):
        story = batch.tokens[row][batch.fact_mask[row]]
        named = story[torch.isin(story, places)]
        answer = batch.labels[row][batch.loss_mask[row].bool()]
        hits.append(len(named) > 0 and bool((named[-1] == answer).all()))
    return sum(hits) / len(hits)


def _twohop_words() -> list[str]:
    words = set(babilong_gen.PEOPLE) | set(babilong_gen.PLACES) | set(babilong_gen.OBJECTS)
    for phrase in babilong_gen.MOVES + babilong_gen.TAKES + babilong_gen.DROPS + babilong_gen.GIVES:
        words.update(phrase.split())
    words.update(["the", "there", "to", ".", "where", "is", "?"])
    return sorted({w.lower() for w in words})


_TWOHOP_WORDS = _twohop_words()
_TWOHOP_IDS = {w: i + 1 for i, w in enumerate(_TWOHOP_WORDS)}  # 0 unused
_TWOHOP_VOCAB_START = 1 + len(_TWOHOP_WORDS)  # filler ids follow the words
TWOHOP_MIN_CHUNK = 96
_QUESTION_LEN = 5  # where is the <object> ? -> answer after "?"


def _words(sentence: str) -> list[str]:
    return sentence.replace(".", " .").replace("?", " ?").lower().split()


def twohop_max_tokens(chunk: int) -> int:
    """Stories longer than 3/4 of the chunk are redrawn (deterministically), so the facts keep
    filler between them; at C = 128 that keeps ~97 % of qa2 stories."""
    return 3 * chunk // 4


def twohop_story(seed: int, max_tokens: int) -> tuple[list[int], int, int]:
    """(fact token ids, object id, place id) of one qa2 story of at most max_tokens tokens."""
    for attempt in range(1000):
        rng = random.Random(f"memory_tasks/twohop/{seed}/{attempt}")
        facts, question, target = babilong_gen.STORIES["qa2"](rng)
        ids = [_TWOHOP_IDS[w] for f in facts for w in _words(f)]
        if len(ids) <= max_tokens:
            obj = _words(question)[-2]
            return ids, _TWOHOP_IDS[obj], _TWOHOP_IDS[target.lower()]
    raise RuntimeError(f"no qa2 story of <= {max_tokens} tokens for seed {seed}")


def twohop_batch(spec: TaskSpec, batch_size: int, generator: torch.Generator) -> TaskBatch:
    C, S = spec.chunk, spec.seq_length
    f0 = _TWOHOP_VOCAB_START
    tokens = torch.randint(f0, f0 + spec.num_filler, (batch_size, S), generator=generator)
    fact_mask = torch.zeros(batch_size, S, dtype=torch.bool)
    loss_mask = torch.zeros(batch_size, S)
    seeds = torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()
    q = S - _QUESTION_LEN - 1
    for b, seed in enumerate(seeds):
        ids, obj, place = twohop_story(seed, twohop_max_tokens(C))
        # The story's tokens keep their order, spread over chunk 0 at random positions.
        pos = torch.sort(torch.randperm(C, generator=generator)[: len(ids)]).values
        tokens[b, pos] = torch.tensor(ids)
        fact_mask[b, pos] = True
        w = _TWOHOP_IDS
        tokens[b, q : q + _QUESTION_LEN + 1] = torch.tensor([w["where"], w["is"], w["the"], obj, w["?"], place])
        loss_mask[b, q + _QUESTION_LEN - 1] = 1.0  # the label of "?" is the place
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    return TaskBatch(tokens=tokens, labels=labels, loss_mask=loss_mask, fact_mask=fact_mask)
