#!/usr/bin/env python
"""Convert LM2 checkpoints between Megatron and Hugging Face (the `lm2-convert` command).

    python tools/convert_checkpoint.py to-hf --load CKPT --save HF_DIR [--tokenizer PATH]
    python tools/convert_checkpoint.py from-hf --load HF_DIR --save CKPT --tensor-model-parallel-size 2
"""

import sys

from megatron_lm2.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
