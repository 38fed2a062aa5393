"""MMLU-style multiple choice by log-likelihood, on a local copy of the data.

    questions = load_mmlu(root, split="test")            # the usual layouts, see load_mmlu
    result = score_mmlu(scorer, questions, shots=dev)    # scorer: HFScorer or MegatronScorer

Two prompt formats (`fmt`), both as lm-evaluation-harness's `mmlu` tasks build them:
  letters  lm-eval's `mmlu` (default/): "The following are multiple choice questions (with
           answers) about {subject}.\n\n", the question, the four choices as "A. ...", then
           "Answer:"; the model picks the letter " A"/" B"/" C"/" D" of highest log-likelihood.
  cloze    lm-eval's `mmlu_continuation`: "The following are questions (with answers) about
           {subject}.\n\n", "Question: ...\nAnswer:" and each choice's own text (after a space)
           as the continuation. Reports accuracy on the summed log-likelihood ("acc"), on it
           divided by the choice's length in characters ("acc_norm", lm-eval's own definition:
           len() of the choice text, without the space before it), and divided by its UTF-8
           bytes ("acc_bytes", lm-eval's byte-length normalisation).
Few-shot examples are the first k of the subject's dev split, each followed by its answer and a
blank line. Accuracy is the mean over questions ("micro", lm-eval's weight_by_size), and the
mean of per-subject accuracies ("macro") is reported beside it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.eval.mmlu_data import LETTERS, MMLUDataError, Question, load_mmlu  # noqa: F401


# ------------------------------------------------------------------------------ prompts
def _subject_title(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(q: Question, fmt: str, with_answer: bool = False) -> str:
    if fmt == "letters":
        text = q.question.strip() + "\n"
        text += "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(q.choices))
        text += "Answer:"
        return text + (f" {LETTERS[q.answer]}\n\n" if with_answer else "")
    if fmt == "cloze":
        text = f"Question: {q.question.strip()}\nAnswer:"
        return text + (f" {q.choices[q.answer]}\n\n" if with_answer else "")
    raise UserInputError(f"--format {fmt!r}: expected 'letters' or 'cloze'")


HEADERS = {"letters": "The following are multiple choice questions (with answers) about {subject}.\n\n",
           "cloze": "The following are questions (with answers) about {subject}.\n\n"}


def build_context(q: Question, fmt: str, shots: Sequence[Question] = ()) -> str:
    if fmt not in HEADERS:
        raise UserInputError(f"--format {fmt!r}: expected 'letters' or 'cloze'")
    header = HEADERS[fmt].format(subject=_subject_title(q.subject))
    return header + "".join(format_question(s, fmt, True) for s in shots) + format_question(q, fmt)


def continuations(q: Question, fmt: str) -> list[str]:
    if fmt == "letters":
        return [f" {LETTERS[i]}" for i in range(len(q.choices))]
    return [f" {c}" for c in q.choices]


# ------------------------------------------------------------------------------ scorers
def continuation_logprob(logits: torch.Tensor, ids: Sequence[int], n_context: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) over the continuation positions t >= n_context.
    logits: [len(ids), V] for the whole sequence."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    targets = torch.tensor(ids[n_context:], dtype=torch.long)
    return float(logp[n_context - 1 : len(ids) - 1].gather(1, targets[:, None]).sum())


class _Scorer:
    max_length: int
    prefix_ids: tuple = ()  # tokens in front of every context (a BOS: see bos.resolve_bos)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def split_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as the joined text encodes: the encoding of
        context + continuation, cut after the context's own tokens. Encoding the continuation
        alone is wrong for SentencePiece, which puts a word-start marker before any text it
        encodes: " A" alone is [▁, ▁A], in the running text just [▁A]; and HF's conversion of
        the same .model does not add it, so the two backends would score different tokens.
        When the context's tokens are not a prefix of the joined text's (a merge across the
        boundary), the two are encoded apart."""
        ctx, whole = self.encode(context), self.encode(context + continuation)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.encode(continuation)

    def loglikelihood(self, context: str, continuation: str) -> float:
        """log p(continuation | context) over the continuation's tokens (split_ids), keeping
        the last max_length tokens."""
        ctx, cont = self.split_ids(context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        ids = (list(self.prefix_ids) + ctx + cont)[-self.max_length:]
        n_context = len(ids) - len(cont)
        if n_context < 1:
            raise ValueError("the continuation alone fills the model's context")
        return continuation_logprob(self.logits(ids), ids, n_context)


def leading_special_ids(tokenizer) -> tuple:
    """The ids an HF tokenizer puts in front of any text by default (its BOS, if it adds one)."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    cut = next((i for i in range(len(full)) if full[i:i + len(bare)] == bare), 0)
    return tuple(full[:cut])


class HFScorer(_Scorer):
    def __init__(self, model, tokenizer, max_length: Optional[int] = None, prefix_ids: Sequence[int] = ()):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)
        self.prefix_ids = tuple(prefix_ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logits(self, ids):
        x = torch.tensor([list(ids)], device=self.model.device)
        return self.model(input_ids=x).logits[0].float().cpu()


class MegatronScorer(_Scorer):
    def __init__(self, model, tokenizer, max_length: Optional[int] = None, prefix_ids: Sequence[int] = ()):
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length or model.config.seq_length
        self.prefix_ids = tuple(prefix_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    @torch.no_grad()
    def logits(self, ids):
        from megatron_lm2.eval.decode import _gather_vocab

        self.model.eval()
        device = next(self.model.parameters()).device
        x = torch.tensor([list(ids)], device=device)
        # No mask passed: the model applies its attention window as in training, for this length.
        return _gather_vocab(self.model(x, torch.arange(len(ids), device=device)[None], None))[0].float().cpu()


# ------------------------------------------------------------------------------ scoring
@dataclass
class MMLUResult:
    accuracy: float  # micro, percent
    macro_accuracy: float
    accuracy_norm: Optional[float]  # cloze only: lm-eval's acc_norm (per character of the choice)
    per_subject: dict
    total: int
    accuracy_bytes: Optional[float] = None  # cloze only: lm-eval's acc_bytes (per UTF-8 byte)
    header: dict = None  # the protocol: format, shots, normalisation, BOS

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def score_mmlu(scorer: _Scorer, questions: Sequence[Question], fmt: str = "letters",
               dev: Sequence[Question] = (), shots: int = 0, progress: bool = True,
               header: Optional[dict] = None) -> MMLUResult:
    if not questions:
        raise MMLUDataError("no MMLU questions to score")
    dev_by_subject = defaultdict(list)
    for q in dev:
        dev_by_subject[q.subject].append(q)
    hits, hits_norm, hits_bytes = defaultdict(list), [], []
    for q in tqdm(questions, desc=f"mmlu ({fmt}, {shots}-shot)", disable=not progress):
        examples = dev_by_subject[q.subject][:shots]
        if len(examples) < shots:
            raise MMLUDataError(f"subject {q.subject}: {shots}-shot needs {shots} dev questions, has {len(examples)}")
        context = build_context(q, fmt, examples)
        scores = [scorer.loglikelihood(context, c) for c in continuations(q, fmt)]
        hits[q.subject].append(_argmax(scores) == q.answer)
        if fmt == "cloze":  # lm-eval divides by the choice's own length (no leading space)
            norm = [s / max(1, len(c)) for s, c in zip(scores, q.choices)]
            per_byte = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, q.choices)]
            hits_norm.append(_argmax(norm) == q.answer)
            hits_bytes.append(_argmax(per_byte) == q.answer)
    all_hits = [h for hs in hits.values() for h in hs]
    per_subject = {s: 100.0 * sum(h) / len(h) for s, h in sorted(hits.items())}
    return MMLUResult(
        accuracy=100.0 * sum(all_hits) / len(all_hits),
        macro_accuracy=sum(per_subject.values()) / len(per_subject),
        accuracy_norm=100.0 * sum(hits_norm) / len(hits_norm) if hits_norm else None,
        per_subject=per_subject,
        total=len(all_hits),
        accuracy_bytes=100.0 * sum(hits_bytes) / len(hits_bytes) if hits_bytes else None,
        header={"format": fmt, "shots": shots, "shots_from": "the first k dev questions of the subject",
                "scoring": "sum of the continuation's token log-likelihoods; argmax over the choices"
                           + ("; acc_norm per character, acc_bytes per UTF-8 byte of the choice"
                              if fmt == "cloze" else ""),
                **(header or {})},
    )


def _argmax(values: Sequence[float]) -> int:
    """The first index of the largest value (numpy's argmax, which lm-eval uses, on ties)."""
    return max(range(len(values)), key=values.__getitem__)


__all__ = ["Question", "load_mmlu", "score_mmlu", "HFScorer", "MegatronScorer", "build_context",
           "continuations", "continuation_logprob", "MMLUResult", "MMLUDataError"]
