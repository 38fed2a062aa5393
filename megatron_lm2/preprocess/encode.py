"""Worker side: read one task's rows, validate them, encode the texts in batches.

The result carries the documents as one flat token array (each document followed by the EOD id)
plus per-document lengths and source rows; numpy arrays pickle cheaply back to the writer,
unlike lists of Python ints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain

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


def encode_task(task: Task, tokenizer, json_key: str, dtype, batch_size: int = 128) -> EncodedBatch:
    if task.error:
        empty = np.empty(0, dtype=np.int64)
        return EncodedBatch(task.file_index, task.first_row, task.num_rows, np.empty(0, dtype), empty, empty,
                            [(task.first_row, "corrupt_file")])
    texts: list[str] = []
    rows: list[int] = []
    skips: list[tuple[int, str]] = []
    for row, text, reason in read_task_texts(task, json_key):
        if text is None:
            skips.append((row, reason))
        else:
            texts.append(text)
            rows.append(row)
    token_parts, length_parts = [], []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer.encode_batch(texts[start:start + batch_size])
        tokens, lengths = _flatten_with_eod(ids, tokenizer.eod, dtype)
        token_parts.append(tokens)
        length_parts.append(lengths)
    tokens = np.concatenate(token_parts) if token_parts else np.empty(0, dtype)
    lengths = np.concatenate(length_parts) if length_parts else np.empty(0, np.int64)
    return EncodedBatch(task.file_index, task.first_row, task.num_rows, tokens, lengths,
                        np.asarray(rows, dtype=np.int64), skips)


def _flatten_with_eod(ids: list[list[int]], eod: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    flat = np.empty(total, dtype=dtype)
    ends = np.cumsum(lengths) - 1
    body = np.ones(total, dtype=bool)
    body[ends] = False
    flat[body] = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=total - len(ids))
    flat[ends] = eod
    return flat, lengths


# --- process-pool plumbing: each worker loads the tokenizer once --------------------------------

_WORKER: dict = {}


def init_worker(tokenizer_path: str, eod_token: str | None, json_key: str, dtype_name: str,
                batch_size: int) -> None:
    # One core per worker: the pool provides the parallelism, library threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from megatron_lm2.tokenizer import load_tokenizer

    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path, eod_token), json_key=json_key,
                   dtype=np.dtype(dtype_name), batch_size=batch_size)


def worker_encode(task: Task) -> EncodedBatch:
    return encode_task(task, _WORKER["tokenizer"], _WORKER["json_key"], _WORKER["dtype"], _WORKER["batch_size"])
