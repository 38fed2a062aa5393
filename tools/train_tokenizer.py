#!/usr/bin/env python
"""Train a SentencePiece or HF BPE tokenizer on local text; the same as `lm2-train-tokenizer`."""

import sys

from megatron_lm2.tokenizer.train import main

if __name__ == "__main__":
    sys.exit(main())
