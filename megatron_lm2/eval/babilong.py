"""The BABILong harness: prompts, greedy answers, the benchmark's answer rule, the table.

    results = run_babilong(generate, data_root, tasks, lengths, output_dir)

`generate(prompt: str) -> str` is any greedy decoder (megatron_lm2.eval.decode). Each
(task, length) cell writes output_dir/{task}_{length}.jsonl (one line per sample: target,
output, correct) atomically when the cell is done, so an interrupted run resumes at the
first missing cell. The summary holds per-cell accuracy (percent) and the averages over
8K-64K and over 8K-128K: the LM2 paper's Table 1 and its caption differ on which one
"8K+" means, so both are reported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from megatron_lm2.eval.answers import TASKS, is_correct
from megatron_lm2.eval.babilong_data import load_split
from megatron_lm2.eval.prompts import build_prompt

LENGTHS = ("0k", "1k", "2k", "4k", "8k", "16k", "32k", "64k", "128k")
AVERAGES = {"8k-64k": ("8k", "16k", "32k", "64k"), "8k-128k": ("8k", "16k", "32k", "64k", "128k")}


@dataclass
class Cell:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / self.total if self.total else float("nan")


@dataclass
class BabilongResults:
    cells: dict = field(default_factory=dict)  # (task, length) -> Cell

    def length_mean(self, length: str) -> Optional[float]:
        """Mean over tasks at one length (tasks that have the cell)."""
        values = [c.accuracy for (t, l), c in self.cells.items() if l == length and c.total]
        return sum(values) / len(values) if values else None

    def average(self, lengths: Sequence[str]) -> Optional[float]:
        """Mean over tasks and the given lengths; None unless every length was evaluated."""
        means = [self.length_mean(l) for l in lengths]
        if any(m is None for m in means):
            return None
        return sum(means) / len(means)

    def to_dict(self) -> dict:
        per_cell = {f"{t}/{l}": {"correct": c.correct, "total": c.total, "accuracy": c.accuracy}
                    for (t, l), c in self.cells.items()}
        lengths = self._lengths()
        return {
            "cells": per_cell,
            "per_length": {l: self.length_mean(l) for l in lengths},
            "averages": {name: self.average(ls) for name, ls in AVERAGES.items()},
        }

    def _lengths(self) -> list[str]:
        present = {l for _, l in self.cells}
        return [l for l in LENGTHS if l in present] + sorted(present - set(LENGTHS))

    def table(self) -> str:
        """A Markdown table: tasks down, lengths across, then the per-length means."""
        tasks = [t for t in TASKS if any(t == ct for ct, _ in self.cells)]
        lengths = self._lengths()
        rows = ["| task | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for t in tasks:
            cells = [self.cells.get((t, l)) for l in lengths]
            rows.append(f"| {t} | " + " | ".join("" if c is None else f"{c.accuracy:.1f}" for c in cells) + " |")
        means = [self.length_mean(l) for l in lengths]
        rows.append("| mean | " + " | ".join("" if m is None else f"{m:.1f}" for m in means) + " |")
        rows.append("")
        for name, ls in AVERAGES.items():
            value = self.average(ls)
            rows.append(f"average {name}: " + ("n/a (needs " + ", ".join(ls) + ")" if value is None else f"{value:.1f}"))
        return "\n".join(rows)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_cell(path: str) -> Cell:
    correct = total = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                total += 1
                correct += bool(json.loads(line)["correct"])
    return Cell(correct, total)


def evaluate_cell(generate: Callable[[str], str], records: Sequence[dict], task: str,
                  progress: bool = True, desc: str = "") -> tuple[Cell, list[dict]]:
    rows = []
    for record in tqdm(records, desc=desc or task, disable=not progress, leave=False):
        prompt = build_prompt(task, record["input"], record["question"])
        output = generate(prompt)
        rows.append({"target": record["target"], "question": record["question"], "output": output,
                     "correct": is_correct(record["target"], output, record["question"], task)})
    return Cell(sum(r["correct"] for r in rows), len(rows)), rows


def run_babilong(
    generate: Callable[[str], str],
    data_root: str,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[str] = LENGTHS,
    output_dir: Optional[str] = None,
    limit: Optional[int] = None,
    progress: bool = True,
    loader: Callable[[str, str, str, Optional[int]], list] = load_split,
) -> BabilongResults:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the harness covers {', '.join(TASKS)}")
    results = BabilongResults()
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    for length in lengths:
        for task in tasks:
            path = os.path.join(output_dir, f"{task}_{length}.jsonl") if output_dir else None
            if path and os.path.exists(path):
                results.cells[(task, length)] = _read_cell(path)  # resume: the cell is done
                continue
            records = loader(data_root, task, length, limit)
            cell, rows = evaluate_cell(generate, records, task, progress, desc=f"{task} {length}")
            results.cells[(task, length)] = cell
            if path:
                _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    if output_dir:
        _write_atomic(os.path.join(output_dir, "summary.json"), json.dumps(results.to_dict(), indent=2))
    return results
