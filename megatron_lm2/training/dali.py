"""`--dataloader dali`: the same micro-batches as the default loader, through an NVIDIA DALI
pipeline (prefetching in DALI's worker threads, batches handed over on the GPU when there is
one; on a CPU-only machine the pipeline runs with device_id=None).

The samples still come from Megatron's GPTDataset in the MicroBatchSampler's order: DALI's
external_source pulls one micro-batch of indices at a time, so the sequence of batches, and a
resume from `consumed_samples`, are exactly those of the default loader (a test checks this).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from megatron_lm2.training.data import MicroBatchSampler

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class _MicroBatchSource:
    """DALI external_source callable (batch mode): one micro-batch per call, columns as lists."""

    def __init__(self, dataset, sampler: MicroBatchSampler):
        self.dataset = dataset
        self.batches = iter(sampler)

    def __call__(self):
        indices = next(self.batches)  # StopIteration ends DALI's epoch
        samples = [self.dataset[i] for i in indices]
        return tuple([np.ascontiguousarray(np.asarray(sample[key])) for sample in samples] for key in KEYS)


def dali_micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                       seed: int = 1234, num_threads: int = 2) -> Iterator[dict]:
    try:
        from nvidia.dali import fn, pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except Exception as error:  # ImportError, or a broken CUDA install raising RuntimeError
        raise RuntimeError(
            f"--dataloader dali: nvidia.dali does not import ({error}); pip install "
            f"nvidia-dali-cuda120, or use --dataloader megatron") from None

    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    on_gpu = torch.cuda.is_available()
    device_id = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1) if on_gpu else None

    @pipeline_def(batch_size=micro_batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        columns = fn.external_source(source=_MicroBatchSource(dataset, sampler), num_outputs=len(KEYS),
                                     batch=True, no_copy=False)
        return tuple(column.gpu() if on_gpu else column for column in columns)

    pipe = pipeline()
    pipe.build()
    iterator = DALIGenericIterator([pipe], output_map=list(KEYS), auto_reset=False)
    for outputs in iterator:
        yield {key: outputs[0][key] for key in KEYS}
