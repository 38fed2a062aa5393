"""Read a local copy of MMLU: the original release's csv files or the hub's parquet (layouts in
load_mmlu). No torch here: the CLI checks the data before it loads a model."""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from typing import Optional, Sequence

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
    if isinstance(value, bool) or not isinstance(value, int):
        raise MMLUDataError(f"{where}: answer {value!r} is neither a letter A-{LETTERS[n - 1]} nor an index")
    index = value
    if not 0 <= index < n:
        raise MMLUDataError(f"{where}: answer index {index} outside 0..{n - 1}")
    return index


def _read_csv(path: str, subject: str) -> list[Question]:
    """The original release: no header; question, A, B, C, D, answer letter."""
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as exc:
        raise MMLUDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise MMLUDataError(f"{path}: not a csv file: {exc}") from exc
    for line_no, row in enumerate(rows, start=1):
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MMLUDataError(f"{path}: cannot read it as parquet: {exc}") from exc
    missing = [c for c in ("question", "choices", "answer") if c not in table.column_names]
    if missing:
        raise MMLUDataError(f"{path}: missing column(s) {missing}; has {table.column_names}")
    out = []
    for i, row in enumerate(table.to_pylist()):
        if not isinstance(row["question"], str) or not isinstance(row["choices"], list) or not all(
                isinstance(c, str) for c in row["choices"]):
            raise MMLUDataError(f"{path}, row {i}: question must be a string and choices a list of strings")
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
