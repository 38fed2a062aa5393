"""Worker side: read one task's rows, validate them, encode the texts in batches.

The result carries the documents as one flat token array (each document followed by the EOD id)
plus per-document lengths and source rows; numpy arrays pickle cheaply back to the writer,
unlike lists of Python ints.

Each task is encoded by the encoder the writer chose for its file (``fast=True``: the verified
fast encoder, else the reference). A batch the encoder refuses is retried text by text, so one
bad text is skipped as ``unencodable`` (its exception named in the file's problems) and the
rest of the batch is kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from megatron_lm2.preprocess.readers import Task, read_task_texts


@dataclass
class EncodedBatch:
    file_index: int
    first_row: int
    num_rows: int
    tokens: np.ndarray                 # all documents, each followed by eod
    lengths: np.ndarray                # int64 tokens per document (eod included)
    rows: np.ndarray                   # int64 source row of each document
    skips: list[tuple[int, str]] = field(default_factory=list)   # (row, reason), row order
    problem: str = ""                  # file-level message (unreadable file / stream, refused text)


@dataclass
class Encoders:
    """What a worker (or the in-process path) encodes with."""

    reference: object
    fast: object | None
    eod: int
    dtype: np.dtype
    json_key: str
    batch_size: int


def encode_task(task: Task, enc: Encoders, fast: bool) -> EncodedBatch:
    if task.error:
        empty = np.empty(0, dtype=np.int64)
        return EncodedBatch(task.file_index, task.first_row, task.num_rows, np.empty(0, enc.dtype), empty, empty,
                            [(task.first_row, task.error_reason)], problem=task.error)
    texts: list[str] = []
    rows: list[int] = []
    skips: list[tuple[int, str]] = []
    for row, text, reason in read_task_texts(task, enc.json_key):
        if text is None:
            skips.append((row, reason))
        else:
            texts.append(text)
            rows.append(row)
    encoder = enc.fast if fast else enc.reference
    id_parts, length_parts, problem = [], [], ""
    batch = len(texts) if fast else enc.batch_size  # the fast encoder takes the whole task in one call
    kept_rows = []
    for start in range(0, len(texts), max(1, batch)):
        chunk = texts[start:start + batch]
        chunk_rows = rows[start:start + batch]
        try:
            ids, lengths = encoder.encode_flat(chunk)
            kept = chunk_rows
        except Exception:  # refused somewhere in the batch: find the texts, keep the others
            ids, lengths, kept, refused = _one_by_one(encoder, chunk, chunk_rows)
            skips.extend((r, "unencodable") for r, _ in refused)
            if refused and not problem:
                problem = f"row {refused[0][0]}: the tokenizer refused the text ({refused[0][1]})"
        id_parts.append(ids)
        length_parts.append(lengths)
        kept_rows.extend(kept)
    skips.sort()
    ids = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
    lengths = np.concatenate(length_parts) if length_parts else np.empty(0, np.int64)
    tokens, doc_lengths = with_eod(ids, lengths, enc.eod, enc.dtype)
    return EncodedBatch(task.file_index, task.first_row, task.num_rows, tokens, doc_lengths,
                        np.asarray(kept_rows, dtype=np.int64), skips, problem)


def _one_by_one(encoder, texts, rows):
    id_parts, length_parts, kept, refused = [], [], [], []
    for text, row in zip(texts, rows):
        try:
            ids, lengths = encoder.encode_flat([text])
        except Exception as e:
            refused.append((row, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))
            continue
        id_parts.append(ids)
        length_parts.append(lengths)
        kept.append(row)
    ids = np.concatenate(id_parts) if id_parts else np.empty(0, np.int64)
    lengths = np.concatenate(length_parts) if length_parts else np.empty(0, np.int64)
    return ids, lengths, kept, refused


def with_eod(ids: np.ndarray, lengths: np.ndarray, eod: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Flat ids + lengths -> flat ids with eod after each document, in ``dtype``; vectorized."""
    doc_lengths = lengths + 1
    flat = np.empty(int(doc_lengths.sum()), dtype=dtype)
    ends = np.cumsum(doc_lengths) - 1
    body = np.ones(len(flat), dtype=bool)
    body[ends] = False
    flat[body] = ids
    flat[ends] = eod
    return flat, doc_lengths


# --- process-pool plumbing: each worker loads the tokenizer once --------------------------------

_WORKER: dict = {}


def make_encoders(tokenizer_path: str, eod_token: str | None, json_key: str, dtype_name: str, batch_size: int,
                  fast_name: str | None) -> Encoders:
    from megatron_lm2.tokenizer import load_tokenizer
    from megatron_lm2.tokenizer.encoders import fast_encoder, reference_encoder

    tok = load_tokenizer(tokenizer_path, eod_token)
    fast = fast_encoder(tok, fast_name) if fast_name else None
    return Encoders(reference_encoder(tok), fast, tok.eod, np.dtype(dtype_name), json_key, batch_size)


def init_worker(tokenizer_path: str, eod_token: str | None, json_key: str, dtype_name: str,
                batch_size: int, fast_name: str | None = None) -> None:
    # One core per worker: the pool provides the parallelism, library threads would oversubscribe.
    # fastokens' own thread pool (default: every core) would also keep a second full-size
    # thread-local cache per worker (~125 MiB on rare-word text); it reads this on first use.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["FASTOKENS_BPE_THREADS"] = "1"
    _WORKER["encoders"] = make_encoders(tokenizer_path, eod_token, json_key, dtype_name, batch_size, fast_name)


def worker_encode(task: Task, fast: bool) -> EncodedBatch:
    return encode_task(task, _WORKER["encoders"], fast)


def worker_verify(f, seed: int, first_bytes: int, random_bytes: int):
    from megatron_lm2.preprocess.verify import verify_file

    return verify_file(f, _WORKER["encoders"], seed, first_bytes, random_bytes)
