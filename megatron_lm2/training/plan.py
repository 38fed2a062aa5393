"""Dry run: check a training layout on a CPU before asking a cluster for it.

    lm2-train --dry-run --nodes 4 --gpus-per-node 8 --tensor-model-parallel-size 2 ...
    python -m megatron_lm2.training.plan --nodes 4 --gpus-per-node 8 ...   (the same command)

Prints (the command's output, not a log) the TP/PP/DP sizes, the batch arithmetic (micro-batches per step, tokens per step),
parameters and memory per GPU (weights + gradients + distributed-optimizer states, and an
activation estimate) and the exact torchrun command each node runs. Builds no model: the
numbers come from megatron_lm2.accounting and the formulas below.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_lm2.cli_args import quiet_library_warnings

quiet_library_warnings()  # before megatron-core loads (`python -m megatron_lm2.training.plan`)
from megatron_lm2.accounting import (  # noqa: E402
    block_parameters,
    flops_per_token,
    memory_parameters,
    num_parameters,
)
from megatron_lm2.cli_errors import cli_entry  # noqa: E402
from megatron_lm2.config import LM2Config  # noqa: E402
from megatron_lm2.training.config import TrainConfig, parse_args  # noqa: E402
from megatron_lm2.training.metrics import peak_tflops  # noqa: E402

GPU_MEMORY_GIB = {"H100": 80.0, "H200": 141.0, "A100": 80.0}
PLAN_FLAGS = ("--dry-run", "--nodes", "--gpus-per-node", "--gpu")


@dataclass
class Plan:
    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: Optional[int]
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    tokens_per_step: int
    parameters_total: int
    parameters_memory: int
    parameters_per_gpu: int  # the fullest pipeline stage, one TP shard
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    total_gib: float
    gpu_memory_gib: Optional[float]
    flops_per_token: float
    seconds_per_step_at_40_mfu: Optional[float]
    recompute: str = ""  # "" (none), "selective", or "full uniform 1" (method, layers)


def stage_parameters(config: LM2Config, tp: int, pp: int) -> int:
    """Parameters one GPU holds on the fullest pipeline stage, one TP shard. The first stage
    holds the embedding, the last the output layer and final norm (with tied embeddings and
    PP > 1 the last stage keeps its own copy of the embedding, as Megatron does)."""
    per_stage = config.num_layers // pp
    memory_layers = config.memory_layer_numbers if config.has_memory else ()
    embedding = config.vocab_size * config.hidden_size
    output = embedding if (not config.tie_embeddings or pp > 1) else 0
    stages = []
    for stage in range(pp):
        memory = sum(1 for n in memory_layers if stage * per_stage < n <= (stage + 1) * per_stage)
        params = per_stage * block_parameters(config) + memory * memory_parameters(config)
        if stage == 0:
            params += embedding
        if stage == pp - 1:
            params += output + config.hidden_size
        stages.append(params)
    return -(-max(stages) // tp)


def activation_bytes(config: LM2Config, micro_batch_size: int, tp: int, flash_attention: bool,
                     bytes_per_value: int = 2, fused_kernels: bool | None = None) -> float:
    """Activations kept for backward on the first pipeline stage under 1F1B (it holds pp
    micro-batches of L/pp layers, i.e. L layers' worth). In units of u = s*b*h*bytes_per_value
    (f = ffn/h, t = tp), per Llama block:

      norms 4u (inputs and outputs); attention: q, k before RoPE 2u (unless fused RoPE), the
      core's q, k, v 3u/t (flash: q plus GQA-sized k, v) and its output u/t; scores
      a*s*b*bytes/t plus the s^2 mask unless flash attention; SwiGLU 5fu/t (fused: 3fu/t).

    Per memory layer (megatron_lm2/memory.py; the score matrices, banks 1.., E_mem and the
    gated read are not kept): its norm's input and output, the memory-branch residual 3u, Q,
    the reads and the output-gate logits 3u/t (+u all-gathered E_mem when t > 1); the fp32
    log-sum-exps; per written chunk the write content and the gate logits 3bNh/t (+bNh
    gathered); per chunk j >= 1 its keys and values 2bNh/t (+bNh gathered bank); chunk 0's
    keys and values from the weights, 2Nh/t (one sample). qk-norm scores add the normalised
    queries and keys (once, shared by the read and the write) and each role's scaled queries.
    Plus fp32 logits for the loss. (PyTorch's CPU SDPA returns the attention write's content as
    [B, h, N, d_h], so its reshape to the bank's layout is one more copy per written chunk, bNh/t,
    not counted here: about 1 % at the test's shape.)

    Activation recompute, as the config's megatron-core fields ask (lm2-train
    --recompute-granularity): selective recomputes the core attention, so no layer keeps its
    scores (or flash attention's log-sum-exps; q, k, v are the checkpoint's inputs and the
    output the projection's, kept either way). Full keeps of each recomputed unit only its input
    u, the L layers split into pp x vpp model chunks of consecutive layers: uniform makes units
    of recompute_num_layers layers, block makes the first recompute_num_layers layers of each
    chunk units of one (the rest keep everything); backward then rebuilds one unit at a time,
    so the largest unit's activations are added once.
    tests/test_activation_memory.py checks this against saved-tensor hooks on CPU (fp32,
    local spec, no fused kernels); `fused_kernels` (default: = flash_attention, the GPU
    setting) selects fused RoPE and SwiGLU."""
    layers = layer_activation_bytes(config, micro_batch_size, tp, flash_attention, bytes_per_value,
                                    fused_kernels)
    s, b, h = config.seq_length, micro_batch_size, config.hidden_size
    u = s * b * h * bytes_per_value
    if config.recompute_granularity == "full":
        chunks = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
        per_chunk = len(layers) // chunks
        n = config.recompute_num_layers
        units = []  # the layer indices of each recomputed unit
        for first in range(0, len(layers), per_chunk):
            if config.recompute_method == "uniform":
                units += [range(i, min(i + n, first + per_chunk)) for i in range(first, first + per_chunk, n)]
            else:  # block
                units += [range(i, i + 1) for i in range(first, first + min(n, per_chunk))]
        recomputed = {i for unit in units for i in unit}
        kept = sum(cost for i, cost in enumerate(layers) if i not in recomputed) + len(units) * u
        total = kept + max((sum(layers[i] for i in unit) for unit in units), default=0)
    else:
        total = sum(layers)
    total += 4 * s * b * config.vocab_size / tp + 2 * u  # fp32 logits for the loss, final norm
    return total


def layer_activation_bytes(config: LM2Config, micro_batch_size: int, tp: int, flash_attention: bool,
                           bytes_per_value: int = 2, fused_kernels: bool | None = None) -> list:
    """What each transformer layer keeps for backward (activation_bytes' per-layer terms, with
    selective recompute's saving; full recompute is activation_bytes' own)."""
    fused = flash_attention if fused_kernels is None else fused_kernels
    s, b, h, a = config.seq_length, micro_batch_size, config.hidden_size, config.num_attention_heads
    p = bytes_per_value
    u = s * b * h * p
    f = config.ffn_hidden_size / h
    groups = config.num_query_groups or a
    selective = config.recompute_granularity == "selective"
    block = 4 * u + (0 if fused else 2 * u)
    if flash_attention:
        block += (1 + 2 * groups / a) * u / tp + u / tp  # q, k, v, out
        block += 0 if selective else 4 * a * s * b / tp  # lse
    else:
        block += 3 * u / tp + u / tp + s * s  # q, k, v, out, mask
        block += 0 if selective else a * s * s * b * max(p, 4) / tp  # scores in fp32
    block += (3 if fused else 5) * f * u / tp
    memory = 0.0
    if config.has_memory:
        n, hm = config.memory_slots, config.memory_heads
        chunks = config.num_memory_chunks
        written = chunks - 1  # training never writes the last chunk
        bank = b * n * h * p
        gathered = 1 if tp > 1 else 0
        memory = 3 * u + 3 * u / tp + gathered * u + 4 * b * (hm / tp) * s
        memory += written * ((3 / tp + gathered) * bank + 4 * b * (hm / tp) * n)
        memory += (chunks - 1) * (2 / tp + gathered) * bank
        memory += 2 * n * h * p / tp
        if config.memory_scores == "qknorm":
            # The RMS-normalised queries (once) and the read's scaled copy (the one SDPA keeps);
            # the normalised keys of M_0 (one sample) and of banks 1.., shared by both roles; the
            # attention write's own scaled copy of the written chunks' queries.
            memory += (2 * u + n * h * p + (chunks - 1) * bank) / tp
            if config.memory_write == "attention":
                memory += u / tp * written / chunks
    with_memory = set(config.memory_layer_numbers) if config.has_memory else set()
    return [block + (memory if number in with_memory else 0.0) for number in range(1, config.num_layers + 1)]


def make_plan(train: TrainConfig) -> Plan:
    world = train.nodes * train.gpus_per_node
    dp = train.data_parallel_size(world)
    config = train.model_config()  # the dry run's one model config (it reads no data)
    tp, pp = train.tensor_model_parallel_size, train.pipeline_model_parallel_size
    counts = num_parameters(config)
    per_gpu = stage_parameters(config, tp, pp)
    gib = 1024 ** 3
    weight_bytes = 2 if (train.bf16 or train.fp8_format) else 4
    # Gradients reduce in fp32 (grad_reduce_in_fp32); the distributed optimizer shards fp32
    # main weights (only when the model is bf16) and the two Adam moments over DP.
    optimizer_bytes = (12 if weight_bytes == 2 else 8) / dp
    # The GPU layout: TE's flash attention and fused kernels, bf16 (or fp32) activations.
    activations = activation_bytes(config, train.micro_batch_size, tp, flash_attention=True,
                                   bytes_per_value=weight_bytes)
    total = per_gpu * (weight_bytes + 4 + optimizer_bytes) / gib + activations / gib
    gpu_memory = next((v for k, v in GPU_MEMORY_GIB.items() if k.lower() in train.gpu.lower()), None)
    fpt = flops_per_token(config)
    peak = peak_tflops(train.gpu, "fp8" if train.fp8_format else ("bf16" if train.bf16 else "fp32"))
    tokens = train.global_batch_size * config.seq_length
    return Plan(
        world_size=world, tp=tp, pp=pp, dp=dp, vpp=train.virtual_pipeline_size(),
        micro_batch_size=train.micro_batch_size, global_batch_size=train.global_batch_size,
        num_microbatches=train.global_batch_size // (train.micro_batch_size * dp),
        tokens_per_step=tokens, parameters_total=counts.total, parameters_memory=counts.memory,
        parameters_per_gpu=per_gpu, weights_gib=per_gpu * weight_bytes / gib, grads_gib=per_gpu * 4 / gib,
        optimizer_gib=per_gpu * optimizer_bytes / gib, activations_gib=activations / gib,
        total_gib=total, gpu_memory_gib=gpu_memory, flops_per_token=fpt,
        seconds_per_step_at_40_mfu=(tokens * fpt / (world * peak * 1e12 * 0.4)) if peak else None,
        recompute=" ".join(str(v) for v in (config.recompute_granularity, config.recompute_method,
                                            config.recompute_num_layers) if v is not None),
    )


def launch_command(train: TrainConfig, argv: Sequence[str]) -> str:
    """The command every node runs (torchrun rendezvous on the first node)."""
    args = _strip_plan_flags(list(argv))
    if train.nodes == 1:
        return " ".join(["torchrun", "--standalone", f"--nproc-per-node {train.gpus_per_node}",
                         "-m megatron_lm2.train", *(shlex.quote(a) for a in args)])
    return " ".join([
        "torchrun", f"--nnodes {train.nodes}", f"--nproc-per-node {train.gpus_per_node}",
        "--rdzv-backend c10d", "--rdzv-endpoint ${MASTER_ADDR}:${MASTER_PORT}", "--rdzv-id ${SLURM_JOB_ID}",
        "-m megatron_lm2.train", *(shlex.quote(a) for a in args),
    ])


def _strip_plan_flags(argv: list) -> list:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in PLAN_FLAGS:
            skip = name != "--dry-run" and "=" not in arg
            continue
        out.append(arg)
    return out


def format_plan(plan: Plan, train: TrainConfig, command: str) -> str:
    fits = ""
    if plan.gpu_memory_gib:
        verdict = "fits" if plan.total_gib < 0.9 * plan.gpu_memory_gib else "DOES NOT FIT"
        fits = f" of {plan.gpu_memory_gib:.0f} GiB ({train.gpu}): {verdict}"
    lines = [
        f"layout      {train.nodes} nodes x {train.gpus_per_node} GPUs = {plan.world_size} | "
        f"TP {plan.tp} PP {plan.pp} DP {plan.dp}" + (f" VPP {plan.vpp}" if plan.vpp else ""),
        f"batch       micro {plan.micro_batch_size} x {plan.num_microbatches} micro-batches x DP {plan.dp} = "
        f"global {plan.global_batch_size} sequences = {plan.tokens_per_step:,} tokens/step",
        f"model       {train.flavor}: {plan.parameters_total / 1e9:.3f}B parameters "
        f"({plan.parameters_memory / 1e9:.3f}B memory) | {plan.parameters_per_gpu / 1e6:.1f}M per GPU "
        f"(fullest stage, one TP shard) | {plan.flops_per_token / 1e9:.2f} GFLOP/token (train)",
        f"memory/GPU  weights {plan.weights_gib:.2f} + grads {plan.grads_gib:.2f} + optimizer "
        f"{plan.optimizer_gib:.2f} + activations ~{plan.activations_gib:.2f}"
        + (f" (recompute {plan.recompute})" if plan.recompute else "")
        + f" = ~{plan.total_gib:.1f} GiB{fits}",
    ]
    if plan.seconds_per_step_at_40_mfu:
        lines.append(f"speed       ~{plan.seconds_per_step_at_40_mfu:.2f} s/step at 40% MFU")
    lines.append(f"command     {command}")
    return "\n".join(lines)


def print_plan(train: TrainConfig, argv: Sequence[str]) -> Plan:
    plan = make_plan(train)
    print(format_plan(plan, train, launch_command(train, argv)), flush=True)
    return plan


@cli_entry("lm2-train")
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`lm2-train --dry-run` (megatron_lm2.train.main) without importing the trainer: the same
    parse, plan and errors (tests/test_launch.py checks they agree)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--dry-run" not in argv:
        argv.append("--dry-run")
    print_plan(parse_args(argv, check_model=False), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
