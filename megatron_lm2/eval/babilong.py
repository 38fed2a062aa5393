"""The BABILong harness: prompts, greedy answers, the benchmark's answer rule, the report.

    results = run_babilong(generate, data_root, tasks, lengths, output_dir, header=...)

`generate(prompt: str) -> str` is any greedy decoder (megatron_lm2.eval.decode). Each
(task, length) cell writes output_dir/{task}_{length}.jsonl (one line per sample: target,
question, output, correct) atomically when the cell is done, so an interrupted run resumes at
the first missing cell; run.json holds the protocol header, and a rerun with another protocol
(prompt revision, BOS, decoding) into the same directory is refused rather than mixed.

What the report averages is always said:
  * a per-length mean is over the run's task set, and marked incomplete (with the missing
    tasks) where a task has no result at that length;
  * QA1-QA5 (what the benchmark's README tables average) and QA1-QA10 means per length, only
    where all of those tasks have a result;
  * the paper's length buckets 0K, 1K, 2K, 4K and 8K+, where 8K+ is given twice because the
    LM2 paper's Table 1 and its caption disagree on it: 8k-64k and 8k-128k. A bucket is the mean
    of its lengths' means and needs each of them complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.eval.answers import TASKS, is_correct
from megatron_lm2.eval.babilong_data import DataError, load_split
from megatron_lm2.eval.prompts import DEFAULT_REVISION, PROMPT_PARTS, build_prompt
from megatron_lm2.fileio import write_text_atomic

LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k")
TASK_SETS = {"qa1-qa5": TASKS[:5], "qa1-qa10": TASKS}
AVERAGES = {"8k-64k": ("8k", "16k", "32k", "64k"), "8k-128k": ("8k", "16k", "32k", "64k", "128k")}
BUCKETS = {"0K": ("0k",), "1K": ("1k",), "2K": ("2k",), "4K": ("4k",),
           **{f"8K+ ({name})": lengths for name, lengths in AVERAGES.items()}}


@dataclass
class Cell:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else float("nan")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass
class BabilongResults:
    cells: dict = field(default_factory=dict)  # (task, length) -> Cell
    tasks: Optional[tuple] = None  # the run's task set; None: the tasks that have a cell
    header: dict = field(default_factory=dict)  # the protocol: prompt revision, BOS, decoding, shots

    def task_set(self) -> tuple:
        if self.tasks is not None:
            return tuple(self.tasks)
        present = {t for t, _ in self.cells}
        return tuple(t for t in TASKS if t in present) + tuple(sorted(present - set(TASKS)))

    def missing(self, length: str, tasks: Optional[Sequence[str]] = None) -> list[str]:
        return [t for t in (tasks or self.task_set()) if not self._has(t, length)]

    def _has(self, task: str, length: str) -> bool:
        cell = self.cells.get((task, length))
        return cell is not None and cell.total > 0

    def length_mean(self, length: str, tasks: Optional[Sequence[str]] = None) -> Optional[float]:
        """Mean over the task set at one length; None unless every task of it has a result."""
        tasks = tuple(tasks or self.task_set())
        if not tasks or self.missing(length, tasks):
            return None
        return _mean([self.cells[(t, length)].accuracy for t in tasks])

    def partial_mean(self, length: str) -> Optional[float]:
        """Mean over the tasks that do have a result at this length (printed marked incomplete)."""
        values = [self.cells[(t, length)].accuracy for t in self.task_set() if self._has(t, length)]
        return _mean(values) if values else None

    def average(self, lengths: Sequence[str], tasks: Optional[Sequence[str]] = None) -> Optional[float]:
        """Mean of the per-length means; None unless the task set is complete at every length."""
        means = [self.length_mean(l, tasks) for l in lengths]
        if any(m is None for m in means):
            return None
        return _mean(means)

    def _lengths(self) -> list[str]:
        present = {l for _, l in self.cells}
        return [l for l in LENGTHS if l in present] + sorted(present - set(LENGTHS))

    def _set_names(self, distinct: bool = False) -> dict[str, tuple]:
        """{"run": the run's task set, "qa1-qa5": ..., "qa1-qa10": ...}; distinct: without the
        named sets equal to the run's (for the printed table)."""
        run = self.task_set()
        return {"run": run, **{name: ts for name, ts in TASK_SETS.items() if not (distinct and ts == run)}}

    def to_dict(self) -> dict:
        lengths = self._lengths()
        per_length = {}
        for l in lengths:
            missing = self.missing(l)
            per_length[l] = {"mean": self.length_mean(l) if not missing else self.partial_mean(l),
                             "complete": not missing, "missing": missing}
        return {
            "header": self.header,
            "tasks": list(self.task_set()),
            "cells": {f"{t}/{l}": {"correct": c.correct, "total": c.total, "accuracy": c.accuracy}
                      for (t, l), c in self.cells.items()},
            "per_length": per_length,
            "task_sets": {name: {l: self.length_mean(l, ts) for l in lengths} for name, ts in TASK_SETS.items()},
            "buckets": {name: {b: self.average(ls, ts) for b, ls in BUCKETS.items()}
                        for name, ts in self._set_names().items()},
            "averages": {name: self.average(ls) for name, ls in AVERAGES.items()},
        }

    def header_lines(self) -> list[str]:
        return [f"{key}: {value}" for key, value in self.header.items()]

    def table(self) -> str:
        """The header, a Markdown table (tasks down, lengths across, then the means), the buckets."""
        tasks, lengths = self.task_set(), self._lengths()
        run_name = ",".join(tasks)
        fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
        rows = self.header_lines() + [""] if self.header else []
        rows += ["| task | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for t in tasks:
            cells = [self.cells.get((t, l)) for l in lengths]
            rows.append(f"| {t} | " + " | ".join("" if c is None else f"{c.accuracy:.1f}" for c in cells) + " |")
        incomplete = {l: self.missing(l) for l in lengths if self.missing(l)}
        run_means = [fmt(self.length_mean(l)) if l not in incomplete else fmt(self.partial_mean(l)) + "*"
                     for l in lengths]
        rows.append(f"| mean ({run_name}) | " + " | ".join(run_means) + " |")
        for name, ts in TASK_SETS.items():
            if ts != tasks:
                rows.append(f"| mean {name} | " + " | ".join(fmt(self.length_mean(l, ts)) or "n/a" for l in lengths)
                            + " |")
        if incomplete:
            rows.append("")
            rows += [f"* {l}: incomplete, mean over the tasks present (missing {', '.join(m)})"
                     for l, m in incomplete.items()]
        rows += ["", "| length bucket | " + " | ".join(BUCKETS) + " |", "|---" * (len(BUCKETS) + 1) + "|"]
        for name, ts in self._set_names(distinct=True).items():
            label = f"mean ({run_name})" if name == "run" else f"mean {name}"
            rows.append(f"| {label} | " + " | ".join(fmt(self.average(ls, ts)) or "n/a" for ls in BUCKETS.values())
                        + " |")
        rows.append("")
        for name, ls in AVERAGES.items():
            value = self.average(ls)
            rows.append(f"average {name} ({run_name}): "
                        + (f"n/a (needs {', '.join(ls)} complete)" if value is None else f"{value:.1f}"))
        return "\n".join(rows)


def _write_atomic(path: str, text: str) -> None:
    write_text_atomic(path, text, fsync=False, unique=True)


def _read_cell(path: str) -> Cell:
    correct = total = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                verdict = row["correct"]
            except (json.JSONDecodeError, TypeError, KeyError) as exc:
                raise DataError(f"{path}, line {number}: not a result row of this harness ({exc}); "
                                f"delete the file to evaluate the cell again") from exc
            total += 1
            correct += bool(verdict)
    return Cell(correct, total)


def check_output_dir(output_dir: str, header: dict) -> None:
    """Refuse to mix cells made under another protocol into one report; record this run's."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "run.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                before = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: invalid JSON: {exc.msg}") from exc
        keys = list(header) + [k for k in before if k not in header]
        changed = [k for k in keys if before.get(k) != header.get(k)]
        if changed:
            k = changed[0]
            raise UserInputError(f"--output {output_dir} holds results made with {k} = {before.get(k)!r}, "
                                 f"this run has {header.get(k)!r}; use another --output directory")
    _write_atomic(path, json.dumps(header, indent=2))


def evaluate_cell(generate: Callable[[str], str], records: Sequence[dict], task: str,
                  progress: bool = True, desc: str = "", revision: str = DEFAULT_REVISION,
                  prompt_parts: Sequence[str] = PROMPT_PARTS) -> tuple[Cell, list[dict]]:
    rows = []
    use = {f"use_{part}": part in prompt_parts for part in PROMPT_PARTS}
    for record in tqdm(records, desc=desc or task, disable=not progress, leave=False):
        prompt = build_prompt(task, record["input"], record["question"], revision=revision, **use)
        output = generate(prompt)
        rows.append({"target": record["target"], "question": record["question"], "output": output,
                     "correct": is_correct(record["target"], output, record["question"], task)})
    return Cell(sum(r["correct"] for r in rows), len(rows)), rows


def protocol_header(revision: str = DEFAULT_REVISION, bos: str = "off", max_new_tokens: int = 20,
                    prompt_parts: Sequence[str] = PROMPT_PARTS) -> dict:
    """What a BABILong score depends on besides the model, as the report prints it."""
    from megatron_lm2.eval.prompts import revision_source

    parts = ", ".join(prompt_parts) or "none (the bare context and question)"
    return {
        "prompt_revision": revision,
        "prompt_source": revision_source(revision),
        "prompt_parts": parts + (" (the benchmark's full config)" if tuple(prompt_parts) == PROMPT_PARTS else ""),
        "shots": ("the benchmark's in-context examples inside the prompt (2-3 per task)" if "examples" in prompt_parts
                  else "none (0-shot: the in-context examples are off)") + "; no other shots",
        "bos": bos,
        "decoding": f"greedy, {max_new_tokens} new tokens, no sampling, 1 beam",
        "answer_rule": "booydar/babilong metrics.py compare_answers (multi-object targets included)",
    }


def run_babilong(
    generate: Callable[[str], str],
    data_root: str,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[str] = LENGTHS,
    output_dir: Optional[str] = None,
    limit: Optional[int] = None,
    progress: bool = True,
    loader: Callable[[str, str, str, Optional[int]], list] = load_split,
    revision: str = DEFAULT_REVISION,
    header: Optional[dict] = None,
    prompt_parts: Sequence[str] = PROMPT_PARTS,
) -> BabilongResults:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserInputError(f"--tasks: unknown task(s) {unknown}; the harness covers {', '.join(TASKS)}")
    header = dict(header) if header is not None else protocol_header(revision, prompt_parts=prompt_parts)
    if header.get("prompt_revision", revision) != revision:
        raise ValueError(f"header names prompt revision {header['prompt_revision']!r}, the run uses {revision!r}")
    results = BabilongResults(tasks=tuple(tasks), header=header)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        check_output_dir(output_dir, header)
    for length in lengths:
        for task in tasks:
            path = os.path.join(output_dir, f"{task}_{length}.jsonl") if output_dir else None
            if path and os.path.exists(path):
                results.cells[(task, length)] = _read_cell(path)  # resume: the cell is done
                continue
            records = loader(data_root, task, length, limit)
            cell, rows = evaluate_cell(generate, records, task, progress, desc=f"{task} {length}", revision=revision,
                                       prompt_parts=prompt_parts)
            results.cells[(task, length)] = cell
            if path:
                _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    if output_dir:
        _write_atomic(os.path.join(output_dir, "summary.json"), json.dumps(results.to_dict(), indent=2))
    return results
