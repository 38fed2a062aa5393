"""Run a test function on N processes (gloo on CPU, NCCL on GPUs): the one helper every
distributed test uses.

    results = run_distributed(_check_tp, world_size=2, tp=2)   # also pp=, vpp= (interleaved)

`func(*args)` runs in every rank after `megatron_lm2.distributed.initialize(tp, pp)`; its
return values come back as a list indexed by rank. A failure in any rank raises here with
that rank's traceback. `func` must be importable (a module-level function) because the
processes are spawned.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_lm2.distributed import free_port


def _worker(rank, world_size, port, tp, pp, vpp, seed, func, args, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from megatron_lm2 import distributed

    try:
        distributed.initialize(tp, pp, vpp, seed=seed)
        result = func(*args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:  # report every failure, including assertion errors, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        distributed.destroy()


def run_distributed(
    func: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    seed: int = 1234,
) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        ctx = mp.start_processes(
            _worker,
            args=(world_size, port, tp, pp, vpp, seed, func, args, out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join():
                pass
        except Exception as exc:
            errors = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"{rank}.pt")
                if os.path.exists(path):
                    record = torch.load(path, weights_only=False)
                    if not record["ok"]:
                        errors.append(f"--- rank {rank} ---\n{record['error']}")
            raise AssertionError("distributed test failed:\n" + "\n".join(errors)) from exc
        return [
            torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=False)["result"]
            for rank in range(world_size)
        ]
