"""Run one preprocessing job on this rank: tasks -> worker pool -> per-file sharders.

Ranks (mpi4py, when launched by mpiexec/srun with MPI) split the input files between them by a
deterministic size-balanced assignment; since shards never span files, the shards do not depend
on the number of ranks. Rank 0 waits for all ranks, then writes the manifest (and blend).

Memory stays bounded: at most ``2 * workers + 2`` tasks are in flight, each at most
``rows_per_task`` rows, and the writer holds one open shard per rank.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from megatron_lm2.folder_lock import lock_on_rank0
from megatron_lm2.preprocess import encode as encode_mod
from megatron_lm2.preprocess.manifest import build_manifest, check_or_write_run, write_manifest
from megatron_lm2.preprocess.readers import InputFile, discover_inputs, iter_tasks
from megatron_lm2.preprocess.shards import FileSharder, load_state
from megatron_lm2.tokenizer import TokenizerError, load_tokenizer
from megatron_lm2.tokenizer.encoders import (FAST_ENCODERS, EncoderUnavailable, fast_encoder, library_version,
                                             reference_encoder)


class EncoderMismatch(TokenizerError):
    """A forced fast encoder that differs from the reference on a file's sample."""


@dataclass(kw_only=True)
class PreprocessConfig:
    inputs: list[str]
    output: str
    tokenizer: str | None = None          # None: the embedded default
    eod_token: str | None = None
    json_key: str = "text"
    subsets: list[str] | None = None
    shard_tokens: int = 1_000_000_000
    workers: int | None = None            # None: this rank's share of the CPU cores; 0: encode in-process
    rows_per_task: int = 1024
    encode_batch: int = 128               # texts per reference-encoder call (the fast one takes a task)
    encoder: str = "auto"                 # "auto", "reference" (alias "hf"), or a fast encoder ("fastokens")
    verify_first_bytes: int = 1 << 20     # per file: text from the start checked fast == reference
    verify_random_bytes: int = 2 << 20    # per file: text from random places checked
    verify_seed: int = 0
    fsync: bool = True                    # shards and records reach the disk before they count
    progress: bool = True
    command: list[str] = field(default_factory=list)


@dataclass
class RankStats:
    documents: int = 0
    tokens: int = 0
    rows: int = 0
    seconds: float = 0.0
    files: int = 0


def mpi_comm():
    """COMM_WORLD when launched under MPI (and mpi4py is installed), else None."""
    markers = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    if not any(m in os.environ for m in markers):
        return None
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("launched under MPI but mpi4py is not installed: pip install mpi4py mpich") from e
    return MPI.COMM_WORLD


def default_workers(local_ranks: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_ranks))


def assign_files(files: list[InputFile], rank: int, world: int) -> list[int]:
    """Largest-first onto the least-loaded rank: deterministic, balanced by bytes."""
    load = [0] * world
    owner = {}
    for i in sorted(range(len(files)), key=lambda i: (-files[i].size, i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += files[i].size
    return [i for i in range(len(files)) if owner[i] == rank]


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc raises its mmap threshold after each large free, so the multi-MB task buffers end up
    on the heap, which fragments and keeps growing over a long stream; a fixed threshold keeps
    them in mmap'd blocks that go back to the OS when freed (workers inherit it on fork)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def run(cfg: PreprocessConfig) -> tuple[dict | None, RankStats]:
    """Preprocess; returns (manifest on rank 0 else None, this rank's stats)."""
    _fixed_mmap_threshold()
    comm = mpi_comm()
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)

    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    fast_name, fast_note = choose_fast_encoder(tokenizer, cfg.encoder)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size < 65500 else np.int32)
    files = discover_inputs(cfg.inputs, cfg.subsets)
    out_dir = Path(cfg.output)
    # One writer per --output, before anything is written.
    lock = lock_on_rank0(cfg.output, "lm2-preprocess", "--output", rank,
                         share=(lambda x: comm.bcast(x, root=0)) if comm is not None and world > 1 else (lambda x: x),
                         warn=lambda line: print(f"lm2-preprocess: warning: {line}", file=sys.stderr))
    try:
        return _run_locked(cfg, comm, rank, world, tokenizer, fast_name, fast_note, dtype, files, out_dir)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg, comm, rank, world, tokenizer, fast_name, fast_note, dtype, files, out_dir):
    run_record = {"tokenizer": tokenizer.identity(), "shard_tokens": cfg.shard_tokens, "json_key": cfg.json_key,
                  "dtype": dtype.name, "files": [{"path": f.path, "size": f.size} for f in files]}
    check_or_write_run(out_dir, run_record, write=rank == 0)   # every rank fails the same way
    if comm is not None:
        comm.Barrier()

    local_ranks = int(os.environ.get("MPI_LOCALNRANKS", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")))
    workers = default_workers(local_ranks) if cfg.workers is None else cfg.workers
    mine = assign_files(files, rank, world)
    # fork starts workers in milliseconds; under MPI a forked child of an MPI process is unsafe
    start_method = "fork" if comm is None and sys.platform == "linux" else "spawn"
    try:
        stats = _process(cfg, tokenizer, dtype, files, mine, out_dir, workers, start_method,
                         show=cfg.progress and rank == 0, fast_name=fast_name)
    except BaseException as e:
        if comm is not None and world > 1:
            # the other ranks would wait for this one forever; committed shards stay for the rerun
            print(f"lm2-preprocess: rank {rank} failed: {e!r}; aborting all ranks", file=sys.stderr, flush=True)
            comm.Abort(1)
        raise

    if comm is not None:
        all_stats = comm.gather(stats, root=0)
    else:
        all_stats = [stats]
    manifest = None
    if rank == 0:
        total = RankStats(sum(s.documents for s in all_stats), sum(s.tokens for s in all_stats),
                          sum(s.rows for s in all_stats), max(s.seconds for s in all_stats),
                          sum(s.files for s in all_stats))
        manifest = build_manifest(out_dir, files, run_record, cfg.command)
        manifest["last_run"] = {"ranks": world, "workers_per_rank": workers, "seconds": round(total.seconds, 3),
                                "documents": total.documents, "tokens": total.tokens,
                                "encoder_requested": cfg.encoder, "fast_encoder": fast_name,
                                "fast_encoder_note": fast_note, "fsync": cfg.fsync}
        write_manifest(out_dir, manifest, cfg.fsync)
        stats = total
    if comm is not None:
        comm.Barrier()
    return manifest, stats


def choose_fast_encoder(tokenizer, requested: str) -> tuple[str | None, str]:
    """(fast encoder to verify per file or None, a note saying why). ``auto`` takes the first
    fast encoder that is installed and loads this tokenizer; a named one must, or the run stops."""
    if requested in ("reference", "hf", "sentencepiece"):
        return None, f"--encoder {requested}: the reference encoder only"
    names = FAST_ENCODERS if requested == "auto" else (requested,)
    if requested != "auto" and requested not in FAST_ENCODERS:
        raise EncoderUnavailable(f"--encoder {requested}: unknown (choose auto, hf, {', '.join(FAST_ENCODERS)})")
    reasons = []
    for name in names:
        try:
            enc = fast_encoder(tokenizer, name)
        except EncoderUnavailable as e:
            if requested != "auto":
                raise EncoderUnavailable(f"--encoder {requested}: {e}") from e
            reasons.append(str(e))
            continue
        return name, f"{enc.name}, verified per file against {reference_encoder(tokenizer).name}"
    return None, "no fast encoder: " + "; ".join(reasons)


def _process(cfg, tokenizer, dtype, files, mine, out_dir, workers, start_method, show,
             fast_name: str | None = None) -> RankStats:
    stats = RankStats()
    start = time.perf_counter()
    states = {i: load_state(out_dir, files[i]) for i in mine}
    todo = [i for i in mine if states[i].done is None]

    pool = None
    local = None  # the encoders of the in-process path
    if workers > 0 and todo:
        pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context(start_method), initializer=encode_mod.init_worker,
            initargs=(str(tokenizer.path), cfg.eod_token, cfg.json_key, dtype.name, cfg.encode_batch, fast_name))
    elif todo:
        local = encode_mod.make_encoders(str(tokenizer.path), cfg.eod_token, cfg.json_key, dtype.name,
                                         cfg.encode_batch, fast_name)
    verify_args = (cfg.verify_seed, cfg.verify_first_bytes, cfg.verify_random_bytes)
    verdicts: dict = {}

    def request_verdicts(position: int) -> None:
        """Verdicts for this file and the next ``workers`` ones, so a file's sample is checked
        while the previous file is encoding."""
        if fast_name is None:
            return
        for i in todo[position:position + max(1, workers) + 1]:
            if i not in verdicts:
                if pool is not None:
                    verdicts[i] = pool.submit(encode_mod.worker_verify, files[i], *verify_args)
                else:
                    from megatron_lm2.preprocess.verify import verify_file

                    verdicts[i] = verify_file(files[i], local, *verify_args)

    ref_name = reference_encoder(tokenizer).name
    fast_label = None
    bar = _progress_bar(files, mine, states, show)
    window = 2 * workers + 2
    pending: deque = deque()
    sharders: dict[int, FileSharder] = {}

    def drain_one():
        item = pending.popleft()
        task = item[0]
        if task.end:
            sharders.pop(task.file_index).finish(total_rows=task.first_row)
            stats.files += 1
            return
        batch = item[1].result() if pool is not None else item[1]
        sharders[task.file_index].add(batch)
        stats.documents += len(batch.lengths)
        stats.tokens += int(batch.lengths.sum())
        stats.rows += task.num_rows
        if bar is not None:
            bar.update(task.num_rows)
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats.documents / elapsed:,.0f} docs/s, {stats.tokens / elapsed:,.0f} tok/s")

    try:
        for position, i in enumerate(todo):
            f = files[i]
            request_verdicts(position)
            verdict, use_fast = None, False
            if fast_name is not None:
                verdict = verdicts.pop(i)
                verdict = verdict.result() if pool is not None else verdict
                use_fast = verdict["result"] == "equal"
                if fast_label is None:
                    fast_label = f"{fast_name} {library_version(fast_name)}"
                verdict = {"encoder": fast_label, "reference": ref_name, **verdict}
                if not use_fast and cfg.encoder != "auto":
                    raise EncoderMismatch(
                        f"{f.path}: {fast_label} encodes {verdict['first_difference']} differently from {ref_name}; "
                        f"nothing of this file was written with it. Rerun with --encoder auto (falls back to "
                        f"{ref_name} for such files) or --encoder hf")
            sharders[i] = FileSharder(out_dir, f, states[i], cfg.shard_tokens, dtype,
                                      encoder=fast_label if use_fast else ref_name, verification=verdict,
                                      fsync=cfg.fsync)
            for task in iter_tasks(i, f, states[i].next_row, cfg.rows_per_task, json_key=cfg.json_key):
                if task.end:
                    pending.append((task,))
                elif pool is not None:
                    pending.append((task, pool.submit(encode_mod.worker_encode, task, use_fast)))
                else:
                    pending.append((task, encode_mod.encode_task(task, local, use_fast)))
                while len(pending) > window or (pending and pending[0][0].end):
                    drain_one()
        while pending:
            drain_one()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _progress_bar(files, mine, states, show):
    if not show:
        return None
    from tqdm import tqdm

    parquet_only = all(files[i].kind == "parquet" for i in mine)
    total = None
    if parquet_only:
        import pyarrow.parquet as pq

        total = 0
        for i in mine:
            try:
                total += pq.ParquetFile(files[i].path).metadata.num_rows
            except Exception:
                total += 0  # corrupt: reported by the worker
    done_rows = sum(s.done["rows"] if s.done else s.next_row for s in states.values())
    return tqdm(total=total, initial=done_rows, unit="row", desc="lm2-preprocess", dynamic_ncols=True,
                smoothing=0.1)
