"""The data, checked against the model before step 1, at corpus scale (issue 37 item 2).

For every shard of the blend:
* the `.bin`'s size against what its `.idx` describes (a truncated or padded `.bin`),
* the `.idx` itself: its sha256 against the one lm2-preprocess recorded in the manifest, and its
  document count and summed lengths against the manifest's (an `.idx` rewritten in place with
  the same size passes a size check, and trained on doubled lengths or crashed at step 1),
* the largest token id against the model's vocabulary (ids from another tokenizer crash the
  embedding at some step: a device-side assert on a GPU).

With a manifest the check reads only `.idx` files (~20 bytes a document: about 20 MB for 1B
tokens) and never a `.bin`. Shards without manifest facts (made by Megatron-LM's own tool, or by
an older lm2-preprocess) are scanned once, vectorised in 64 MiB slices with a progress bar, and
what the scan found is cached beside the index caches, keyed by each file's size and mtime.
Work is split over the ranks (shard i on rank i mod world), answers are gathered, so every rank
fails with the same line.

`blend_digest` (from the shards' `.idx` digests) names the index cache's folder: shards rebuilt
at the same paths get a fresh cache, never the old document ranges (issue 37 item 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from typing import Dict, List, Optional

import numpy as np

from megatron_lm2.config import ConfigError
from megatron_lm2.fileio import write_json_atomic
from megatron_lm2.training.integrity import file_digest, gather_merged, rank_world  # sha256; the ranks' shares

SCAN_CACHE = "shard_scan.json"
_SLICE = 64 << 20
_SHOW_PROGRESS_FROM = 256 << 20  # a scan that takes under a second or so shows no bar


def manifest_shards(manifest: Optional[str]) -> Dict[str, dict]:
    """{absolute prefix: the manifest's record of it}; {} without a manifest."""
    if not manifest or not os.path.isfile(manifest):
        return {}
    try:
        with open(manifest) as handle:
            shards = json.load(handle).get("shards", [])
    except (OSError, ValueError) as error:
        raise ConfigError(f"{manifest}: unreadable manifest ({error})") from None
    base = os.path.dirname(os.path.abspath(manifest))
    return {os.path.normpath(os.path.join(base, s["prefix"])): s for s in shards if "prefix" in s}


def read_index(path: str):
    """megatron-core's reader of an `.idx` (its arrays memory-mapped); one line if unreadable."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    logger = logging.getLogger("megatron.core.datasets.indexed_dataset")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the reader logs every array it maps
    try:
        return _IndexReader(path, multimodal=False)
    except (OSError, ValueError, AssertionError, IndexError, struct.error) as error:
        raise ConfigError(f"data index {path}: unreadable ({type(error).__name__}: {error})") from None
    finally:
        logger.setLevel(level)


def expected_bin_bytes(idx_path: str, index=None) -> int:
    """The size PREFIX.bin must have, from its index (read here unless given): the last
    sequence's byte offset plus its length in tokens times the token size."""
    index = read_index(idx_path) if index is None else index
    if len(index.sequence_lengths) == 0:
        return 0
    return int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size


def _size_problem(prefix: str, index=None) -> Optional[str]:
    expected, actual = expected_bin_bytes(prefix + ".idx", index), os.path.getsize(prefix + ".bin")
    if actual == expected:
        return None
    return (f"data shard {prefix}.bin: {actual} bytes, but its index {prefix}.idx describes {expected} "
            f"({'truncated' if actual < expected else 'longer than its index'}; re-run lm2-preprocess)")


def check_shard_size(prefix: str) -> None:
    """A truncated (or padded) PREFIX.bin is refused at start-up, naming it (cheap: the .idx
    header and last entry), before anything is built."""
    problem = _size_problem(prefix)
    if problem:
        raise ConfigError(problem)


def _counts(index) -> tuple:
    return len(index.document_indices) - 1, int(np.asarray(index.sequence_lengths, dtype=np.int64).sum())


def _scan_max_id(prefix: str, dtype, progress) -> int:
    path = prefix + ".bin"
    size = os.path.getsize(path)
    if size == 0:
        return -1
    data = np.memmap(path, dtype=dtype, mode="r")
    step = max(1, _SLICE // data.itemsize)
    best = -1
    for start in range(0, len(data), step):
        piece = data[start:start + step]
        best = max(best, int(piece.max()))
        if progress is not None:
            progress.update(piece.nbytes)
    del data
    return best


def _stamp(prefix: str) -> dict:
    bin_stat, idx_stat = os.stat(prefix + ".bin"), os.stat(prefix + ".idx")
    return {"bin_bytes": bin_stat.st_size, "bin_mtime_ns": bin_stat.st_mtime_ns,
            "idx_bytes": idx_stat.st_size, "idx_mtime_ns": idx_stat.st_mtime_ns}


def _check_one(prefix: str, record: Optional[dict], cached: Optional[dict], vocab_size: int,
               progress) -> dict:
    """{'facts': {...}, 'problem': str or None, 'scanned': bytes read from the .bin}."""
    index = read_index(prefix + ".idx")
    problem = _size_problem(prefix, index)
    if problem:
        return {"problem": problem}
    actual = os.path.getsize(prefix + ".bin")
    stamp = _stamp(prefix)
    documents, tokens = _counts(index)
    if tokens * index.dtype_size != actual:
        # The last entry alone matched the .bin's size; the lengths as a whole do not.
        return {"problem": f"data index {prefix}.idx: its document lengths add up to {tokens} tokens "
                           f"({tokens * index.dtype_size} bytes), but {prefix}.bin holds {actual} bytes: "
                           f"a damaged index; re-run lm2-preprocess"}
    digest = file_digest(prefix + ".idx")
    scanned = 0
    if record is not None and "idx_sha256" in record and "max_id" in record:
        if digest != record["idx_sha256"]:
            return {"problem": f"data index {prefix}.idx: sha256 differs from the one its manifest recorded "
                               f"({documents} documents / {tokens} tokens here, {record.get('documents')} / "
                               f"{record.get('tokens')} in the manifest): damaged, or rewritten without "
                               f"lm2-preprocess; re-run it"}
        max_id, source = int(record["max_id"]), "manifest"
    elif cached is not None and cached.get("stamp") == stamp:
        max_id, source = int(cached["max_id"]), "scan cache"
    else:
        max_id, source = _scan_max_id(prefix, index.dtype, progress), "scan"
        scanned = actual
    if record is not None and (record.get("documents"), record.get("tokens")) != (documents, tokens) \
            and "documents" in record and "tokens" in record:
        return {"problem": f"data index {prefix}.idx: {documents} documents / {tokens} tokens, its manifest "
                           f"recorded {record['documents']} / {record['tokens']}; damaged or rebuilt "
                           f"without its manifest: re-run lm2-preprocess"}
    facts = {"documents": documents, "tokens": tokens, "max_id": max_id, "idx_sha256": digest,
             "source": source, "stamp": stamp}
    if max_id >= vocab_size:
        return {"facts": facts, "problem": (
            f"data shard {prefix}.bin: token id {max_id} is outside the model's vocabulary of {vocab_size} "
            f"(from the {source}); the shards were made with another tokenizer, or --vocab-size is too small")}
    return {"facts": facts, "problem": None, "scanned": scanned}


def check_shards(prefixes: List[str], vocab_size: int, manifest: Optional[str] = None,
                 cache_dir: Optional[str] = None, show_progress: bool = True) -> dict:
    """Check every shard (collective when distributed); returns {'digest', 'scanned_bytes',
    'seconds', 'by_source'}; raises ConfigError (one line, the same on every rank)."""
    started = time.perf_counter()
    rank, world = rank_world()
    records = manifest_shards(manifest)
    cache_path = os.path.join(cache_dir, SCAN_CACHE) if cache_dir else None
    cache = {}
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as handle:
                cache = json.load(handle)
        except (OSError, ValueError):
            cache = {}  # a damaged cache is rebuilt, never trusted
    mine = [os.path.normpath(os.path.abspath(p)) for p in prefixes][rank::world]
    to_scan = sum(os.path.getsize(p + ".bin") for p in mine
                  if not ("max_id" in records.get(p, {}) and "idx_sha256" in records.get(p, {}))
                  and (cache.get(p) or {}).get("stamp") != _stamp(p))
    progress = None
    if to_scan >= _SHOW_PROGRESS_FROM and show_progress and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=to_scan * world, unit="B", unit_scale=True, desc="scan shards without a manifest")
    results = {}
    try:
        for prefix in mine:
            results[prefix] = _check_one(prefix, records.get(prefix), cache.get(prefix), vocab_size, progress)
    finally:
        if progress is not None:
            progress.close()
    results = gather_merged(results)
    ordered = [os.path.normpath(os.path.abspath(p)) for p in prefixes]
    found = {p: r["facts"] for p, r in results.items() if "facts" in r}
    if cache_path and rank == 0 and any(f["source"] == "scan" for f in found.values()):
        # Kept even when a shard is refused: the scan's answer holds until the files change.
        os.makedirs(cache_dir, exist_ok=True)
        cache.update({p: {"stamp": f["stamp"], "max_id": f["max_id"]} for p, f in found.items()
                      if f["source"] == "scan"})
        write_json_atomic(cache_path, cache, indent=1)
    for prefix in ordered:
        if results[prefix].get("problem"):
            raise ConfigError(results[prefix]["problem"])
    facts = {p: results[p]["facts"] for p in ordered}
    scanned = sum(results[p].get("scanned", 0) for p in ordered)
    seconds = time.perf_counter() - started
    by_source: Dict[str, int] = {}
    for f in facts.values():
        by_source[f["source"]] = by_source.get(f["source"], 0) + 1
    return {"digest": blend_digest(ordered, facts), "scanned_bytes": scanned, "seconds": seconds,
            "by_source": by_source}


def blend_digest(prefixes: List[str], facts: Dict[str, dict]) -> str:
    digest = hashlib.sha256()
    for prefix in prefixes:
        digest.update(f"{prefix}\0{facts[prefix]['idx_sha256']}\0".encode())
    return digest.hexdigest()
