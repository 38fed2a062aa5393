#!/usr/bin/env bash
# Wheels for running benchmarks/bench_gpu.py on a GPU machine that has torch but not
# megatron-core and cannot reach PyPI: megatron-core 0.16.1 for the device's Python, and
# packaging (megatron-core needs packaging>=24.2; numpy, its other dependency, comes with torch).
#
#   bash tools/fetch_device_wheels.sh [PYTHON_VERSION=3.12] [FOLDER=wheels]
#
# Checks the folder stays under the 64 MiB a device call carries, then prints it. On the device:
#   pip install --no-deps --no-index --find-links wheels megatron-core==0.16.1 packaging && python benchmarks/bench_gpu.py --out benchmarks/gpu_run.json
set -euo pipefail
PYVER="${1:-3.12}"
DIR="${2:-wheels}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
"$PY" -m pip download "megatron-core==0.16.1" --no-deps --only-binary :all: --python-version "$PYVER" -d "$DIR"
"$PY" -m pip download "packaging>=24.2" --no-deps --only-binary :all: --python-version "$PYVER" -d "$DIR"
"$PY" "$HERE/carry_size.py" "$DIR"
ls -l "$DIR"
echo "$DIR"
