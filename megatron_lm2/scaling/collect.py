"""`lm2-sweep collect`: the run list joined with every run's metrics.jsonl -> one table.

One row per planned run: its identity (group, family, rung, memory-axis value), parameters
(total / base / memory / non-embedding / embedding), executed FLOPs per token, planned and
trained tokens and compute, the final validation and training loss, the validation loss
interpolated at every isoFLOP budget of the sweep from the run's validation curve (linear in
log compute between evaluations; empty outside the curve, Porian et al.'s reading of isoFLOP
points off intermediate checkpoints), and the memory-sensitive split: the final validation
loss of memory chunk 0 (which reads only M_0) and the mean over later chunks (which read what
the earlier chunks wrote), from the trainer's `val_loss_by_chunk` when it logged it.

metrics.jsonl records (megatron_lm2/training/metrics.py): one JSON object per line with
`kind` "train" (step, loss, ...) or "valid" (step, loss[, val_loss_by_chunk]). A step logged
twice (a resumed run) keeps its last record.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megatron_lm2.fileio import atomic_path
from megatron_lm2.scaling.plan import Run, SweepPlan
from megatron_lm2.scaling.submit import is_finished
from megatron_lm2.scaling.util import SweepDataError, atomic_write_text

CHUNK_KEY = "val_loss_by_chunk"
END_TOLERANCE = 0.02  # a target compute this close beyond the curve's ends reads the end point


@dataclass
class Curves:
    train: List[Tuple[int, float]]
    valid: List[Tuple[int, float]]
    last_chunks: Optional[List[float]]  # val_loss_by_chunk of the last validation record


def read_metrics(path: str) -> Curves:
    """Train and validation curves of one metrics.jsonl; SweepDataError names line and key."""
    train: Dict[int, float] = {}
    valid: Dict[int, Tuple[float, Optional[list]]] = {}
    with open(path) as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                continue  # a torn last line: the run was killed mid-write
            raise SweepDataError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise SweepDataError(f"{path}:{number}: not a JSON object")
        kind = record.get("kind", "train")
        for key in ("step", "loss"):
            if key not in record:
                raise SweepDataError(f"{path}:{number}: {kind} record has no {key!r}")
        try:
            step, loss = int(record["step"]), float(record["loss"])
        except (TypeError, ValueError):
            raise SweepDataError(f"{path}:{number}: 'step'/'loss' are not numbers: "
                                 f"{record['step']!r}, {record['loss']!r}") from None
        if kind == "valid":
            chunks = record.get(CHUNK_KEY)
            if chunks is not None and (not isinstance(chunks, list) or not all(
                    isinstance(x, (int, float)) for x in chunks)):
                raise SweepDataError(f"{path}:{number}: {CHUNK_KEY!r} is not a list of numbers")
            valid[step] = (loss, chunks)
        elif kind == "train":
            train[step] = loss
    last = valid[max(valid)][1] if valid else None
    return Curves(train=sorted(train.items()), valid=sorted((s, v[0]) for s, v in valid.items()), last_chunks=last)


def loss_at_compute(points: List[Tuple[float, float]], target: float) -> Optional[float]:
    """Loss at `target` compute from (compute, loss) points, linear in log compute; None outside
    the points (beyond END_TOLERANCE)."""
    if not points:
        return None
    xs = [math.log(c) for c, _ in points]
    t = math.log(target)
    if t < xs[0] - END_TOLERANCE or t > xs[-1] + END_TOLERANCE:
        return None
    if t <= xs[0]:
        return points[0][1]
    if t >= xs[-1]:
        return points[-1][1]
    for (x0, (_, y0)), (x1, (_, y1)) in zip(zip(xs, points), zip(xs[1:], points[1:])):
        if x0 <= t <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (t - x0) / (x1 - x0)
    return None


def _budgets(plan: SweepPlan) -> List[float]:
    return sorted({r.budget for r in plan.runs if r.budget is not None})


def budget_column(budget: float) -> str:
    return f"val_loss_at_{budget:.3g}"


def collect_row(run: Run, seq_length: int, budgets: List[float]) -> dict:
    params = run.parameters
    row = dict(run_id=run.id, group=run.group, family=run.family, rung=run.rung, axis_value=run.axis_value or "",
               budget=run.budget if run.budget is not None else "", status="missing",
               params_total=params["total"], params_base=params["base"], params_memory=params["memory"],
               params_non_embedding=params["non_embedding"], params_embedding=params["embedding"],
               flops_per_token=run.flops_per_token, tokens=run.tokens, compute=run.compute,
               steps=run.steps, steps_done=0, tokens_done=0, compute_done=0.0,
               final_val_loss="", final_train_loss="", val_loss_chunk0="", val_loss_later_chunks="",
               chunk_gap="", memory_chunks="")
    for budget in budgets:
        row[budget_column(budget)] = ""
    path = os.path.join(run.run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return row
    curves = read_metrics(path)
    tokens_per_step = run.global_batch_size * seq_length
    steps_done = max([s for s, _ in curves.train + curves.valid], default=0)
    row.update(status="finished" if is_finished(run) else "partial", steps_done=steps_done,
               tokens_done=steps_done * tokens_per_step,
               compute_done=steps_done * tokens_per_step * run.flops_per_token)
    if curves.valid:
        row["final_val_loss"] = curves.valid[-1][1]
        points = [(s * tokens_per_step * run.flops_per_token, loss) for s, loss in curves.valid if s > 0]
        for budget in budgets:
            value = loss_at_compute(points, budget)
            row[budget_column(budget)] = "" if value is None else value
    if curves.train:
        row["final_train_loss"] = curves.train[-1][1]
    chunks = curves.last_chunks
    if chunks:
        row["memory_chunks"] = len(chunks)
        row["val_loss_chunk0"] = chunks[0]
        if len(chunks) > 1:
            later = sum(chunks[1:]) / (len(chunks) - 1)
            row["val_loss_later_chunks"] = later
            row["chunk_gap"] = chunks[0] - later
    return row


def collect(plan: SweepPlan) -> Tuple[List[dict], List[str]]:
    """(rows, notes): one row per planned run; notes say what is missing."""
    seq = plan.spec.get("model", {}).get("seq_length")
    if not seq:
        raise SweepDataError(f"{plan.out}/plan.json: spec.model.seq_length is missing")
    budgets = _budgets(plan)
    rows = [collect_row(run, seq, budgets) for run in plan.runs]
    notes = []
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "partial", "missing")}
    notes.append(f"{len(rows)} runs: {counts['finished']} finished, {counts['partial']} partial, "
                 f"{counts['missing']} without metrics.jsonl")
    with_valid = [r for r in rows if r["final_val_loss"] != ""]
    no_split = [r["run_id"] for r in with_valid if r["val_loss_chunk0"] == ""]
    if no_split:
        notes.append(f"{CHUNK_KEY} missing in {len(no_split)} of {len(with_valid)} runs with validation "
                     f"records (e.g. {no_split[0]}): the memory-chunk split is empty for them")
    return rows, notes


def columns(rows: List[dict]) -> List[str]:
    names: List[str] = []
    for row in rows:
        for key in row:
            if key not in names:
                names.append(key)
    return names


def write_table(rows: List[dict], path: str) -> str:
    """csv, or parquet when the path ends in .parquet (pyarrow); atomic either way."""
    names = columns(rows)
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({name: [(None if row.get(name, "") == "" else row.get(name)) for row in rows]
                          for name in names})
        with atomic_path(path, fsync=False) as tmp:
            pq.write_table(table, tmp)
        return path
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
    return path
