"""lm2-train: pretrain an LM2 model on Megatron-core (docs/training.md).

    lm2-train --flavor debug --mock-data --train-iters 20 --global-batch-size 8 --micro-batch-size 4
    torchrun --nproc-per-node 8 -m megatron_lm2.train --tensor-model-parallel-size 2 ...
    lm2-train --dry-run --nodes 4 --gpus-per-node 8 ...     # validate a layout on a CPU

One pass from flags to a running trainer: the flags (TrainConfig), the data source (its
tokenizer ids and vocabulary), the model config built once from both, then the Trainer with
all three. Mock and real data take the same steps. The trainer logs through `logging`, rank 0
only, to stdout (megatron_lm2.logs); the dry run prints its plan.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_lm2.cli_args import quiet_library_warnings
from megatron_lm2.cli_errors import cli_entry


@cli_entry("lm2-train")
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Bad input (flags, data, checkpoints) and a halted run end with one line and exit code 2
    (cli_errors.py); a traceback only with --debug or LM2_DEBUG=1."""
    quiet_library_warnings()
    from megatron_lm2.training.config import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    # The model's knobs are checked where its config is built (below, or in the plan), once.
    train_config = parse_args(argv, check_model=False)
    if train_config.dry_run:
        from megatron_lm2.training.plan import print_plan

        print_plan(train_config, argv)
        return 0

    from megatron_lm2 import distributed
    from megatron_lm2.training import data
    from megatron_lm2.training.trainer import Trainer

    source = data.resolve_source(train_config)  # tokenizer ids, vocabulary (mock: the flavor's)
    model_config = data.model_config_for(train_config, source)
    # A world of one (plain `python`/`lm2-train`) gets a free port in distributed.initialize.
    try:
        Trainer(train_config, model_config, source).run()
    finally:
        distributed.destroy()
    return 0


# The guard matters: dist_checkpointing's writer starts a spawn-context multiprocessing Manager,
# which re-imports the main module.
if __name__ == "__main__":
    sys.exit(main())
