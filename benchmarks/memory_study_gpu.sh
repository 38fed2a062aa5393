#!/usr/bin/env bash
# The memory study (issue 10) on one GPU in one call: benchmarks/memory_study_plan.txt, JOBS processes
# side by side (the debug model is launch-bound, so one process leaves an H100 mostly idle), until
# DEADLINE seconds; results into $OUT (or ./benchmarks) as JSON lines, resumable.
#
#   device run, carry [".whl"]:   bash benchmarks/memory_study_gpu.sh        (JOBS=12 DEADLINE=480)
#   then here:                    cp <files_at>/memory_scaling.jsonl benchmarks/ && \
#                                 python benchmarks/memory_scaling.py --report
#
# Needs torch with CUDA and megatron-core 0.16.1: installed, or its wheel in .whl/ (benchmarks/README.md:
# `pip download megatron-core==0.16.1 --no-deps --python-version 3.12 --only-binary=:all: -d .whl/`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks}"
JOBS="${JOBS:-12}"
DEADLINE="${DEADLINE:-480}"
PLAN="${PLAN:-benchmarks/memory_study_plan.txt}"

PY="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  # The device image has torch, numpy and packaging, not megatron-core; it cannot reach PyPI.
  py=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  wheel=$(ls .whl/megatron_core-0.16.1-"$py"-*.whl 2>/dev/null | head -1 || true)
  [ -n "$wheel" ] || { echo "no megatron-core and no .whl/megatron_core-0.16.1-$py-*.whl to install" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheel"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY'
import torch, megatron.core
print("torch", torch.__version__, "megatron-core", megatron.core.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)", flush=True)
PY
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader 2>/dev/null || true

# The record so far travels with the checkout; the call appends to a copy in $OUT.
[ "$OUT" = benchmarks ] || cp benchmarks/memory_scaling.jsonl "$OUT/memory_scaling.jsonl"
( while sleep 60; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null \
    | sed "s/^/[gpu] /"; done ) &
monitor=$!
trap 'kill $monitor 2>/dev/null || true' EXIT
"$PY" benchmarks/memory_scaling.py --plan "$PLAN" --jobs "$JOBS" --deadline-s "$DEADLINE" \
  --results "$OUT/memory_scaling.jsonl" --ckpt-dir "${CKPT_DIR:-/tmp/memory_scaling_ckpt}" \
  --log-dir "$OUT/memory_study_logs"
