"""lm2-train: pretrain an LM2 model on Megatron-core (docs/training.md).

    lm2-train --flavor debug --mock-data --train-iters 20 --global-batch-size 8 --micro-batch-size 4
    torchrun --nproc-per-node 8 -m megatron_lm2.train --tensor-model-parallel-size 2 ...
    lm2-train --dry-run --nodes 4 --gpus-per-node 8 ...     # validate a layout on a CPU
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional, Sequence


def quiet_library_warnings() -> None:
    """Megatron-core warns on every import that Apex/TE are absent (expected on CPU) and torch
    that the collectives Megatron calls are deprecated; they would bury the step log."""
    for message in (r".*(Apex|Transformer Engine).*not installed", r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed")


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_library_warnings()
    from megatron_lm2.training.config import parse_args

    config = parse_args(argv)
    if config.dry_run:
        from megatron_lm2.config import ConfigError
        from megatron_lm2.training.plan import print_plan

        try:
            print_plan(config, argv if argv is not None else sys.argv[1:])
        except ConfigError as error:
            print(f"lm2-train: error: {error}", file=sys.stderr)
            return 2
        return 0

    from megatron_lm2 import distributed
    from megatron_lm2.training.trainer import Trainer

    # A world of one (plain `python`/`lm2-train`) gets a free port in distributed.initialize.
    try:
        Trainer(config).run()
    finally:
        distributed.destroy()
    return 0


# The guard matters: dist_checkpointing's writer starts a spawn-context multiprocessing Manager,
# which re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
