"""MMLU-style multiple choice by log-likelihood, on a local copy of the data.

    questions = load_mmlu(root, split="test")            # the usual layouts, see load_mmlu
    result = score_mmlu(scorer, questions, shots=dev)    # scorer: HFScorer or MegatronScorer

Two prompt formats (`fmt`):
  letters  the original MMLU protocol (Hendrycks et al.): the question, the four choices as
           "A. ...", then "Answer:"; the model picks the letter " A"/" B"/" C"/" D" with the
           highest log-likelihood. Few-shot examples come from the dev split of the subject.
  cloze    "Question: ...\nAnswer:" and each choice's own text as the continuation; reports
           accuracy on the summed log-likelihood and on the per-character one ("acc_norm").
Accuracy is the mean over questions ("micro"), and the mean of per-subject accuracies
("macro") is reported beside it.
"""

from __future__ import annotations

import csv
import glob
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from megatron_lm2.cli_errors import UserInputError

LETTERS = ("A", "B", "C", "D")


class MMLUDataError(UserInputError):
    pass


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def _answer_index(value, where: str, n: int) -> int:
    if isinstance(value, str):
        v = value.strip()
        if v.upper() in LETTERS[:n]:
            return LETTERS.index(v.upper())
        if v.isdigit():
            value = int(v)
        else:
            raise MMLUDataError(f"{where}: answer {value!r} is neither a letter A-{LETTERS[n - 1]} nor an index")
    index = int(value)
    if not 0 <= index < n:
        raise MMLUDataError(f"{where}: answer index {index} outside 0..{n - 1}")
    return index


def _read_csv(path: str, subject: str) -> list[Question]:
    """The original release: no header; question, A, B, C, D, answer letter."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if line_no == 1 and [c.strip().lower() for c in row[:2]] == ["question", "a"]:
                continue  # a header some copies add
            if len(row) < 6:
                raise MMLUDataError(f"{path}, line {line_no}: expected 6 columns, got {len(row)}")
            out.append(Question(subject, row[0], tuple(row[1:5]), _answer_index(row[5], f"{path}, line {line_no}", 4)))
    return out


def _read_parquet(path: str, default_subject: str) -> list[Question]:
    """The hub layout (cais/mmlu): columns question, subject, choices (list), answer (int)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in ("question", "choices", "answer") if c not in table.column_names]
    if missing:
        raise MMLUDataError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    out = []
    for i, row in enumerate(table.to_pylist()):
        choices = tuple(row["choices"])
        out.append(Question(row.get("subject") or default_subject, row["question"], choices,
                            _answer_index(row["answer"], f"{path}, row {i}", len(choices))))
    return out


def load_mmlu(root: str, split: str = "test", subjects: Optional[Sequence[str]] = None) -> list[Question]:
    """Questions of one split. Layouts under root (first match wins):
        {split}/{subject}_{split}.csv, data/{split}/{subject}_{split}.csv   (original tarball)
        {subject}/{split}-*.parquet, all/{split}-*.parquet                   (hub parquet)
    """
    if not os.path.isdir(root):
        raise MMLUDataError(f"MMLU data directory {root} does not exist")
    esc = glob.escape(root)
    for base in (os.path.join(esc, split), os.path.join(esc, "data", split)):
        files = sorted(glob.glob(os.path.join(base, f"*_{split}.csv")))
        if files:
            questions = []
            for path in files:
                subject = os.path.basename(path)[: -len(f"_{split}.csv")]
                if subjects is None or subject in subjects:
                    questions.extend(_read_csv(path, subject))
            return questions
    files = sorted(glob.glob(os.path.join(esc, "*", f"{split}-*.parquet")))
    per_subject = [f for f in files if os.path.basename(os.path.dirname(f)) not in ("all", "auxiliary_train")]
    if per_subject:
        questions = []
        for path in per_subject:
            subject = os.path.basename(os.path.dirname(path))
            if subjects is None or subject in subjects:
                questions.extend(_read_parquet(path, subject))
        return questions
    files = sorted(glob.glob(os.path.join(esc, "all", f"{split}-*.parquet")))
    if files:
        questions = [q for path in files for q in _read_parquet(path, "all")]
        return [q for q in questions if subjects is None or q.subject in subjects]
    raise MMLUDataError(
        f"no MMLU {split} data under {root}: looked for {split}/*_{split}.csv, data/{split}/*_{split}.csv, "
        f"*/{split}-*.parquet and all/{split}-*.parquet"
    )


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
    raise ValueError(f"unknown MMLU format {fmt!r}; expected 'letters' or 'cloze'")


def build_context(q: Question, fmt: str, shots: Sequence[Question] = ()) -> str:
    header = (f"The following are multiple choice questions (with answers) about {_subject_title(q.subject)}.\n\n"
              if fmt == "letters" else "")
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
        ids = (ctx + cont)[-self.max_length:]
        n_context = len(ids) - len(cont)
        if n_context < 1:
            raise ValueError("the continuation alone fills the model's context")
        return continuation_logprob(self.logits(ids), ids, n_context)


class HFScorer(_Scorer):
    def __init__(self, model, tokenizer, max_length: Optional[int] = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 2048)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def logits(self, ids):
        x = torch.tensor([list(ids)], device=self.model.device)
        return self.model(input_ids=x).logits[0].float().cpu()


class MegatronScorer(_Scorer):
    def __init__(self, model, tokenizer, max_length: Optional[int] = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length or model.config.seq_length

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    @torch.no_grad()
    def logits(self, ids):
        from megatron_lm2.eval.decode import _gather_vocab
        from megatron_lm2.model import attention_mask

        self.model.eval()
        device = next(self.model.parameters()).device
        x = torch.tensor([list(ids)], device=device)
        # The window mask as in training (None is Megatron's plain causal mask, which would
        # let a windowed model attend across windows it never saw together).
        mask = attention_mask(len(ids), getattr(self.model.config, "attention_window", None), device)
        return _gather_vocab(self.model(x, torch.arange(len(ids), device=device)[None], mask))[0].float().cpu()


# ------------------------------------------------------------------------------ scoring
@dataclass
class MMLUResult:
    accuracy: float  # micro, percent
    macro_accuracy: float
    accuracy_norm: Optional[float]  # cloze only: per-character normalised
    per_subject: dict
    total: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def score_mmlu(scorer: _Scorer, questions: Sequence[Question], fmt: str = "letters",
               dev: Sequence[Question] = (), shots: int = 0, progress: bool = True) -> MMLUResult:
    if not questions:
        raise MMLUDataError("no MMLU questions to score")
    dev_by_subject = defaultdict(list)
    for q in dev:
        dev_by_subject[q.subject].append(q)
    hits, hits_norm = defaultdict(list), []
    for q in tqdm(questions, desc=f"mmlu ({fmt}, {shots}-shot)", disable=not progress):
        examples = dev_by_subject[q.subject][:shots]
        if len(examples) < shots:
            raise MMLUDataError(f"subject {q.subject}: {shots}-shot needs {shots} dev questions, has {len(examples)}")
        context = build_context(q, fmt, examples)
        scores = [scorer.loglikelihood(context, c) for c in continuations(q, fmt)]
        hits[q.subject].append(max(range(len(scores)), key=scores.__getitem__) == q.answer)
        if fmt == "cloze":
            norm = [s / max(1, len(c)) for s, c in zip(scores, continuations(q, fmt))]
            hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == q.answer)
    all_hits = [h for hs in hits.values() for h in hs]
    per_subject = {s: 100.0 * sum(h) / len(h) for s, h in sorted(hits.items())}
    return MMLUResult(
        accuracy=100.0 * sum(all_hits) / len(all_hits),
        macro_accuracy=sum(per_subject.values()) / len(per_subject),
        accuracy_norm=100.0 * sum(hits_norm) / len(hits_norm) if hits_norm else None,
        per_subject=per_subject,
        total=len(all_hits),
    )


__all__ = ["Question", "load_mmlu", "score_mmlu", "HFScorer", "MegatronScorer", "build_context",
           "continuations", "continuation_logprob", "MMLUResult", "MMLUDataError"]
