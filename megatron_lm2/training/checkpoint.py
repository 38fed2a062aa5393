"""Checkpoints with megatron.core.dist_checkpointing: atomic, keep-last-K, auto-resume,
loadable at another TP/PP layout.

Layout of a save directory:

    <save>/iter_0000200/      one dist_checkpointing checkpoint (every rank's shards)
    <save>/iter_0000300/
    <save>/latest             "iter_0000300": the newest COMPLETE checkpoint
    <save>/.tmp-iter_0000400/ a save in progress (deleted by the next save)
    <save>/damaged-iter_0000500/  a checkpoint --load-fallback found damaged (kept for a look)

Every checkpoint holds lm2_config.json (convert/megatron_config.py): the model it holds, every
model field (vocabulary and dtype included), so that conversion and evaluation read the model
from the checkpoint itself, not from the run's flags.

Every checkpoint holds lm2_integrity.json (integrity.py): its files' sizes and sha256 (the
config's too), and
whether the trainer knew its weights to be good (all finite, last step not skipped). Loading
verifies the checksums first and refuses a damaged checkpoint naming the file; keep-last never
deletes the newest known-good checkpoint, even when it is older than the last K.

Atomicity: all ranks write into `.tmp-iter_N`; after a barrier rank 0 renames it to `iter_N`,
then replaces `latest` (tmp file + fsync + os.replace). A process killed at any point leaves
`latest` naming a complete checkpoint, so resuming never sees a half-written one.

What a checkpoint holds: the model's sharded state dict, the distributed optimizer's state in
Megatron's "fully_reshardable" form (so a different TP/PP/DP can load it), the LR scheduler,
the step, the data position (consumed samples), the skipped-step counters and every rank's RNG
states. No memory-bank state: every training sequence starts from M_0 (see docs/training.md).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_lm2.compat import checkpoint_writer_dies_with_us, patch_torch_adam_loading
from megatron_lm2.compat import cuda_available
from megatron_lm2.convert.megatron_config import CONFIG_FILE, write_config
from megatron_lm2.fileio import fsync_dir as _fsync_dir, write_text_atomic
from megatron_lm2.training import integrity
from megatron_lm2.training.integrity import CheckpointError
from megatron_lm2.training.signals import all_ranks

TRACKER = "latest"
_ITER = re.compile(r"^iter_(\d{7,})$")
# Megatron's format that reshards the distributed optimizer across TP, PP and DP.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def iteration_dir(step: int) -> str:
    return f"iter_{step:07d}"


class TrackerError(CheckpointError, RuntimeError):
    """`latest` names something that is not a checkpoint."""


def latest_checkpoint(directory: Optional[str]) -> Optional[str]:
    """The checkpoint `directory/latest` names, or `directory` itself when it is one; None when
    there is nothing to resume from."""
    if not directory or not os.path.isdir(directory):
        return None
    if os.path.isfile(os.path.join(directory, "metadata.json")):
        return directory
    tracker = os.path.join(directory, TRACKER)
    if not os.path.isfile(tracker):
        return None
    return os.path.join(directory, read_tracker(tracker))


_TRACKER_MAX = 256  # an iter_N name is 12-20 bytes: read no more of a file of any size


def read_tracker(tracker: str) -> str:
    """The checkpoint name a `latest` file holds; TrackerError (one line) for any content that is
    not one iter_N directory beside it: binary, huge, empty, non-UTF-8, a path elsewhere."""
    directory = os.path.dirname(tracker)
    try:
        with open(tracker, "rb") as handle:
            raw = handle.read(_TRACKER_MAX + 1)
    except OSError as error:
        raise TrackerError(f"{tracker}: cannot read it ({error.strerror})") from None
    text = raw[:_TRACKER_MAX].decode("ascii", errors="replace").strip()
    shown = repr(text[:40] + ("..." if len(text) > 40 or len(raw) > _TRACKER_MAX else ""))
    if len(raw) > _TRACKER_MAX or not _ITER.match(text) or not raw.isascii():
        raise TrackerError(f"{tracker} holds {shown}, not the name of a checkpoint directory (iter_NNNNNNN) "
                           f"in {directory}; point it at one or remove it")
    if not os.path.isdir(os.path.join(directory, text)):
        raise TrackerError(f"{tracker} names {text!r}, which is not a checkpoint directory in {directory}")
    return text


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """DDP -> Float16Module -> GPTModel: the module whose sharded_state_dict names parameters
    the same at every layout and precision."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _layout() -> dict:
    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
    )


def _rng_state() -> dict:
    return dict(
        random=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state() if cuda_available() else None,
        tracker=get_cuda_rng_tracker().get_states(),
    )


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and cuda_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(state: Optional[dict]) -> ShardedObject:
    # One object per (PP, TP) rank; DP replicas share it (replica_id = DP rank).
    layout = _layout()
    return ShardedObject(
        "rng_state", state, (layout["pp"], layout["tp"]),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(),
    )


def _model_key(index: int, chunks) -> str:
    """The checkpoint key of model chunk `index`: "model", or model0, model1, ... with virtual
    pipeline stages (Megatron-LM's names)."""
    return "model" if len(chunks) == 1 else f"model{index}"


def _model_state(chunks) -> dict:
    return {_model_key(i, chunks): unwrap(chunk).sharded_state_dict(metadata=SHARDING_METADATA)
            for i, chunk in enumerate(chunks)}


def _sharded_state(chunks, optimizer, is_loading: bool, with_rng: bool) -> dict:
    state = _model_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=SHARDING_METADATA)
    if with_rng:
        state["rng_state"] = _rng_object(None if is_loading else _rng_state())
    return state


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh torch AdamW has no per-parameter state until its first step, and the distributed
    optimizer's state_dict() (which sharded_state_dict(is_loading=True) calls) needs `step` in
    it when neither Apex nor TE provides the fused Adam. Create the state torch would create,
    zeros; loading overwrites it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state[param]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(param, memory_format=torch.preserve_format))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param, memory_format=torch.preserve_format))


def _unshare_adam_steps(optimizer) -> None:
    """The distributed optimizer's loader (no Apex/TE) gives every parameter the SAME `step`
    tensor; torch's AdamW increments each parameter's step in place, so a shared one would
    advance once per parameter and skew the bias correction. One tensor per parameter."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            for state in torch_optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_tracker(directory: str, name: str) -> None:
    write_text_atomic(os.path.join(directory, TRACKER), name + "\n", encoding=None, fsync=True,
                      sync_dir=True)


def list_checkpoints(directory: str) -> List[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER.match, os.listdir(directory)) if m)


def save_checkpoint(directory: str, step: int, chunks, optimizer, scheduler, train_state: dict,
                    keep_last: int = 0, config: Optional[dict] = None, known_good: bool = True,
                    reason: str = "") -> str:
    """Save on every rank (collective). Returns the final checkpoint path. `known_good` goes
    into the integrity record (the trainer's verdict on the weights)."""
    name = iteration_dir(step)
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".tmp-{name}")
    checkpoint_writer_dies_with_us()
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(tmp):  # left by a save that was killed
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()

    _materialize_optimizer_state(optimizer)  # a save before the first step (step 0)
    state = _sharded_state(chunks, optimizer, is_loading=False, with_rng=True)
    state["scheduler"] = scheduler.state_dict()
    state["train_state"] = dict(train_state, step=step)
    state["layout"] = _layout()
    state["config"] = config or {}
    # Every write of the save can meet a full disk. A rank that fails says so to the others
    # (all_ranks) instead of leaving them at a barrier; a full disk is one line (below).
    problem = None
    # megatron-core logs a failed write before raising it; the error itself is reported below.
    writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level, writer_log.level = writer_log.level, logging.CRITICAL
    try:
        dist_checkpointing.save(state, tmp)
        if dist.get_rank() == 0:  # before the integrity record, which hashes it too
            model = unwrap(chunks[0]).config
            write_config(model, os.path.join(tmp, CONFIG_FILE),
                         tensor_model_parallel_size=model.tensor_model_parallel_size,
                         pipeline_model_parallel_size=model.pipeline_model_parallel_size)
    except BaseException as error:  # torch's CheckpointException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        problem = error
    finally:
        writer_log.setLevel(level)
    if not all_ranks(problem is None):
        _save_failed(directory, tmp, problem)
    try:
        integrity.write_record(tmp, step, known_good, reason)  # collective: hashing split over ranks
    except OSError as error:
        problem = error
    if not all_ranks(problem is None):
        _save_failed(directory, tmp, problem)
    _barrier()

    if dist.get_rank() == 0:
        if os.path.exists(final):  # a checkpoint of this step that `latest` never named
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
        _write_tracker(directory, name)
        _prune(directory, keep_last, keep=step)
    _barrier()
    return final


_NEARLY_FULL = 4 << 20


class DiskFullError(CheckpointError):
    """The save ran out of space; `latest` still names the last complete checkpoint."""


def _directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _out_of_space(error: Optional[BaseException]) -> bool:
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _save_failed(directory: str, tmp: str, problem: Optional[BaseException]) -> None:
    """Called on every rank after a failed save: the partial checkpoint goes (it would only
    hold the space), `latest` stays where it was; a full disk (ENOSPC/EDQUOT somewhere in the
    error, or less space free than the last checkpoint took) is one line with the numbers, on
    every rank; anything else keeps its traceback."""
    partial = _directory_bytes(tmp)
    free_at_failure = shutil.disk_usage(directory).free
    _barrier()
    tracker = os.path.join(directory, TRACKER)
    previous = read_tracker(tracker) if os.path.isfile(tracker) else None
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    free = shutil.disk_usage(directory).free
    needed = _directory_bytes(os.path.join(directory, previous)) if previous else 0
    # torch's writer reports a full disk as "unexpected pos N vs M": judge by the space as well.
    full = _out_of_space(problem) or (needed and free < needed) or free_at_failure < _NEARLY_FULL
    if full or problem is None:
        kept = f"`latest` still names {previous}" if previous else "there is no earlier checkpoint"
        if full:
            size = (f"a checkpoint here takes {needed / 2**20:.1f} MiB (the last one)" if needed else
                    f"{partial / 2**20:.1f} MiB were written before it failed")
            raise DiskFullError(f"--save {directory}: no space left on the device during the save of "
                                f"{os.path.basename(tmp)[len('.tmp-'):]}: {size}, {free / 2**20:.1f} MiB are free "
                                f"with the partial save removed; {kept}. Free space (or lower --keep-last) "
                                f"and rerun to resume")
        raise CheckpointError(f"--save {directory}: the save failed on another rank; {kept}")
    raise problem


def _prune(directory: str, keep_last: int, keep: int) -> None:
    for entry in os.listdir(directory):
        if entry.startswith(".tmp-iter_"):
            shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
    if keep_last <= 0:
        return
    steps = list_checkpoints(directory)
    good = newest_known_good(directory)
    for step in steps[:-keep_last]:
        path = os.path.join(directory, iteration_dir(step))
        if step != keep and path != good:
            shutil.rmtree(path, ignore_errors=True)


def newest_known_good(directory: Optional[str], below: Optional[int] = None) -> Optional[str]:
    """The newest checkpoint in `directory` not recorded as bad (a checkpoint from before the
    integrity records counts as good), optionally only those older than step `below`."""
    if not directory:
        return None
    for step in reversed(list_checkpoints(directory)):
        if below is not None and step >= below:
            continue
        path = os.path.join(directory, iteration_dir(step))
        if integrity.known_good(path) is not False:
            return path
    return None


def step_of(path: str) -> Optional[int]:
    match = _ITER.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint out of the iter_* namespace (rank 0), so that neither keep-last
    nor `latest` can pick it again; the files stay for inspection."""
    directory, name = os.path.split(os.path.normpath(path))
    target = os.path.join(directory, f"damaged-{name}")
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(path, target)
    _fsync_dir(directory)
    return target


def point_latest_at(path: str) -> None:
    directory, name = os.path.split(os.path.normpath(path))
    _write_tracker(directory, name)


def _load_error(path: str, error: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: cannot load the checkpoint ({integrity.describe(error)})")


def verify_checkpoint(path: str, allow_unverified: bool = False) -> None:
    """Refuse a damaged checkpoint, or one without its integrity record unless
    `allow_unverified` (collective): one line naming the file."""
    problem = integrity.verify(path, allow_unverified)
    if problem:
        raise CheckpointError(problem)


def _load(state, path, **kwargs):
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(state, path, **kwargs)
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - re-raised naming the path
        raise _load_error(path, error) from error


def load_common(path: str) -> dict:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load_common_state_dict(path)
    except (Exception, CheckpointException) as error:  # noqa: BLE001
        raise _load_error(os.path.join(path, "common.pt"), error) from error


def load_checkpoint(path: str, chunks, optimizer, scheduler, load_optimizer: bool = True,
                    allow_unverified: bool = False) -> dict:
    """Load into the model chunks (any TP/PP layout), the optimizer and the scheduler; restore
    RNG when the layout matches the saved one. Returns the train_state dict (step, consumed
    samples, counters) and `resharded` (True when the layout differs). A damaged checkpoint
    (checksums), one without its integrity record (unless `allow_unverified`) or one that fails
    to load raises CheckpointError naming it."""
    verify_checkpoint(path, allow_unverified)
    common = load_common(path)
    saved, now = common.get("layout", {}), _layout()
    same_layout = saved.get("tp") == now["tp"] and saved.get("pp") == now["pp"]
    # RNG streams exist per (PP, TP) rank: another layout cannot take them over.
    if load_optimizer:
        _materialize_optimizer_state(optimizer)
        patch_torch_adam_loading(optimizer)
    state = _sharded_state(chunks, optimizer if load_optimizer else None, is_loading=True,
                           with_rng=same_layout)
    loaded = _load(state, path)
    for index, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[_model_key(index, chunks)], strict=True)
    if load_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
    else:
        optimizer.reload_model_params()
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    train_state = dict(loaded["train_state"])
    train_state["resharded"] = not same_layout
    train_state["saved_layout"] = saved
    return train_state


def read_train_state(path: str) -> dict:
    """Step, data position and counters of a checkpoint, without a model (any process)."""
    return dict(load_common(path)["train_state"])


def load_weights(path: str, chunks, allow_unverified: bool = False) -> None:
    """Weights only (any TP/PP layout): the model tensors of a dist checkpoint, e.g. one written by
    `lm2-convert from-hf` or a training checkpoint whose optimizer state is to be dropped."""
    state = _model_state(chunks)
    verify_checkpoint(path, allow_unverified)
    loaded = _load(state, path)
    for index, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(loaded[_model_key(index, chunks)], strict=True)
