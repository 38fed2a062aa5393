"""Read and write Megatron dist checkpoints as one full (TP=1, PP=1) state dict.

A checkpoint saved at any TP/PP is loaded into a TP=1/PP=1 model in one process: Megatron's
dist_checkpointing reshards on load, so the converter never re-implements TP/PP layouts
(fused QKV per query group, [gate; up] fc1 shards, vocabulary shards, pipeline layer offsets).
Writing goes the same way: a TP=1/PP=1 model saved with dist_checkpointing, which any TP/PP
loads.

The model config travels next to the weights as `lm2_config.json` (megatron_config.py): lm2-train
writes it into every checkpoint, and so does this module's save_checkpoint.
A checkpoint's lm2_integrity.json (megatron_lm2.training.integrity; lm2-train and save_checkpoint
write it) is verified before loading: a damaged file is refused naming it, and so is a checkpoint
without the record unless the caller allows it unverified (--allow-unverified-checkpoint).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Dict

import torch

from megatron_lm2.convert.megatron_config import CONFIG_FILE, config_from_run_flags, read_config, write_config
# One error type for an unusable checkpoint, in training and in conversion.
from megatron_lm2.training.integrity import CheckpointError, verify, write_record
from megatron_lm2.training.integrity import describe as _first_line

EMBEDDING = "embedding.word_embeddings.weight"


# -------------------------------------------------------------------------------- checks
class _MetadataUnpickler(pickle.Unpickler):
    """Reads torch.distributed.checkpoint's `.metadata` (a pickle) allowing only the classes
    that file holds (DCP's metadata dataclasses, torch.Size, dtypes), so a crafted file cannot
    run code while we list its shard files."""

    _EXTRA = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module, name):
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module, name) in self._EXTRA
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise CheckpointError(f"unexpected object {module}.{name} in the checkpoint metadata")
        return super().find_class(module, name)


def read_metadata(checkpoint_dir: Path):
    """torch.distributed.checkpoint's metadata of a checkpoint, read with the restricted
    unpickler."""
    path = checkpoint_dir / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(io.BytesIO(f.read())).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{path}: unreadable checkpoint metadata: {exc!r}") from exc


def shard_files(metadata) -> set[str]:
    """The data files the metadata refers to (relative names)."""
    storage = getattr(metadata, "storage_data", None) or {}
    return {getattr(info, "relative_path", None) for info in storage.values()} - {None}


def embedding_info(metadata):
    """(global shape, dtype) of the word embeddings as saved, or None."""
    entry = (getattr(metadata, "state_dict_metadata", None) or {}).get(EMBEDDING)
    if entry is None or not hasattr(entry, "size"):
        return None
    return tuple(entry.size), entry.properties.dtype


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory itself, or the one a training run's `latest` file names."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    tracker = path / "latest"
    if not (path / "metadata.json").is_file() and tracker.is_file():
        from megatron_lm2.training.checkpoint import read_tracker  # one reading of `latest`

        return path / read_tracker(str(tracker))
    return path


def checkpoint_config(path: Path, metadata):
    """The model config of a checkpoint: its lm2_config.json. A training checkpoint written before
    lm2-train stored one is rebuilt from the run's flags that it does store (its flavor and model
    overrides), with the vocabulary size of the saved embedding."""
    if (path / CONFIG_FILE).is_file():
        return read_config(path)
    from megatron.core import dist_checkpointing

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a BaseException, too
        raise CheckpointError(f"{path}: cannot read common.pt: {_first_line(exc)}") from exc
    run = common.get("config") if isinstance(common, dict) else None
    if not run or "flavor" not in run:
        raise CheckpointError(
            f"{path}: no {CONFIG_FILE} and no training config in the checkpoint: cannot tell "
            f"which model it holds"
        )
    info = embedding_info(metadata)
    return config_from_run_flags(run, vocab_size=info[0][0] if info else None, source=str(path))


def check_checkpoint_dir(path: str | os.PathLike, allow_unverified: bool = False) -> Path:
    """A usable Megatron dist checkpoint directory (resolving a training run's `latest`), or a
    CheckpointError saying what is wrong (a missing integrity record too, unless
    `allow_unverified`)."""
    path = resolve_checkpoint(path)
    if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists():
        raise CheckpointError(
            f"{path} is a Hugging Face folder, not a Megatron checkpoint; use `lm2-convert from-hf`"
        )
    if not (path / "metadata.json").is_file():
        raise CheckpointError(
            f"{path}: not a Megatron dist checkpoint (no metadata.json; expected the directory "
            f"written by megatron.core.dist_checkpointing.save, or a training --save directory "
            f"with a `latest` file)"
        )
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path}: incomplete checkpoint: .metadata is missing (was the save interrupted?)"
        )
    problem = verify(str(path), allow_unverified)  # checksums; a missing record is refused
    if problem:
        raise CheckpointError(problem)
    missing = sorted(f for f in shard_files(read_metadata(path)) if not (path / f).is_file())
    if missing:
        raise CheckpointError(
            f"{path}: incomplete checkpoint: missing shard file(s) {', '.join(missing)}"
        )
    return path


# ------------------------------------------------------------------------- process setup
def ensure_single_process() -> None:
    """Megatron's parallel state for one process at TP=1/PP=1 (no-op if already set up, e.g.
    under megatron_lm2.testing.run_distributed with world size 1)."""
    import torch.distributed as dist

    from megatron_lm2 import distributed

    if dist.is_initialized():
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if dist.get_world_size() != 1 or tp != 1 or pp != 1:
            raise RuntimeError(
                "checkpoint conversion runs in a single process (world size 1, TP=1, PP=1); "
                f"this one has world size {dist.get_world_size()}, TP={tp}, PP={pp}"
            )
        return
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise RuntimeError(
            f"run lm2-convert as a single process, not under torchrun/srun "
            f"(WORLD_SIZE={os.environ['WORLD_SIZE']})"
        )
    distributed.initialize(1, 1)


def _build_single(config):
    from megatron_lm2.model import build_model

    single = config.replace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    return build_model(single, pre_process=True, post_process=True), single


def _plain(state: dict) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("_extra_state") and v is not None}


# --------------------------------------------------------------------------- load / save
def load_checkpoint(path: str | os.PathLike, allow_unverified: bool = False):
    """(config at TP=1/PP=1, full state dict {megatron name: tensor}) of a dist checkpoint saved
    at any TP/PP, or of the newest checkpoint of a training --save directory."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = check_checkpoint_dir(path, allow_unverified)
    metadata = read_metadata(path)
    config = checkpoint_config(path, metadata)
    info = embedding_info(metadata)
    if info is not None and info[1] != config.params_dtype:  # e.g. a bf16 training run
        config = config.replace(params_dtype=info[1], pipeline_dtype=info[1])
    ensure_single_process()
    model, single = _build_single(config)
    from torch.distributed.checkpoint.api import CheckpointException

    sharded = model.sharded_state_dict()
    # Named before loading: a tensor the model needs that the checkpoint lacks would otherwise
    # surface from inside the load (the fused memory gates are a ShardedTensorFactory, whose
    # merge fails on the missing halves with a message that names no tensor).
    lacking = sorted(_tensor_keys(sharded) - set(getattr(metadata, "state_dict_metadata", None) or ()))
    if lacking:
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(lacking)} tensor(s) the model needs (wrong "
            f"config or wrong checkpoint?): {', '.join(lacking[:8])}" + (" ..." if len(lacking) > 8 else "")
        )
    try:
        loaded, _, unexpected = dist_checkpointing.load(
            sharded, str(path), strict=StrictHandling.RETURN_UNEXPECTED
        )
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - re-raised with the path
        raise CheckpointError(f"{path}: cannot load the checkpoint: {_first_line(exc)}") from exc
    if unexpected:
        # Megatron's "unexpected" = keys the model asks for that the checkpoint lacks.
        names = sorted(getattr(k, "key", str(k)) for k in unexpected)
        raise CheckpointError(
            f"{path}: the checkpoint lacks {len(names)} tensor(s) the model needs (wrong "
            f"config or wrong checkpoint?): {', '.join(names[:8])}"
            + (" ..." if len(names) > 8 else "")
        )
    own = model.state_dict()
    model.load_state_dict({k: loaded[k] for k in own if k in loaded}, strict=True)
    return single, _plain(model.state_dict())


def _tensor_keys(sharded) -> set:
    """Keys of the sharded tensors a sharded state dict loads, factories expanded (built aside:
    the dict itself is left as the load needs it)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    keys = set()
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensorFactory):
            keys |= _tensor_keys(value.build())
        elif isinstance(value, ShardedTensor):
            keys.add(value.key)
    return keys


def save_checkpoint(state: Dict[str, torch.Tensor], config, path: str | os.PathLike,
                    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                    overwrite: bool = False) -> Path:
    """Write a dist checkpoint (loadable at any TP/PP) plus lm2_config.json, atomically: into a
    sibling temporary directory first, renamed into place when complete."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CheckpointError(f"{path} exists and is not empty (pass --overwrite to replace it)")
    ensure_single_process()
    model, single = _build_single(config)
    expected = set(_plain(model.state_dict()))
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise CheckpointError(
            f"weights do not match the model: missing {missing[:8]}, unexpected {extra[:8]}"
        )
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"{name}: shape {tuple(tensor.shape)} does not match the model's {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    write_config(
        config, tmp / CONFIG_FILE,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    # The checksums lm2-train's checkpoints carry, so the import is verified like them.
    write_record(str(tmp), 0, True, "imported by lm2-convert from-hf")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


