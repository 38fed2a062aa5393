"""Batch size and peak LR per run, from a stated rule.

`deepseek` (the default): the compute-optimal hyperparameter fits of DeepSeek LLM
(DeepSeek-AI 2024, arXiv:2401.02954, Sec. 3.1, Eq. 1), fitted on their own isoFLOP grids:

    B_opt = 0.2920 * C^0.3271     tokens per step
    lr_opt = 0.3118 * C^-0.1250

where C = M * D, M the non-embedding FLOPs per token (attention included, the vocabulary
projection excluded) and D the training tokens. We take M from the executed-FLOP accounting
(megatron_lm2.accounting.flops_per_token minus the output layer's 6 * d * V), so LM2's memory
read and write count in M as they count in the budget. B is rounded to a power of two of
sequences (then clamped by [schedule] batch_min/max_sequences); lr is multiplied by lr_scale
and clamped by lr_max. The fit was made for 100M-10B-parameter models on 2 T-token corpora;
for CPU-demo-sized models (C ~ 1e11) it extrapolates far and gives LRs near 1e-2, which is why
the demo clamps it (examples/sweeps/cpu_demo.toml, `lr_max`).

`fixed`: batch_sequences and lr from [schedule] for every run (a constant-hyperparameter study).
"""

from __future__ import annotations

import math
from typing import Tuple

from megatron_lm2.accounting import flops_per_token
from megatron_lm2.config import LM2Config
from megatron_lm2.scaling.sweepfile import ScheduleSection

DEEPSEEK_BATCH = (0.2920, 0.3271)  # B_opt = a * C^b (tokens)
DEEPSEEK_LR = (0.3118, -0.1250)  # lr_opt = a * C^b


def non_embedding_flops_per_token(config: LM2Config, seq_length: int) -> float:
    """DeepSeek's M: training FLOPs per token without the output layer (3 x 2 d V)."""
    return flops_per_token(config, seq_length) - 6.0 * config.hidden_size * config.vocab_size


def batch_and_lr(schedule: ScheduleSection, config: LM2Config, seq_length: int, tokens: float) -> Tuple[int, float]:
    """(global batch in sequences, peak LR) for a run of `tokens` tokens."""
    if schedule.rule == "fixed":
        return schedule.batch_sequences, schedule.lr
    compute = non_embedding_flops_per_token(config, seq_length) * tokens
    batch_tokens = DEEPSEEK_BATCH[0] * compute ** DEEPSEEK_BATCH[1]
    sequences = 2 ** max(0, round(math.log2(max(batch_tokens / seq_length, 1.0))))
    sequences = min(max(sequences, schedule.batch_min_sequences), schedule.batch_max_sequences)
    lr = DEEPSEEK_LR[0] * compute ** DEEPSEEK_LR[1] * schedule.lr_scale
    return sequences, min(lr, schedule.lr_max)
