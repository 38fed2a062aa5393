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


def _read_json(path: str) -> tuple[list, list[str]]:
    """(records, where each one is) from a JSON array of records, a JSON object of columns (or
    {"data": [...]}), or JSON lines. Records are returned as parsed (validated by load_split)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if stripped.startswith("["):
                raise DataError(f"{path}, line {exc.lineno}: invalid JSON: {exc.msg}") from exc
            obj = None  # several objects: JSON lines, read below
        if isinstance(obj, list):
            return obj, [f"record {i}" for i in range(1, len(obj) + 1)]
        if isinstance(obj, dict):
            if all(isinstance(obj.get(k), list) for k in FIELDS):
                columns = [obj[k] for k in FIELDS]
                if len({len(c) for c in columns}) > 1:
                    raise DataError(f"{path}: columns {', '.join(FIELDS)} have different lengths "
                                    f"({', '.join(str(len(c)) for c in columns)})")
                rows = [dict(zip(FIELDS, row)) for row in zip(*columns)]
                return rows, [f"record {i}" for i in range(1, len(rows) + 1)]
            if isinstance(obj.get("data"), list):
                return obj["data"], [f"record {i}" for i in range(1, len(obj["data"]) + 1)]
            return [obj], ["record 1"]
    records, where = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: invalid JSON: {exc.msg}") from exc
        where.append(f"line {number}")
    return records, where


def _read_table(fmt: str, files: list[str]) -> tuple[list, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict] = []
    where: list[str] = []
    for path in files:
        try:
            if fmt == "parquet":
                table = pq.read_table(path, columns=None)
            else:  # datasets' save_to_disk writes Arrow IPC streams
                with pa.memory_map(path) as source:
                    try:
                        table = pa.ipc.open_stream(source).read_all()
                    except pa.ArrowInvalid:
                        table = pa.ipc.open_file(source).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: cannot read it as {fmt}: {exc}") from exc
        missing = [k for k in FIELDS if k not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; has {table.column_names}")
        part = table.select(list(FIELDS)).to_pylist()
        rows.extend(part)
        where.extend(f"{os.path.basename(path)} row {i}" for i in range(1, len(part) + 1))
    return rows, where


def _kind(value) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def validate_record(record, where: str) -> dict:
    """{'input', 'question', 'target'} as strings, or DataError naming the record: a record must be
    an object whose three fields are strings (a null or list target would be scored as the text
    "None" or "['a', 'b']", which no answer can match)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: is {_kind(record)}, expected an object with fields {', '.join(FIELDS)}")
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise DataError(f"{where}: lacks field(s) {', '.join(missing)}")
    for k in FIELDS:
        if not isinstance(record[k], str):
            raise DataError(f"{where}: field {k!r} is {_kind(record[k])}, expected a string")
    return {k: record[k] for k in FIELDS}


def load_split(root: str, task: str, length: str, limit: int | None = None) -> list[dict]:
    """The records of one task and length, each {'input', 'question', 'target'} (str); a bad record
    is a DataError naming the file and the record (counted from 1) or line."""
    fmt, files = find_split(root, task, length)
    records, where = _read_json(files[0]) if fmt == "json" else _read_table(fmt, files)
    prefix = f"{files[0]}, " if fmt == "json" else f"{os.path.dirname(files[0])}/"
    out = []
    for record, place in zip(records, where):
        out.append(validate_record(record, prefix + place))
        if limit is not None and len(out) >= limit:
            break
    return out
