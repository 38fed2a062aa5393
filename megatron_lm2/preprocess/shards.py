"""Writer side: cut one input file's documents into token-budget shards, atomically.

Shards never span input files, so a file's shards depend on that file alone: any split of the
files across ranks, and any resume point, produce the same bytes. A shard closes after the
document that brings it to ``shard_tokens`` or more (documents are never split), and at the
end of its file.

Commit protocol for shard ``k`` of a file (the ``.progress`` record is the commit point)::

    shards/<subset>/<stem>_<k>.bin.tmp, .idx.tmp   written through IndexedDatasetBuilder
    -> os.replace to .bin, .idx
    -> .progress/<subset>/<stem>_<k>.json         shard record (rows, documents, tokens, skips)
    ...
    -> .progress/<subset>/<stem>.done.json        the file is finished (rows, trailing skips)

With ``fsync`` (the default) each ``.tmp`` file is fsynced before its rename and the directory
after it, and each record likewise: a shard whose record exists survives a power loss, not only
a killed process.

A rerun trusts only committed records: it restarts the file at the row after its last committed
shard and rewrites anything after it, so a kill at any moment leaves nothing half-visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_lm2 import fileio
from megatron_lm2.fileio import fsync_dir
from megatron_lm2.preprocess.encode import EncodedBatch
from megatron_lm2.preprocess.readers import InputFile

MAX_LISTED_SKIPS = 1000  # per shard record; counts stay exact beyond it


def write_json_atomic(path: Path, obj, fsync: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json_atomic(path, obj, indent=1, end="\n", fsync=fsync, sync_dir=fsync)


def shard_prefix(f: InputFile, index: int) -> str:
    """Shard prefix relative to the output directory."""
    return f"shards/{f.subset}/{f.stem}_{index:05d}"


def progress_dir(out_dir: Path, f: InputFile) -> Path:
    return out_dir / ".progress" / f.subset


@dataclass
class FileState:
    """What earlier runs committed for one input file."""

    shards: list[dict] = field(default_factory=list)
    done: dict | None = None

    @property
    def next_row(self) -> int:
        return self.shards[-1]["rows"][1] if self.shards else 0


def load_state(out_dir: Path, f: InputFile) -> FileState:
    pdir = progress_dir(out_dir, f)
    state = FileState()
    done = pdir / f"{f.stem}.done.json"
    if done.is_file():
        state.done = json.loads(done.read_text())
    k = 0
    while (pdir / f"{f.stem}_{k:05d}.json").is_file():
        state.shards.append(json.loads((pdir / f"{f.stem}_{k:05d}.json").read_text()))
        k += 1
    return state


# Megatron-core's indexed dataset format (megatron/core/datasets/indexed_dataset.py, _IndexWriter),
# written here with numpy so that preprocessing never imports megatron.core (and torch): seconds
# of start-up and ~0.35 GiB of RSS per run, and no per-document Python loop for the pointers.
# tests/test_preprocess.py checks the bytes against megatron-core's own IndexedDatasetBuilder.
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
                np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8}


def index_parts(lengths: np.ndarray, dtype) -> list:
    """The bytes of an `.idx` for documents of these lengths (one sequence each), in order."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    return [_INDEX_HEADER, struct.pack("<Q", 1), struct.pack("<B", _DTYPE_CODES[dtype]),
            struct.pack("<Q", len(lengths)), struct.pack("<Q", len(lengths) + 1),
            lengths.astype(np.int32).tobytes(), pointers.tobytes(),
            np.arange(len(lengths) + 1, dtype=np.int64).tobytes()]


class ShardWriter:
    """One ``.bin`` (documents' tokens, back to back) and its ``.idx``; one sequence per document."""

    def __init__(self, bin_path: str, dtype):
        self.dtype = np.dtype(dtype)
        self.data_file = open(bin_path, "wb")
        self.lengths: list[np.ndarray] = []
        self.max_id = -1  # recorded so the trainer checks ids against its vocabulary without the .bin

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if len(tokens):
            self.max_id = max(self.max_id, int(np.max(tokens)))
        self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.lengths.append(np.asarray(lengths, dtype=np.int64))

    def finalize(self, idx_path: str, fsync: bool = False) -> dict:
        """Write the .idx; returns what the shard's record keeps of it (sizes, max id, the
        .idx's sha256: the trainer's start-up check and its index cache key)."""
        if fsync:
            self.data_file.flush()
            os.fsync(self.data_file.fileno())
        bin_bytes = self.data_file.tell()
        self.data_file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.empty(0, np.int64)
        parts = index_parts(lengths, self.dtype)
        digest = hashlib.sha256()
        with open(idx_path, "wb") as f:
            for part in parts:
                digest.update(part)
                f.write(part)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        return {"max_id": self.max_id, "bin_bytes": bin_bytes, "idx_bytes": sum(len(p) for p in parts),
                "idx_sha256": digest.hexdigest()}


def write_shard(prefix: str, documents, dtype=np.uint16) -> dict:
    """PREFIX.bin/.idx from token-id lists, one document each, as Megatron-LM's own tool would
    leave them (no manifest): for tests, benchmarks and hand-made data. Returns the facts."""
    writer = ShardWriter(prefix + ".bin", dtype)
    for doc in documents:
        writer.add(np.asarray(doc), np.asarray([len(doc)]))
    return writer.finalize(prefix + ".idx")


class FileSharder:
    """Receives one file's EncodedBatches in row order and writes its shards."""

    def __init__(self, out_dir: Path, f: InputFile, state: FileState, shard_tokens: int, dtype,
                 encoder: str = "", verification: dict | None = None, fsync: bool = True):
        self.out_dir, self.file, self.shard_tokens = out_dir, f, shard_tokens
        self.encoder, self.verification, self.fsync = encoder, verification, fsync
        self.problems: list[str] = []
        self.dtype = np.dtype(dtype)
        self.index = len(state.shards)
        self.start_row = state.next_row
        self.skips: list[tuple[int, str]] = []    # not yet attributed to a shard
        self.builder: ShardWriter | None = None  # the open shard
        self.tokens = 0
        self.documents = 0
        self.new_shards: list[dict] = []          # committed by this run

    def add(self, batch: EncodedBatch) -> None:
        self.skips.extend(batch.skips)
        if batch.problem and len(self.problems) < 10:
            self.problems.append(batch.problem)
        n = len(batch.lengths)
        if n == 0:
            return
        cumulative = np.cumsum(batch.lengths)
        doc, token_base = 0, 0
        while doc < n:
            # first document j >= doc whose addition fills the current shard
            target = token_base + self.shard_tokens - self.tokens
            j = int(np.searchsorted(cumulative, target, side="left"))
            last = min(j, n - 1)
            token_end = int(cumulative[last])
            self._append(batch.tokens[token_base:token_end], batch.lengths[doc:last + 1])
            if j < n:
                self._close(end_row=int(batch.rows[last]) + 1)
            doc, token_base = last + 1, token_end

    def finish(self, total_rows: int) -> dict:
        """Close the file's last shard and commit the file's done record."""
        if self.builder is not None:
            self._close(end_row=total_rows)
        trailing = [s for s in self.skips if s[0] >= self.start_row]
        done = {"source": self.file.path, "subset": self.file.subset, "rows": total_rows,
                "shards": self.index, "trailing_rows": [self.start_row, total_rows],
                "skipped": dict(Counter(reason for _, reason in trailing)),
                "skips": [list(s) for s in trailing[:MAX_LISTED_SKIPS]],
                "problems": self.problems, "encoder": self.encoder, "verification": self.verification}
        write_json_atomic(progress_dir(self.out_dir, self.file) / f"{self.file.stem}.done.json", done, self.fsync)
        return done

    def _append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if self.builder is None:
            prefix = self.out_dir / shard_prefix(self.file, self.index)
            prefix.parent.mkdir(parents=True, exist_ok=True)
            self.builder = ShardWriter(str(prefix) + ".bin.tmp", self.dtype)
        # one write per contiguous run of documents, not one call per document
        self.builder.add(tokens, lengths)
        self.tokens += int(lengths.sum())
        self.documents += len(lengths)

    def _close(self, end_row: int) -> None:
        prefix = self.out_dir / shard_prefix(self.file, self.index)
        # with fsync, the shard's bytes reach the disk before the rename and the record
        facts = self.builder.finalize(str(prefix) + ".idx.tmp", fsync=self.fsync)
        os.replace(str(prefix) + ".bin.tmp", str(prefix) + ".bin")
        os.replace(str(prefix) + ".idx.tmp", str(prefix) + ".idx")
        if self.fsync:
            fsync_dir(prefix.parent)
        mine = [s for s in self.skips if s[0] < end_row]
        self.skips = [s for s in self.skips if s[0] >= end_row]
        record = {"prefix": shard_prefix(self.file, self.index), "subset": self.file.subset,
                  "source": self.file.path, "rows": [self.start_row, end_row],
                  "documents": self.documents, "tokens": self.tokens, **facts, "encoder": self.encoder,
                  "skipped": dict(Counter(reason for _, reason in mine)),
                  "skips": [list(s) for s in mine[:MAX_LISTED_SKIPS]]}
        write_json_atomic(progress_dir(self.out_dir, self.file) / f"{self.file.stem}_{self.index:05d}.json", record,
                          self.fsync)
        self.new_shards.append(record)
        self.index += 1
        self.start_row = end_row
        self.builder, self.tokens, self.documents = None, 0, 0
