"""Input discovery and streaming readers: SmolLM-corpus parquet and jsonl / jsonl.gz / jsonl.zst.

Inputs are cut into ``Task`` s of at most ``rows_per_task`` rows, in file order. A parquet task
names a row group and a row slice; the worker reads it itself (only that row group, only the text
column). A jsonl task carries the raw lines, read sequentially by the producer (compressed
streams cannot be seeked); the worker decodes and validates them. Either way no input is loaded
whole.

Every row gets exactly one outcome: a text, or a skip reason from ``SKIP_REASONS``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_lm2.cli_errors import UserInputError

SKIP_REASONS = (
    "bad_json",          # a jsonl line that is not JSON, or not a JSON object
    "missing_text",      # the --json-key field / parquet column is absent or null
    "non_string_text",   # the field is not a string
    "empty_text",        # the field is empty or whitespace only
    "invalid_utf8",      # the line / value is not valid UTF-8
    "corrupt_file",      # a parquet file or row group, or a compressed stream, that cannot be read
)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


class InputError(UserInputError):
    """An input path that does not exist, cannot be read, or is of an unknown type."""


@dataclass(frozen=True)
class InputFile:
    path: str
    subset: str
    kind: str                 # "parquet" or "jsonl"
    size: int

    @property
    def stem(self) -> str:
        name = Path(self.path).name
        for suffix in (".parquet",) + JSONL_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name


@dataclass(frozen=True)
class Task:
    """Rows ``[first_row, first_row + num_rows)`` of input ``file_index``."""

    file_index: int
    first_row: int
    num_rows: int
    path: str
    kind: str
    row_group: int = -1                 # parquet: row group holding the rows
    row_group_offset: int = 0           # parquet: index of first_row inside that row group
    lines: tuple[bytes, ...] = ()       # jsonl: the raw lines
    error: str = ""                     # the rest of the file cannot be read: one corrupt_file row
    end: bool = False                   # sentinel after a file's last task: first_row = rows in file


def _kind(path: Path) -> str | None:
    name = path.name
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def discover_inputs(inputs: list[str], subsets: list[str] | None = None) -> list[InputFile]:
    """Expand ``--input`` values into an ordered file list.

    A value is ``[SUBSET=]PATH``. PATH may be a parquet/jsonl file (subset: its stem), a directory
    of such files (subset: the directory's name), or a SmolLM-corpus root whose sub-directories are
    subsets (``<subset>/train-*.parquet``; ``subsets`` picks which). Files are sorted by name
    inside a directory; the order of ``--input`` values is kept.
    """
    found: list[InputFile] = []
    for value in inputs:
        forced, _, raw = value.rpartition("=") if "=" in value and not Path(value).exists() else ("", "", value)
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"--input {value}: no such file or directory: {path}")
        if path.is_file():
            kind = _kind(path)
            if kind is None:
                raise InputError(f"--input {value}: unknown file type (expected .parquet or {', '.join(JSONL_SUFFIXES)})")
            found.append(_input(path, forced or InputFile(str(path), "", kind, 0).stem, kind))
            continue
        direct = sorted(p for p in path.iterdir() if p.is_file() and _kind(p))
        if direct:
            found.extend(_input(p, forced or path.name, _kind(p)) for p in direct)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and any(_kind(q) for q in p.iterdir()))
        if subsets:
            missing = sorted(set(subsets) - {c.name for c in children})
            if missing:
                raise InputError(f"--subsets {','.join(missing)}: not found under {path} "
                                 f"(available: {', '.join(c.name for c in children) or 'none'})")
            children = [path / s for s in subsets]
        if not children:
            raise InputError(f"--input {value}: no .parquet or .jsonl files in {path} or its sub-directories")
        for child in children:
            files = sorted(p for p in child.iterdir() if p.is_file() and _kind(p))
            found.extend(_input(p, child.name, _kind(p)) for p in files)
    seen: dict[tuple[str, str], str] = {}
    for f in found:
        key = (f.subset, f.stem)
        if key in seen and seen[key] != f.path:
            raise InputError(f"inputs {seen[key]} and {f.path} would write the same shards "
                             f"({f.subset}/{f.stem}); give one of them another subset with SUBSET=PATH")
        seen[key] = f.path
    return found


def _input(path: Path, subset: str, kind: str) -> InputFile:
    if not os.access(path, os.R_OK):
        raise InputError(f"input not readable: {path}")
    return InputFile(str(path.resolve()), subset, kind, path.stat().st_size)


def open_jsonl(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def iter_tasks(file_index: int, f: InputFile, start_row: int, rows_per_task: int,
               max_task_bytes: int = 16 << 20) -> Iterator[Task]:
    """Tasks covering rows ``start_row..end`` of one input file, in order."""
    if f.kind == "parquet":
        yield from _parquet_tasks(file_index, f, start_row, rows_per_task)
    else:
        yield from _jsonl_tasks(file_index, f, start_row, rows_per_task, max_task_bytes)


def _parquet_tasks(file_index: int, f: InputFile, start_row: int, rows_per_task: int) -> Iterator[Task]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(f.path).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
        yield Task(file_index, start_row, 1, f.path, f.kind, error=f"cannot open parquet: {e}")
        yield Task(file_index, start_row + 1, 0, f.path, f.kind, end=True)
        return
    base = 0
    for group, rows in enumerate(sizes):
        for offset in range(0, rows, rows_per_task):
            first = base + offset
            n = min(rows_per_task, rows - offset)
            if first + n <= start_row:
                continue
            skip = max(0, start_row - first)
            yield Task(file_index, first + skip, n - skip, f.path, f.kind, group, offset + skip)
        base += rows
    yield Task(file_index, max(base, start_row), 0, f.path, f.kind, end=True)


def _jsonl_tasks(file_index: int, f: InputFile, start_row: int, rows_per_task: int,
                 max_task_bytes: int) -> Iterator[Task]:
    row = 0
    lines: list[bytes] = []
    nbytes = 0
    try:
        with open_jsonl(f.path) as stream:
            for line in stream:
                if row >= start_row:
                    lines.append(line)
                    nbytes += len(line)
                    if len(lines) >= rows_per_task or nbytes >= max_task_bytes:
                        yield Task(file_index, row - len(lines) + 1, len(lines), f.path, f.kind, lines=tuple(lines))
                        lines, nbytes = [], 0
                row += 1
    except Exception as e:  # truncated or corrupt gzip / zstd stream (zstandard.ZstdError, EOFError, ...)
        if lines:
            yield Task(file_index, row - len(lines), len(lines), f.path, f.kind, lines=tuple(lines))
        row = max(row, start_row)
        yield Task(file_index, row, 1, f.path, f.kind, error=f"stream unreadable after row {row}: {e}")
        yield Task(file_index, row + 1, 0, f.path, f.kind, end=True)
        return
    if lines:
        yield Task(file_index, row - len(lines), len(lines), f.path, f.kind, lines=tuple(lines))
    yield Task(file_index, max(row, start_row), 0, f.path, f.kind, end=True)


def read_task_texts(task: Task, json_key: str) -> list[tuple[int, str | None, str | None]]:
    """(row, text, None) or (row, None, skip_reason) for every row of ``task``."""
    if task.error or task.end:
        return []
    if task.kind == "parquet":
        return _parquet_rows(task, json_key)
    return [(task.first_row + i, *_json_text(line, json_key)) for i, line in enumerate(task.lines)]


def _json_text(line: bytes, key: str) -> tuple[str | None, str | None]:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        obj = json.loads(decoded)
    except ValueError:
        return None, "bad_json"
    if not isinstance(obj, dict):
        return None, "bad_json"
    value = obj.get(key)
    return _check_text(value)


def _check_text(value) -> tuple[str | None, str | None]:
    if value is None:
        return None, "missing_text"
    if not isinstance(value, str):
        return None, "non_string_text"
    if not value.strip():
        return None, "empty_text"
    return value, None


def _parquet_rows(task: Task, key: str) -> list[tuple[int, str | None, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = range(task.first_row, task.first_row + task.num_rows)
    try:
        pf = pq.ParquetFile(task.path)
        if key not in pf.schema_arrow.names:
            return [(r, None, "missing_text") for r in rows]
        column = pf.read_row_group(task.row_group, columns=[key]).column(0)
        column = column.slice(task.row_group_offset, task.num_rows)
    except Exception:
        return [(r, None, "corrupt_file") for r in rows]
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        return [(r, None, "non_string_text") for r in rows]
    # Read as bytes and decode here: a string column is not guaranteed to hold valid UTF-8.
    values = column.cast(pa.large_binary()).to_pylist()
    out = []
    for r, raw in zip(rows, values):
        if raw is None:
            out.append((r, None, "missing_text"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append((r, None, "invalid_utf8"))
            continue
        out.append((r, *_check_text(text)))
    return out


def iter_texts(f: InputFile, json_key: str, rows_per_task: int = 4096) -> Iterator[str]:
    """Valid texts of one input file, in order (for tokenizer training; skips silently)."""
    for task in iter_tasks(0, f, 0, rows_per_task):
        if task.error:
            raise InputError(f"{f.path}: {task.error}")
        for _, text, _ in read_task_texts(task, json_key):
            if text is not None:
                yield text
