"""Loss curve PNG from a run's metrics.jsonl (written by the trainer on rank 0).

    python -m megatron_lm2.training.plot CHECKPOINT_DIR/metrics.jsonl --out loss.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megatron_lm2.fileio import atomic_path


def read_metrics(path: str) -> dict:
    """{'train': [(step, loss)], 'valid': [(step, loss)]}; a resumed run's repeated steps keep
    their latest value."""
    series = {"train": {}, "valid": {}}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
            series.setdefault(record.get("kind", "train"), {})[record["step"]] = record["loss"]
    return {kind: sorted(points.items()) for kind, points in series.items()}


def plot_loss(metrics_file: str, out: str, title: Optional[str] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_file)
    if not series["train"]:
        raise ValueError(f"{metrics_file}: no training records")
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    for kind, style in (("train", "-"), ("valid", "o--")):
        if series.get(kind):
            steps, losses = zip(*series[kind])
            axis.plot(steps, losses, style, label=f"{kind} loss", markersize=4)
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_file))))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(out, suffix=".png", fsync=False) as tmp:
        figure.savefig(tmp)
        plt.close(figure)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_lm2.training.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl from a training run")
    parser.add_argument("--out", default=None, help="PNG path (default: next to the metrics file)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.metrics):
        parser.error(f"{args.metrics}: no such file")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "loss.png")
    print(plot_loss(args.metrics, out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
