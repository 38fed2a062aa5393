"""Process-group set-up: NCCL on GPUs, gloo (behind the CPU compatibility layer) otherwise."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_lm2.compat import cuda_available, enable_cpu_compat


def free_port() -> int:
    """A TCP port that is free on this host right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> tuple[int, int]:
    """Initialise torch.distributed and Megatron's parallel state; works under torchrun, srun
    (SLURM_* variables) and plain `python` (a world of one). Returns (rank, world_size)."""
    _env_from_slurm()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A world of one (plain `python`): any free port, so two runs on a box don't collide.
        # Launchers (torchrun, the slurm scripts) always set it.
        single = os.environ.get("WORLD_SIZE", "1") == "1"
        os.environ["MASTER_PORT"] = str(free_port()) if single else "29500"
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    if cuda_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        backend = "nccl"
    else:
        enable_cpu_compat()
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes)
        )

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-model-parallel-size "
            f"{tensor_model_parallel_size} x pipeline-model-parallel-size "
            f"{pipeline_model_parallel_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    model_parallel_cuda_manual_seed(seed)
    return rank, world_size


def destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _env_from_slurm() -> None:
    """srun-native launch (one task per GPU): map SLURM_* onto the torchrun variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
