#!/bin/bash
# Pretrain LM2-1.7B (the paper's recipe) on N nodes x 8 H100 (docs/training.md).
#
#   DATA_PATH=/lustre/lm2/shards CHECKPOINT_DIR=/lustre/lm2/ckpt sbatch slurm/pretrain_lm2_1p7b.sh
#   sbatch --nodes 8 slurm/pretrain_lm2_1p7b.sh                  # more nodes: DP grows
#   bash slurm/pretrain_lm2_1p7b.sh --dry-run                    # validate the layout on any CPU
#   DRY_RUN=1 NODES=4 bash slurm/pretrain_lm2_1p7b.sh            # same
#
# Environment:
#   DATA_PATH       lm2-preprocess output directory (manifest.json + blend.json) [required]
#   TOKENIZER       tokenizer file/dir; default: the one recorded in DATA_PATH/manifest.json
#   CHECKPOINT_DIR  checkpoints, TensorBoard, metrics.jsonl, data index cache (shared filesystem)
#   TRAIN_ITERS     optimizer steps (default 100000: 52B tokens at 524,288 tokens/step)
#   TP, PP, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, WANDB_PROJECT, VENV (activate script), EXTRA_ARGS
#   LAUNCHER        torchrun (default: one srun task per node, torchrun rendezvous) or srun
#                   (one srun task per GPU; ranks from SLURM_PROCID)
#   Launcher environment, each overridable (defaults and reasons in the launch section):
#   PYTORCH_CUDA_ALLOC_CONF, CUDA_DEVICE_MAX_CONNECTIONS, TORCH_NCCL_ASYNC_ERROR_HANDLING,
#   NCCL_IB_TIMEOUT, NCCL_DEBUG, OMP_NUM_THREADS. MASTER_ADDR/MASTER_PORT are not: the rendezvous
#   is always the allocation's first node, on a port derived from the job id.
#
# The job's output goes to <submit dir>/lm2-1p7b-<job id>.out (slurm does not create folders
# for --output; a path in a missing folder loses the log, so the default is the submit dir).
# To keep logs elsewhere, create the folder first: mkdir -p logs && sbatch --output=logs/%x-%j.out ...
#
# Preemption: slurm sends SIGUSR1 to this script 120 s before the time limit (or on
# preemption); the trap forwards it to the training processes, which finish the current step,
# save a checkpoint and exit; then the job requeues itself and resumes from `latest`.
#
#SBATCH --job-name=lm2-1p7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; fi
done

NODES=${SLURM_JOB_NUM_NODES:-${NODES:-4}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$PWD/checkpoints/lm2-1p7b}
if [[ -z "${DATA_PATH:-}" ]]; then
    if [[ "$DRY_RUN" == 1 ]]; then
        DATA_PATH=/path/to/shards
    else
        echo "error: set DATA_PATH to an lm2-preprocess output directory" >&2
        exit 2
    fi
fi
if [[ -n "${VENV:-}" ]]; then source "$VENV"; fi

# The paper's LM2-1.7B decoder (16 blocks, d 2048) with the recipe's memory (the flavor carries
# it: token write, N = C = 512, so a 2048-token sequence is four chunks; docs/memory.md).
MODEL_ARGS=(
    --flavor lm2-1.7b
    --seq-length 2048
    --bf16
    --tensor-model-parallel-size "${TP:-1}"
    --pipeline-model-parallel-size "${PP:-1}"
)
# AdamW (0.9, 0.95), wd 0.1, lr 2e-4 with 700 warmup steps and cosine decay, clip 1.0.
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-4}"
    --global-batch-size "${GLOBAL_BATCH_SIZE:-256}"
    --train-iters "${TRAIN_ITERS:-100000}"
    --lr 2e-4
    --min-lr 2e-5
    --lr-warmup-iters 700
    --lr-decay-style cosine
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --seed 1234
)
DATA_ARGS=(
    --data-path "$DATA_PATH"
    --split 99,1,0
    --data-cache-path "$CHECKPOINT_DIR/data_cache"
)
if [[ -n "${TOKENIZER:-}" ]]; then DATA_ARGS+=(--tokenizer "$TOKENIZER"); fi
CHECKPOINT_ARGS=(
    --save "$CHECKPOINT_DIR"
    --save-interval 500
    --keep-last 3
)
LOGGING_ARGS=(
    --log-interval 10
    --eval-interval 1000
    --eval-iters 20
    --tensorboard-dir "$CHECKPOINT_DIR/tensorboard"
)
if [[ -n "${WANDB_PROJECT:-}" ]]; then LOGGING_ARGS+=(--wandb-project "$WANDB_PROJECT"); fi
# shellcheck disable=SC2206
EXTRA=(${EXTRA_ARGS:-})
ARGS=("${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "${EXTRA[@]}")

# ---- launch and requeue (lm2-sweep submit copies this section into its job arrays) ----
# Rendezvous on the allocation's first node, never a fallback: a 127.0.0.1 (or an address the
# submitting shell exported, which sbatch passes on) would make every node rendezvous with itself.
if [[ -n "${SLURM_JOB_NODELIST:-}" && -n "${SLURM_JOB_ID:-}" ]]; then
    # (not `| head -n 1`: with pipefail, scontrol's SIGPIPE would end the script)
    mapfile -t NODE_LIST < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${NODE_LIST[0]:?scontrol show hostnames $SLURM_JOB_NODELIST listed no node}
    # Fixed per job (a requeued job keeps its id, so its port), different for jobs sharing a
    # node (ids less than 15000 apart), and below Linux's ephemeral port range (32768-60999),
    # from which outgoing connections draw theirs.
    MASTER_PORT=$(( 15000 + SLURM_JOB_ID % 15000 ))
elif [[ "${DRY_RUN:-0}" == 1 ]]; then
    MASTER_ADDR="<first-node-of-SLURM_JOB_NODELIST>"
    MASTER_PORT="<15000+SLURM_JOB_ID%15000>"
else
    echo "error: no SLURM_JOB_NODELIST/SLURM_JOB_ID: submit with sbatch (or use --dry-run)" >&2
    exit 2
fi
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# One hardware queue per GPU: kernels run in the order they were launched, which Megatron's
# TP/sequence-parallel communication overlap relies on (lm2-train --tp-comm-overlap requires 1).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Allocator segments that grow in place: less fragmentation from activations whose sizes
# change between micro-batches, evaluation and checkpointing (fewer OOMs at the same peak).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# A failed or timed-out NCCL collective ends its process (communicators torn down), so srun
# ends the job instead of the other ranks hanging until the time limit. (torch's name for it;
# the old NCCL_ASYNC_ERROR_HANDLING is deprecated and only makes torch warn.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# InfiniBand retransmission timeout 4.096 us x 2^N: 22 (~17 s, NCCL's default 20 is ~4 s) rides
# out a congested or flapping link on a large job instead of failing it.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# NCCL says why a communicator failed (warnings only; INFO for a debugging run).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# torchrun forwards these signals to its workers and waits this long before SIGKILL. The list
# is torchrun's --signals-to-handle (env PET_SIGNALS_TO_HANDLE); torchrun overwrites
# TORCHELASTIC_SIGNALS_TO_HANDLE with that flag's value, and without SIGUSR1 in it SIGUSR1
# kills torchrun itself and orphans the ranks, which then never save.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110
LAUNCH_ENV=(MASTER_ADDR MASTER_PORT OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS PYTORCH_CUDA_ALLOC_CONF
            TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_IB_TIMEOUT NCCL_DEBUG PET_SIGNALS_TO_HANDLE
            TORCH_ELASTIC_SHUTDOWN_TIMEOUT)

if [[ "${LAUNCHER:-torchrun}" == "srun" ]]; then
    LAUNCH=(srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE"
            --cpus-per-task=$(( ${SLURM_CPUS_PER_TASK:-96} / GPUS_PER_NODE ))
            python -m megatron_lm2.train "${ARGS[@]}")
else
    LAUNCH=(srun --kill-on-bad-exit=1 --ntasks-per-node=1
            torchrun --nnodes "$NODES" --nproc-per-node "$GPUS_PER_NODE"
            --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-<job-id>}"
            -m megatron_lm2.train "${ARGS[@]}")
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    # What the launch would export and run, then lm2-train's own dry run of the flags.
    ENV_LINE=()
    for name in "${LAUNCH_ENV[@]}"; do ENV_LINE+=("$name=${!name}"); done
    echo "env         ${ENV_LINE[*]}"
    echo "launch      ${LAUNCH[*]}"
    exec python -m megatron_lm2.train --dry-run --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" "${ARGS[@]}"
fi
# What this script writes: the checkpoints (the trainer makes its subfolders); the job's log
# is slurm's --output.
mkdir -p "$CHECKPOINT_DIR"

PREEMPTED=0
on_usr1() {
    PREEMPTED=1
    echo "$(date -u +%FT%TZ) SIGUSR1: asking training to save and exit, then requeueing" >&2
    # To the job steps (torchrun or the ranks), not to this batch script.
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}
trap on_usr1 USR1

echo "$(date -u +%FT%TZ) job $SLURM_JOB_ID: $NODES nodes x $GPUS_PER_NODE GPUs, resume from $CHECKPOINT_DIR/latest if present"
"${LAUNCH[@]}" &
TRAIN_PID=$!
STATUS=0
# `wait` returns early when a trapped signal arrives: keep waiting until training exits.
while true; do
    if wait "$TRAIN_PID"; then STATUS=0; else STATUS=$?; fi
    if ! kill -0 "$TRAIN_PID" 2>/dev/null; then break; fi
done

if [[ "$PREEMPTED" == 1 ]]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STATUS"
# ---- end of launch and requeue ----
