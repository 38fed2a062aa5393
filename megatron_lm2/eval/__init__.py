"""Evaluation (docs/eval.md; the `lm2-eval` command is cli.py).

    babilong.py       the BABILong harness and its report: prompts.py, answers.py, babilong_data.py
    prompts.py        the benchmark's template, rendering babilong_prompt_texts.py (its texts, as data)
    answers.py        the benchmark's answer rule (compare_answers), multi-object targets included
    babilong_data.py  local BABILong data, every record checked
    babilong_gen.py   BABILong-style samples without downloads
    mqar.py           multi-query associative recall across the attention window
    memory_tasks.py   the memory study's task generators (benchmarks/memory_scaling.py)
    decode.py         greedy decoding: HF `generate`, and Megatron window by window through the memory
    bos.py            whether a BOS goes in front of prompts (--bos)
    mmlu.py           multiple choice by log-likelihood, as lm-evaluation-harness; mmlu_data.py reads the data
    inspect.py        gate statistics and memory read-attention heatmaps
    backends.py       loading an HF folder or a Megatron checkpoint
"""
