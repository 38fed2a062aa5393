"""Check the fast encoder against the reference on a sample of each input file, every run.

The sample is the file's first documents (``first_bytes`` of text) plus documents from random
places (``random_bytes``): random row groups of a parquet file, random byte offsets of a plain
jsonl file (the line after the offset). A compressed jsonl stream cannot be seeked, so its
sample is the first ``first_bytes + random_bytes`` of text. The random choice is seeded by the
file's path and size, so a rerun checks the same documents.

Both encoders encode the sample; the verdict is ``equal`` or the first document that differs.
"""

from __future__ import annotations

import hashlib
import random
import time

import numpy as np

from megatron_lm2.preprocess.readers import InputFile, _check_text, iter_tasks, json_text, read_task_texts


def sample_texts(f: InputFile, json_key: str, seed: int, first_bytes: int,
                 random_bytes: int) -> list[tuple[str, str]]:
    """[(where, text)] of the sample; ``where`` names the row (or byte offset) for messages."""
    compressed = f.kind == "jsonl" and not f.path.endswith((".jsonl", ".json"))
    whole = f.size <= first_bytes + random_bytes  # small file: check all of it
    head = _first_texts(f, json_key, float("inf") if whole else first_bytes + (random_bytes if compressed else 0))
    if compressed or whole or random_bytes <= 0:
        return head
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{f.path}:{f.size}".encode()).digest()[:8], "little"))
    picked = _random_parquet(f, json_key, rng, random_bytes) if f.kind == "parquet" else \
        _random_jsonl(f, json_key, rng, random_bytes)
    return head + picked


def _first_texts(f: InputFile, json_key: str, budget: int) -> list[tuple[str, str]]:
    out, size = [], 0
    for task in iter_tasks(0, f, 0, 256, max_task_bytes=max(1 << 16, min(budget, 4 << 20)), json_key=json_key):
        if task.error or task.end:
            break
        for row, text, _ in read_task_texts(task, json_key):
            if text is not None:
                out.append((f"row {row}", text))
                size += len(text)
                if size >= budget:
                    return out
    return out


def _random_parquet(f: InputFile, json_key: str, rng: random.Random, budget: int) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
        groups = list(range(pf.metadata.num_row_groups))
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in groups])
    except Exception:
        return []  # unreadable: the file's own tasks report it
    out = []
    rng.shuffle(groups)
    groups = groups[:4]
    per_group = budget // max(1, len(groups)) + 1
    for g in groups:
        try:
            column = pf.read_row_group(g, columns=[json_key]).column(0).to_pylist()
        except Exception:
            continue
        order = list(range(len(column)))
        rng.shuffle(order)
        got = 0
        for i in order:
            value = column[i]
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    continue
            text, _ = _check_text(value)
            if text is None:
                continue
            out.append((f"row {int(starts[g]) + i}", text))
            got += len(text)
            if got >= per_group:
                break
    return out


def _random_jsonl(f: InputFile, json_key: str, rng: random.Random, budget: int) -> list[tuple[str, str]]:
    out, size = [], 0
    if f.size == 0:
        return out
    with open(f.path, "rb") as fh:
        for _ in range(10_000):
            if size >= budget:
                break
            offset = rng.randrange(f.size)
            fh.seek(offset)
            fh.readline()  # the rest of the line the offset fell into
            where = fh.tell()
            line = fh.readline()
            if not line:
                continue
            text, _ = json_text(line.rstrip(b"\n"), json_key)
            if text is not None:
                out.append((f"the line at byte {where}", text))
                size += len(text)
    return out


# Text per encode call while comparing: the reference's per-token objects for a whole 3 MB
# sample took ~80 MiB at once (and left ~57 MiB of fragmented heap in the worker); a chunk keeps
# that to a few MiB.
COMPARE_CHUNK_CHARS = 256 << 10


def compare(reference, fast, texts: list[str], chunk_chars: int = COMPARE_CHUNK_CHARS) -> int | None:
    """Index of the first text the two encoders encode differently, or None; encoded a chunk of
    at most ``chunk_chars`` characters (at least one text) at a time."""
    start = 0
    while start < len(texts):
        end, size = start + 1, len(texts[start])
        while end < len(texts) and size + len(texts[end]) <= chunk_chars:
            size += len(texts[end])
            end += 1
        first = _compare_chunk(reference, fast, texts[start:end])
        if first is not None:
            return start + first
        start = end
    return None


def _compare_chunk(reference, fast, texts: list[str]) -> int | None:
    ref_ids, ref_len = reference.encode_flat(texts)
    try:
        fast_ids, fast_len = fast.encode_flat(texts)
    except Exception:
        fast_ids, fast_len = np.empty(0, np.int64), np.full(len(texts), -1, np.int64)
    if np.array_equal(ref_len, fast_len) and np.array_equal(ref_ids, fast_ids.astype(ref_ids.dtype)):
        return None
    # locate the first differing document
    ref_off, fast_off = np.concatenate([[0], np.cumsum(ref_len)]), np.concatenate([[0], np.cumsum(fast_len)])
    for i in range(len(texts)):
        if ref_len[i] != fast_len[i] or not np.array_equal(
                ref_ids[ref_off[i]:ref_off[i + 1]], fast_ids[fast_off[i]:fast_off[i + 1]].astype(ref_ids.dtype)):
            return i
    return 0  # pragma: no cover - arrays differ but no document does


def verify_file(f: InputFile, encoders, seed: int, first_bytes: int, random_bytes: int) -> dict:
    """The verdict for one file: ``{"result": "equal"|"differs", "documents", "bytes", ...}``."""
    start = time.perf_counter()
    sample = sample_texts(f, encoders.json_key, seed, first_bytes, random_bytes)
    texts = [t for _, t in sample]
    verdict = {"documents": len(texts), "characters": sum(map(len, texts))}
    first = compare(encoders.reference, encoders.fast, texts)
    if first is None:
        verdict["result"] = "equal"
    else:
        verdict.update(result="differs", first_difference=sample[first][0])
    verdict["seconds"] = round(time.perf_counter() - start, 3)
    return verdict
