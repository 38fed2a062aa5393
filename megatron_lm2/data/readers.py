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
    "lone_surrogate",    # valid JSON whose text holds an unpaired UTF-16 surrogate ("\\ud800"): not text
    "unencodable",       # a text the tokenizer refuses (the exception is named in the file's problems)
    "corrupt_file",      # a parquet file or row group, or a compressed stream, that cannot be read
    "missing_column",    # a parquet file without the --json-key column (the whole file)
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
    data: bytes = b""                   # jsonl: the raw lines, each ending in b"\\n"
    error: str = ""                     # the rest of the file cannot be read: one skipped row, and
    error_reason: str = "corrupt_file"  # this message becomes the file's problem
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
               max_task_bytes: int = 4 << 20, json_key: str = "text") -> Iterator[Task]:
    """Tasks covering rows ``start_row..end`` of one input file, in order."""
    if f.kind == "parquet":
        yield from _parquet_tasks(file_index, f, start_row, rows_per_task, json_key)
    else:
        yield from _jsonl_tasks(file_index, f, start_row, rows_per_task, max_task_bytes)


def _file_error(file_index: int, f: InputFile, row: int, message: str, reason: str) -> Iterator[Task]:
    yield Task(file_index, row, 1, f.path, f.kind, error=message, error_reason=reason)
    yield Task(file_index, row + 1, 0, f.path, f.kind, end=True)


def _parquet_tasks(file_index: int, f: InputFile, start_row: int, rows_per_task: int,
                   json_key: str) -> Iterator[Task]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
        meta = pf.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
        reason = " ".join(str(e).split())[:300]
        yield from _file_error(file_index, f, start_row, f"cannot read (truncated or not a parquet file): {reason}",
                               "corrupt_file")
        return
    if json_key not in names:
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        yield from _file_error(file_index, f, start_row,
                               f"no column {json_key!r} (columns: {shown}; use --json-key)", "missing_column")
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


_READ_BYTES = 1 << 20


def _jsonl_tasks(file_index: int, f: InputFile, start_row: int, rows_per_task: int,
                 max_task_bytes: int) -> Iterator[Task]:
    """Read the stream in ~1 MiB pieces and cut tasks at line ends with C loops (bytes.count,
    numpy); a task carries its lines as ONE bytes object (one pickle, one copy to a worker)
    instead of a tuple of per-line objects. ``read1`` returns what the decompressor has, so a
    truncated gzip/zstd stream still yields every complete line before the damage."""
    cutter = _LineCutter(file_index, f, start_row, rows_per_task, max_task_bytes)
    carry = b""  # a partial last line
    try:
        with open_jsonl(f.path) as stream:
            read = getattr(stream, "read1", stream.read)
            while True:
                piece = read(_READ_BYTES)
                if not piece:
                    break
                last = piece.rfind(b"\n")
                if last < 0:
                    carry += piece
                    continue
                block = carry + piece[: last + 1] if carry else piece[: last + 1]
                carry = piece[last + 1:]
                yield from cutter.add(block)
    except Exception as e:  # truncated or corrupt gzip / zstd stream (zstandard.ZstdError, EOFError, ...)
        yield from cutter.flush()
        row = max(cutter.row, start_row)
        message = f"stream unreadable after row {row}: {' '.join(str(e).split())[:300]}"
        yield from _file_error(file_index, f, row, message, "corrupt_file")
        return
    if carry:  # a last line without its newline is still a row
        yield from cutter.add(carry + b"\n")
    yield from cutter.flush()
    yield Task(file_index, max(cutter.row, start_row), 0, f.path, f.kind, end=True)


class _LineCutter:
    """Collects complete lines into tasks of at most ``rows_per_task`` rows and about
    ``max_task_bytes`` bytes; drops the rows before ``start_row`` (resume)."""

    def __init__(self, file_index: int, f: InputFile, start_row: int, rows_per_task: int, max_task_bytes: int):
        self.file_index, self.file, self.start_row = file_index, f, start_row
        self.rows_per_task, self.max_bytes = rows_per_task, max_task_bytes
        self.row = 0                      # rows before the pending ones
        self.pieces: list[bytes] = []
        self.rows = self.bytes = 0

    def add(self, block: bytes) -> Iterator[Task]:
        n = block.count(b"\n")
        if self.rows + n < self.rows_per_task and self.bytes + len(block) < self.max_bytes:
            self._take(block, n)
            return
        import numpy as np

        ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10) + 1
        start, li = 0, 0
        while li < len(ends):
            rest = ends[li:] - start
            by_rows = self.rows_per_task - self.rows
            by_bytes = int(np.searchsorted(rest, self.max_bytes - self.bytes, side="left")) + 1
            k = max(1, min(by_rows, by_bytes, len(rest)))
            end = int(ends[li + k - 1])
            self._take(block[start:end], k)
            start, li = end, li + k
            if self.rows >= self.rows_per_task or self.bytes >= self.max_bytes:
                yield from self.flush()

    def _take(self, piece: bytes, rows: int) -> None:
        self.pieces.append(piece)
        self.rows += rows
        self.bytes += len(piece)

    def flush(self) -> Iterator[Task]:
        if not self.pieces:
            return
        data = self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)
        first, n = self.row, self.rows
        self.pieces, self.rows, self.bytes = [], 0, 0
        self.row += n
        if first + n <= self.start_row:
            return
        if first < self.start_row:  # resume inside this task: drop the rows already committed
            cut = 0
            for _ in range(self.start_row - first):
                cut = data.index(b"\n", cut) + 1
            data, n, first = data[cut:], n - (self.start_row - first), self.start_row
        yield Task(self.file_index, first, n, self.file.path, self.file.kind, data=data)


def task_lines(task: Task) -> list[bytes]:
    lines = task.data.split(b"\n")
    lines.pop()  # the data ends in a newline
    return lines


def read_task_texts(task: Task, json_key: str) -> list[tuple[int, str | None, str | None]]:
    """(row, text, None) or (row, None, skip_reason) for every row of ``task``."""
    if task.error or task.end:
        return []
    if task.kind == "parquet":
        return _parquet_rows(task, json_key)
    return [(task.first_row + i, *json_text(line, json_key)) for i, line in enumerate(task_lines(task))]


try:  # orjson parses (and UTF-8-validates) bytes 2-4x faster than json; strict, so see _json_text_slow
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is a core dependency
    _fast_loads = None


def json_text(line: bytes, key: str) -> tuple[str | None, str | None]:
    if _fast_loads is not None:
        try:
            obj = _fast_loads(line)
        except ValueError:
            return _json_text_slow(line, key)
        if not isinstance(obj, dict):
            return None, "bad_json"
        return _check_text(obj.get(key))   # orjson never returns lone surrogates
    return _json_text_slow(line, key)


def _json_text_slow(line: bytes, key: str) -> tuple[str | None, str | None]:
    """The standard library's reading, which also says why a row is bad: orjson rejects some
    valid JSON (lone surrogate escapes, integers past 64 bits, NaN) that json accepts."""
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
    text, reason = _check_text(obj.get(key))
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # "\ud800": valid JSON, but no tokenizer can take it
            return None, "lone_surrogate"
    return text, reason


def _check_text(value) -> tuple[str | None, str | None]:
    if value is None:
        return None, "missing_text"
    if not isinstance(value, str):
        return None, "non_string_text"
    if not value.strip():  # O(1) for text that does not start with whitespace
        return None, "empty_text"
    return value, None


def _parquet_rows(task: Task, key: str) -> list[tuple[int, str | None, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = range(task.first_row, task.first_row + task.num_rows)
    try:
        pf = pq.ParquetFile(task.path)
        column = pf.read_row_group(task.row_group, columns=[key]).column(0)
        column = column.slice(task.row_group_offset, task.num_rows)
    except Exception:
        return [(r, None, "corrupt_file") for r in rows]
    kind = column.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        return [(r, None, "non_string_text") for r in rows]
    try:
        # Arrow validates UTF-8 for the whole column in one C pass (the cast for binary, the
        # conversion for string); only a column with a bad value takes the per-row path below.
        values = (column if pa.types.is_string(kind) or pa.types.is_large_string(kind)
                  else column.cast(pa.large_string())).to_pylist()
        return [(r, *_check_text(v)) for r, v in zip(rows, values)]
    except (pa.ArrowInvalid, UnicodeDecodeError):
        pass
    out = []
    for r, raw in zip(rows, column.cast(pa.large_binary()).to_pylist()):
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
    for task in iter_tasks(0, f, 0, rows_per_task, json_key=json_key):
        if task.error:
            raise InputError(f"{f.path}: {task.error}")
        for _, text, _ in read_task_texts(task, json_key):
            if text is not None:
                yield text
