"""A parallel layout per run, searched with the dry-run planner (megatron_lm2.training.plan).

For a run (model, global batch, steps) on a cluster of `nodes x gpus_per_node`:

1. node count: the smallest power of two (or the whole cluster) whose estimated wall time,
   tokens x executed FLOPs/token / (GPUs x peak x mfu), is within max_hours;
2. at that node count, the smallest model-parallel size TP x PP (TP within a node first, then
   PP), and the largest micro-batch, whose make_plan memory per GPU is under 90 % of the
   device (the dry run's own "fits" rule) and whose flags validate (heads, slots and memory
   heads divisible by TP, layers by PP, global batch by micro-batch x DP);
3. if nothing fits there, the next node count (more DP shards the optimizer further).

A run that fits no layout is dropped with the reason (plan.py prints it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_lm2.config import ConfigError
from megatron_lm2.scaling.sweepfile import ClusterSection
from megatron_lm2.training.config import TrainConfig
from megatron_lm2.training.metrics import peak_tflops
from megatron_lm2.training.plan import make_plan

FIT_FRACTION = 0.9  # as format_plan: a plan "fits" under 90 % of the device memory


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    gib_per_gpu: float
    hours: Optional[float]  # estimated wall time at the assumed MFU (None without a peak)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.hours is None else self.hours * self.gpus


class NoLayout(Exception):
    """No layout fits; str() is the reason."""


def cluster_peak(cluster: ClusterSection) -> Optional[float]:
    if cluster.peak_tflops:
        return cluster.peak_tflops
    return peak_tflops(cluster.gpu, "bf16" if cluster.bf16 else "fp32")


def estimated_hours(compute: float, gpus: int, cluster: ClusterSection) -> Optional[float]:
    peak = cluster_peak(cluster)
    if not peak:
        return None
    return compute / (gpus * peak * 1e12 * cluster.mfu) / 3600


def node_counts(cluster: ClusterSection) -> List[int]:
    counts = [2 ** i for i in range(int(math.log2(cluster.nodes)) + 1)]
    if counts[-1] != cluster.nodes:
        counts.append(cluster.nodes)
    return counts


def model_parallel_sizes(cluster: ClusterSection, num_layers: int) -> List[Tuple[int, int]]:
    tps = [t for t in (1, 2, 4, 8, 16) if t <= min(cluster.max_tensor_parallel, cluster.gpus_per_node)]
    pps = [p for p in range(1, cluster.max_pipeline_parallel + 1) if num_layers % p == 0]
    return sorted(((t, p) for t in tps for p in pps), key=lambda tp_pp: (tp_pp[0] * tp_pp[1], tp_pp[1]))


def search_layout(train_kwargs: dict, num_layers: int, global_batch: int, compute: float,
                  cluster: ClusterSection) -> Tuple[Layout, TrainConfig]:
    """The first layout (in the order above) that fits; NoLayout with the reason otherwise."""
    counts = node_counts(cluster)
    timed = [n for n in counts
             if (h := estimated_hours(compute, n * cluster.gpus_per_node, cluster)) is None or h <= cluster.max_hours]
    if not timed:
        best = estimated_hours(compute, counts[-1] * cluster.gpus_per_node, cluster)
        raise NoLayout(f"needs ~{best:.1f} h on all {counts[-1]} nodes at {cluster.mfu:.0%} MFU "
                       f"(> max_hours {cluster.max_hours:g})")
    last_reason = "no layout tried"
    best_gib = None
    for nodes in timed:
        world = nodes * cluster.gpus_per_node
        for tp, pp in model_parallel_sizes(cluster, num_layers):
            if world % (tp * pp):
                continue
            dp = world // (tp * pp)
            for micro in sorted(cluster.micro_batch_sizes, reverse=True):
                if global_batch % (micro * dp):
                    last_reason = (f"global batch {global_batch} sequences does not split over DP {dp} "
                                   f"x micro-batch {micro}")
                    continue
                train = TrainConfig(**train_kwargs, tensor_model_parallel_size=tp,
                                    pipeline_model_parallel_size=pp, micro_batch_size=micro,
                                    global_batch_size=global_batch, dry_run=True, nodes=nodes,
                                    gpus_per_node=cluster.gpus_per_node, gpu=cluster.gpu, bf16=cluster.bf16)
                try:
                    train.validate(world)
                    plan = make_plan(train)
                except ConfigError as error:
                    last_reason = f"TP {tp} PP {pp}: {error}"
                    break  # a smaller micro-batch does not fix a model-shape error
                if plan.gpu_memory_gib and plan.total_gib >= FIT_FRACTION * plan.gpu_memory_gib:
                    if best_gib is None or plan.total_gib < best_gib[0]:
                        best_gib = (plan.total_gib, tp, pp, micro, plan.gpu_memory_gib)
                    continue
                layout = Layout(nodes=nodes, gpus_per_node=cluster.gpus_per_node, tp=tp, pp=pp, dp=plan.dp,
                                micro_batch_size=micro, num_microbatches=plan.num_microbatches,
                                gib_per_gpu=plan.total_gib, hours=estimated_hours(compute, world, cluster))
                return layout, train
    if best_gib is not None:
        gib, tp, pp, micro, device = best_gib
        raise NoLayout(f"does not fit in memory: best ~{gib:.1f} GiB per GPU (TP {tp} PP {pp} micro-batch "
                       f"{micro}) of {device:.0f} GiB ({cluster.gpu})")
    raise NoLayout(last_reason)
