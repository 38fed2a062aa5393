"""What the checkpoint checksums cost: seconds per save on the quickstart's model and batch
(examples/quickstart.sh: debug flavor, seq 256, memory chunk 64, micro 4, global 8, fp32).

    python benchmarks/bench_checkpoint_integrity.py [--saves 5]

Per save: the whole save (dist_checkpointing write, sha256 of every file, rename, `latest`)
and, timed alone on the same files, the sha256 pass the save includes (reading back from the
page cache) and the verification a load does. Mock data: the checkpoint's size does not depend
on the data (the quickstart's tokenizer has the debug flavor's 2048-token vocabulary).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ARGS = ["--flavor", "debug", "--seq-length", "256", "--memory-chunk-size", "64", "--micro-batch-size", "4",
        "--global-batch-size", "8", "--train-iters", "1000", "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-warmup-iters", "15", "--seed", "1234", "--mock-data", "--keep-last", "2"]


def run(saves: int) -> list:
    from megatron_lm2.training import integrity
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.trainer import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        trainer = Trainer(parse_args(ARGS + ["--save", directory]))
        trainer.train_step()  # Adam state exists, as in a real save
        for index in range(saves + 1):  # the first save also starts the writer's helper process
            trainer.step = index + 1
            started = time.perf_counter()
            path = trainer.save()
            total = time.perf_counter() - started
            started = time.perf_counter()
            integrity.digest_files(path)
            hashing = time.perf_counter() - started
            started = time.perf_counter()
            assert integrity.verify(path) is None
            verify = time.perf_counter() - started
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            if index:
                rows.append((total, hashing, verify, size))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from megatron_lm2.testing import run_distributed

    rows = run_distributed(run, 1, args.saves)[0]
    from megatron_lm2.provenance import git_commit

    commit = git_commit()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"date {time.strftime('%Y-%m-%d')}; commit {commit}")
    print("shape: quickstart (debug flavor, seq 256, memory chunk 64, fp32 + Adam state, 1 rank)")
    median = [statistics.median(r[i] for r in rows) for i in range(4)]
    print("| checkpoint size | save, total (s) | sha256 pass in it (s) | verify on load (s) | sha256 share |")
    print("|---|---|---|---|---|")
    print(f"| {median[3] / 2**20:.1f} MiB | {median[0]:.3f} | {median[1]:.3f} | {median[2]:.3f} | "
          f"{100 * median[1] / median[0]:.0f}% |")
    print(f"(median of {len(rows)} saves)")


if __name__ == "__main__":
    sys.exit(main())
