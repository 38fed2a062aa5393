#!/usr/bin/env bash
# LM2-1.7B (the paper's decoder, the study's memory) on ONE node (8 GPUs by default), no slurm:
#
#   DATA_PATH=/data/lm2/shards CHECKPOINT_DIR=/data/lm2/ckpt bash examples/pretrain_lm2_1p7b.sh
#   GPUS=4 GLOBAL_BATCH_SIZE=128 bash examples/pretrain_lm2_1p7b.sh
#   bash examples/pretrain_lm2_1p7b.sh --dry-run          # print the layout and command only
#
# Extra arguments are passed to lm2-train (e.g. --train-iters 2000). Re-running resumes from
# CHECKPOINT_DIR/latest. Multi-node: slurm/pretrain_lm2_1p7b.sh.
set -euo pipefail
GPUS=${GPUS:-8}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-$PWD/checkpoints/lm2-1p7b}
DATA_PATH=${DATA_PATH:?set DATA_PATH to an lm2-preprocess output directory (manifest.json + blend.json)}

# The flavor carries the recipe's memory (docs/memory.md, "Decision (2026-12-06 at 097fc56)").
MODEL_ARGS=(--flavor lm2-1.7b --seq-length 2048 --bf16
            --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
TRAINING_ARGS=(--micro-batch-size "${MICRO_BATCH_SIZE:-4}" --global-batch-size "${GLOBAL_BATCH_SIZE:-256}"
               --train-iters "${TRAIN_ITERS:-100000}" --lr 2e-4 --min-lr 2e-5 --lr-warmup-iters 700
               --lr-decay-style cosine --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
               --clip-grad 1.0 --seed 1234)
DATA_ARGS=(--data-path "$DATA_PATH" --split 99,1,0 --data-cache-path "$CHECKPOINT_DIR/data_cache")
CHECKPOINT_ARGS=(--save "$CHECKPOINT_DIR" --save-interval 500 --keep-last 3)
LOGGING_ARGS=(--log-interval 10 --eval-interval 1000 --eval-iters 20 --tensorboard-dir "$CHECKPOINT_DIR/tensorboard")

ARGS=("${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@")
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    echo "env         PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    exec python -m megatron_lm2.train --nodes 1 --gpus-per-node "$GPUS" "${ARGS[@]}"
  fi
done
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# torchrun's --signals-to-handle: forward SIGUSR1 (save and exit) to the ranks too, not only
# SIGTERM/SIGINT/SIGHUP/SIGQUIT; without it SIGUSR1 kills torchrun and orphans the ranks.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
exec torchrun --standalone --nproc-per-node "$GPUS" -m megatron_lm2.train "${ARGS[@]}"
