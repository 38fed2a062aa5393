#!/usr/bin/env python
"""SmolLM corpus / jsonl -> Megatron-core shards; the same as the `lm2-preprocess` command."""

import sys

from megatron_lm2.preprocess.cli import main

if __name__ == "__main__":
    sys.exit(main())
