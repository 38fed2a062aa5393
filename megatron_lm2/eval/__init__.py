"""Evaluation (docs/eval.md; the `lm2-eval` command is cli.py).

    babilong.py       the BABILong harness: prompts.py, answers.py, babilong_data.py (local data)
    babilong_gen.py   BABILong-style samples without downloads
    mqar.py           multi-query associative recall across the attention window
    decode.py         greedy decoding: HF `generate`, and Megatron window by window through the memory
    mmlu.py           multiple choice by log-likelihood
    inspect.py        gate statistics and memory read-attention heatmaps
    backends.py       loading an HF folder or a Megatron checkpoint
"""
