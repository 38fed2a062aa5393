"""Read a local copy of the BABILong data: records with `input`, `question`, `target` for one
task (qa1-qa10) and one length (0k ... 128k). No hub access at run time.

Layouts found under `root` (the first that exists wins; `{L}` = length, `{T}` = task):
    {L}/{T}-00000-of-0000N.parquet     the hub repos' parquet shards (RMT-team/babilong, -1k-samples)
    {L}/{T}.parquet, {T}/{L}.parquet
    data/{T}/{L}.json  (+ .jsonl)      the hub repo's JSON files (a JSON array or JSON lines)
    {T}/{L}.json, {L}/{T}.json         (+ .jsonl)
    {L}/{T}/  or  {T}/{L}/             a datasets `save_to_disk` split (data-*.arrow + state.json)
    {L}/  with dataset_dict.json       `save_to_disk` of a DatasetDict whose splits are tasks
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

from megatron_lm2.cli_errors import UserInputError

FIELDS = ("input", "question", "target")


class DataError(UserInputError):
    pass


def _candidates(root: str, task: str, length: str) -> Iterator[tuple[str, list[str]]]:
    for pattern in (f"{length}/{task}-*.parquet", f"{length}/{task}.parquet", f"{task}/{length}.parquet",
                    f"{task}/{length}-*.parquet"):
        files = sorted(glob.glob(os.path.join(glob.escape(root), pattern)))
        if files:
            yield "parquet", files
    for rel in (f"data/{task}/{length}", f"{task}/{length}", f"{length}/{task}"):
        for ext in (".json", ".jsonl"):
            path = os.path.join(root, rel + ext)
            if os.path.isfile(path):
                yield "json", [path]
    for rel in (f"{length}/{task}", f"{task}/{length}"):
        files = sorted(glob.glob(os.path.join(glob.escape(os.path.join(root, rel)), "data-*.arrow")))
        if files:
            yield "arrow", files


def find_split(root: str, task: str, length: str) -> tuple[str, list[str]]:
    """(format, files) of one task and length under root; DataError naming what was tried."""
    if not os.path.isdir(root):
        raise DataError(f"BABILong data directory {root} does not exist")
    for found in _candidates(root, task, length):
        return found
    raise DataError(
        f"no BABILong data for task {task} at length {length} under {root}: looked for "
        f"{length}/{task}-*.parquet, data/{task}/{length}.json(l), {task}/{length}.json(l), "
        f"{length}/{task}/data-*.arrow (and the task/length swaps); see docs/eval.md"
    )


def _read_json(path: str) -> list[dict]:
    """A JSON array of records, a JSON object of columns (or {"data": [...]}), or JSON lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if stripped.startswith("["):
                raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
            obj = None  # several objects: JSON lines, read below
        if isinstance(obj, list):
            return obj
        if isinstance(obj, dict):
            if all(isinstance(obj.get(k), list) for k in FIELDS):
                return [dict(zip(FIELDS, row)) for row in zip(*(obj[k] for k in FIELDS))]
            if isinstance(obj.get("data"), list):
                return obj["data"]
            return [obj]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: invalid JSON: {exc.msg}") from exc
    return records


def _read_table(fmt: str, files: list[str]) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for path in files:
        if fmt == "parquet":
            table = pq.read_table(path, columns=None)
        else:  # datasets' save_to_disk writes Arrow IPC streams
            with pa.memory_map(path) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
        missing = [k for k in FIELDS if k not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; has {table.column_names}")
        rows.extend(table.select(list(FIELDS)).to_pylist())
    return rows


def load_split(root: str, task: str, length: str, limit: int | None = None) -> list[dict]:
    """The records of one task and length, each {'input', 'question', 'target'} (str)."""
    fmt, files = find_split(root, task, length)
    records = _read_json(files[0]) if fmt == "json" else _read_table(fmt, files)
    out = []
    for i, record in enumerate(records):
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise DataError(f"{files[0]}: record {i} lacks field(s) {missing}")
        out.append({k: str(record[k]) for k in FIELDS})
        if limit is not None and len(out) >= limit:
            break
    return out
