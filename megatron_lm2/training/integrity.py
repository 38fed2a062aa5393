"""What a checkpoint says about itself: the checksum of every file it holds and whether the
trainer knew its weights to be good when it wrote it.

    <checkpoint>/lm2_integrity.json
    {"format": 1, "step": 200, "known_good": true, "reason": "...", "algorithm": "sha256",
     "files": {"__0_0.distcp": {"bytes": 123, "sha256": "..."}, "common.pt": {...}, ...}}

Written after dist_checkpointing.save returns (the files are still in the page cache, so the
hashing reads memory, not disk) and before the checkpoint's directory is renamed into place, so
a checkpoint that `latest` names always has it. The hashing is split over the ranks (file i on
rank i mod world), which assumes what the rename already does: a filesystem every rank sees.

"Known good" is the trainer's verdict: every weight finite, the step before it not skipped, and
(recorded afterwards, see demote) the first step after it not skipped either: the weights a
too-large update leaves can be finite yet give NaN gradients on the next batch.

A checkpoint without the file is refused (CheckpointError naming the file): losing that one file
must not turn the check off. `--allow-unverified-checkpoint` (lm2-train, lm2-convert, lm2-eval)
loads one anyway, for checkpoints written before the record existed; its goodness is unknown
(None), which keep-last treats as good.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron_lm2.cli_errors import UserInputError
from megatron_lm2.fileio import write_json_atomic

INTEGRITY_FILE = "lm2_integrity.json"
ALLOW_FLAG = "--allow-unverified-checkpoint"
ALGORITHM = "sha256"
_BLOCK = 1 << 22  # 4 MiB reads


class CheckpointError(UserInputError):
    """A checkpoint that cannot be used (damaged, incomplete, unreadable); the message names the
    checkpoint directory or the file at fault."""


def describe(error: BaseException) -> str:
    """One line for a load failure. torch's CheckpointException (a BaseException) wraps each
    failing rank's exception with its traceback: name the first rank's exception instead."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(inner, BaseException):
            return f"rank {rank}: {describe(inner)}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def rank_world() -> tuple:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _files(directory: str) -> List[str]:
    names = []
    for root, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != INTEGRITY_FILE and not name.endswith(".tmp"):
                names.append(rel)
    return sorted(names)


def file_digest(path: str) -> str:
    digest = hashlib.new(ALGORITHM)
    with open(path, "rb") as handle:
        while True:
            block = handle.read(_BLOCK)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def gather_merged(part: dict) -> dict:
    """Every rank's share merged (collective when distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    merged = {}
    for item in parts:
        merged.update(item)
    return merged


def digest_files(directory: str) -> Dict[str, dict]:
    """{relative name: {bytes, sha256}} of every file in `directory` (collective)."""
    rank, world = rank_world()
    names = _files(directory)
    mine = {name: {"bytes": os.path.getsize(os.path.join(directory, name)),
                   ALGORITHM: file_digest(os.path.join(directory, name))}
            for name in names[rank::world]}
    return gather_merged(mine)


def write_record(directory: str, step: int, known_good: bool, reason: str) -> None:
    """Hash the checkpoint's files (collective) and write lm2_integrity.json (rank 0)."""
    files = digest_files(directory)
    if rank_world()[0] == 0:
        record = dict(format=1, step=step, known_good=bool(known_good), reason=reason,
                      algorithm=ALGORITHM, files=files)
        _write_record(directory, record)


def demote(directory: str, reason: str) -> None:
    """Record a checkpoint as not known-good after the fact (rank 0): the first step after it
    had a non-finite loss or gradient, so its weights may be the cause. Checksums are kept."""
    record = read_record(directory)
    if record is None or not record.get("known_good"):
        return
    record.update(known_good=False, reason=reason)
    _write_record(directory, record)


def _write_record(directory: str, record: dict) -> None:
    """Atomically (tmp + fsync + rename): a crash leaves the old record or the new, never half."""
    write_json_atomic(os.path.join(directory, INTEGRITY_FILE), record, indent=1, sort_keys=True, fsync=True)


def read_record(directory: str) -> Optional[dict]:
    """The integrity record, None for a checkpoint that has none (older code)."""
    path = os.path.join(directory, INTEGRITY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            record = json.load(handle)
        if not isinstance(record.get("files"), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: unreadable integrity record ({error})") from None
    return record


def known_good(directory: str) -> Optional[bool]:
    """True / False as the trainer recorded it; None when unknown (no record, or unreadable)."""
    try:
        record = read_record(directory)
    except CheckpointError:
        return False
    return None if record is None else bool(record.get("known_good"))


def _check_one(directory: str, name: str, entry: dict) -> Optional[str]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return f"{path}: missing (the checkpoint's integrity record lists it)"
    size = os.path.getsize(path)
    if size != entry.get("bytes"):
        return f"{path}: {size} bytes, the checkpoint recorded {entry.get('bytes')} (truncated or damaged file)"
    if file_digest(path) != entry.get(ALGORITHM):
        return f"{path}: {ALGORITHM} does not match the one recorded at save time (damaged file)"
    return None


def missing_record(directory: str) -> str:
    """The one line for a checkpoint without an integrity record."""
    return (f"{os.path.join(directory, INTEGRITY_FILE)}: missing, so the checkpoint's files cannot be "
            f"verified; pass {ALLOW_FLAG} to load it unverified (a checkpoint written before the "
            f"record existed)")


def verify(directory: str, allow_unverified: bool = False) -> Optional[str]:
    """None when every file matches its recorded size and checksum (or there is no record and
    `allow_unverified`); else one line naming the first bad file, or the missing record.
    Collective when distributed: each rank checks its share and every rank returns the same
    answer (every rank sees the same directory, so the missing-record answer agrees too)."""
    record = read_record(directory)
    if record is None:
        return None if allow_unverified else missing_record(directory)
    rank, world = rank_world()
    names = sorted(record["files"])
    problems = {}
    for name in names[rank::world]:
        problem = _check_one(directory, name, record["files"][name])
        if problem:
            problems[name] = problem
    problems = gather_merged(problems)
    return problems[min(problems)] if problems else None
