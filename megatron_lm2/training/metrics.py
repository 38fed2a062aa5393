"""The step log: one line per log interval, mirrored to TensorBoard (always), W&B (if asked)
and a JSON-lines file (for plots).

    step 120/1000 | loss 4.1234 | grad 0.812 | lr 1.20e-04 | tok/s/gpu 35210 | TFLOP/s/gpu 412.3 |
    MFU 41.7% | skipped 0 | mem L1-4 in .51 fg .49 out .50 | ...

TFLOP/s per GPU = tokens/s per GPU x training FLOPs per token (megatron_lm2.accounting, memory
read and write counted); MFU divides that by the device's dense peak for the compute dtype.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch

from megatron_lm2.fileio import atomic_open

# Dense (no sparsity) peak TFLOP/s per GPU by dtype; the name is matched as a substring of
# torch.cuda.get_device_name(). The family's entry is its SXM part; PEAK_VARIANTS holds the
# lower-clocked cards of a family, told apart by a marker in the name ("NVIDIA H100 NVL",
# "NVIDIA H100 PCIe", "NVIDIA H200 NVL"; the SXM parts read "NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},  # SXM
    "A100": {"bf16": 312.0, "fp32": 19.5},
}
PEAK_VARIANTS = {
    ("H100", "NVL"): {"bf16": 835.0, "fp8": 1671.0, "fp32": 60.0},
    ("H100", "PCIe"): {"bf16": 756.0, "fp8": 1513.0, "fp32": 51.0},
    ("H200", "NVL"): {"bf16": 835.0, "fp8": 1671.0, "fp32": 60.0},
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def peak_tflops(name: str, dtype: str) -> Optional[float]:
    """Dense peak for a device name and 'bf16' | 'fp8' | 'fp32'; None when unknown (CPU)."""
    lowered = name.lower()
    for key, peaks in PEAK_TFLOPS.items():
        if key.lower() in lowered:
            for (family, marker), variant in PEAK_VARIANTS.items():
                if family == key and marker.lower() in lowered:
                    return variant.get(dtype)
            return peaks.get(dtype)
    return None


def throughput(tokens: int, seconds: float, num_gpus: int, flops_per_token: float,
               peak: Optional[float]) -> dict:
    tokens_per_gpu = tokens / seconds / num_gpus
    tflops = tokens_per_gpu * flops_per_token / 1e12
    return dict(tokens_per_sec_per_gpu=tokens_per_gpu, tflops_per_gpu=tflops,
                mfu=(tflops / peak) if peak else None)


def gate_groups(stats: Dict[int, Dict[str, float]], groups: int = 4) -> Dict[str, Dict[str, float]]:
    """Average gate means over contiguous groups of memory layers ('L1-4': {'in','forget','out'})."""
    layers = sorted(stats)
    if not layers:
        return {}
    groups = min(groups, len(layers))
    size = -(-len(layers) // groups)
    out = {}
    for start in range(0, len(layers), size):
        members = layers[start:start + size]
        name = f"L{members[0]}" if len(members) == 1 else f"L{members[0]}-{members[-1]}"
        present = {k for n in members for k in stats[n]}
        keys = [k for k in ("in", "forget", "out") if k in present] + sorted(present - {"in", "forget", "out"})
        out[name] = {k: sum(stats[n][k] for n in members if k in stats[n]) /
                     sum(1 for n in members if k in stats[n]) for k in keys}
    return out


def straggler_stats(step_times) -> dict:
    """Each rank's mean step time over a log interval (index = rank) -> the metrics record's
    step_time_max / step_time_min / slowest_rank, and step_time_median for the log line."""
    import statistics

    times = [float(t) for t in step_times]
    slowest = max(range(len(times)), key=times.__getitem__)
    return dict(step_time_max=times[slowest], step_time_min=min(times), slowest_rank=slowest,
                step_time_median=statistics.median(times))


def straggler_text(stats: dict) -> str:
    """`slowest rank R x.xx s (x.xx of the median)`: the log line's straggler report."""
    median = stats["step_time_median"]
    ratio = stats["step_time_max"] / median if median > 0 else float("nan")
    return f"slowest rank {stats['slowest_rank']} {stats['step_time_max']:.2f} s ({ratio:.2f} of the median)"


def format_line(record: dict) -> str:
    parts = [
        f"step {record['step']}/{record['train_iters']}",
        f"loss {record['loss']:.4f}",
        f"grad {record['grad_norm']:.3f}" if record.get("grad_norm") is not None else "grad n/a",
        f"lr {record['lr']:.2e}",
        f"tok/s/gpu {record['tokens_per_sec_per_gpu']:.0f}",
        f"TFLOP/s/gpu {record['tflops_per_gpu']:.3g}",
        f"MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "MFU n/a",
        f"skipped {record['skipped_steps']}",
    ]
    for group, gates in record.get("memory_gates", {}).items():
        short = {"in": "in", "forget": "fg", "out": "out"}
        parts.append(f"gates {group} " + " ".join(f"{short.get(k, k)} {v:.3f}" for k, v in gates.items()))
    return " | ".join(parts)


class MetricsWriter:
    """TensorBoard (always), W&B (when a project is given) and metrics.jsonl, on one rank."""

    def __init__(self, tensorboard_dir: Optional[str], metrics_file: Optional[str],
                 wandb_project: Optional[str] = None, wandb_run_name: Optional[str] = None,
                 config: Optional[dict] = None, resumed_at: Optional[int] = None):
        """`resumed_at`: the step a resumed run restarts after. Records of later steps (logged
        by the previous run after its last checkpoint) are dropped, so every step appears once."""
        self.tensorboard = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the previous run's events from that step on.
            self.tensorboard = SummaryWriter(
                tensorboard_dir, purge_step=None if resumed_at is None else resumed_at + 1)
        self.metrics_file = metrics_file
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            if resumed_at is not None:
                drop_records_after(metrics_file, resumed_at)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "--wandb-project was given but wandb is not installed: pip install wandb "
                    "(or drop --wandb-project)") from None
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume="allow")

    def write(self, record: dict, prefix: str = "train") -> None:
        step = record["step"]
        scalars = {f"{prefix}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "train_iters")}
        for group, gates in record.get("memory_gates", {}).items():
            for k, v in gates.items():
                scalars[f"memory_gates/{group}/{k}"] = v
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.metrics_file:
            with open(self.metrics_file, "a") as handle:
                handle.write(json.dumps(dict(record, kind=prefix)) + "\n")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def drop_records_after(path: str, step: int) -> int:
    """Rewrite metrics.jsonl (atomically) without records of steps > `step`; returns how many
    were dropped. A torn last line (a run killed mid-write) goes too."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record.get("step", 0)) <= step
            except (ValueError, TypeError, AttributeError):
                keep = False
            if keep:
                kept.append(line)
            else:
                dropped += 1
    if dropped:
        with atomic_open(path, encoding=None, fsync=True) as handle:  # encoding: as read above
            handle.writelines(kept)
    return dropped


def merge_gate_stats(per_rank: List[Dict[int, Dict[str, float]]]) -> Dict[int, Dict[str, float]]:
    """Gate means gathered from every rank: average a layer over its TP ranks."""
    sums: Dict[int, Dict[str, List[float]]] = {}
    for stats in per_rank:
        for layer, gates in stats.items():
            for key, value in gates.items():
                sums.setdefault(layer, {}).setdefault(key, []).append(value)
    return {layer: {k: sum(v) / len(v) for k, v in gates.items()} for layer, gates in sorted(sums.items())}
