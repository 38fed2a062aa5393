#!/usr/bin/env bash
# Install the oldest supported transformers (tests/transformers-oldest.txt) into a side
# directory of the project's venv, for `PYTHONPATH=<dir> python -m pytest ...`: the venv keeps
# the newest release, and the exported HF model is tested on both. Idempotent. Prints the dir.
#   bash tools/setup_oldest_transformers.sh [venv-python]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-$(bash "$root/tools/setup_venv.sh")}"
pins="$root/tests/transformers-oldest.txt"
target="$(dirname "$(dirname "$py")")/transformers-oldest"
stamp="$target/.lm2-installed"
if [ ! -f "$stamp" ] || [ "$pins" -nt "$stamp" ]; then
  echo "[setup] installing the oldest supported transformers into $target" >&2
  rm -rf "$target"
  # --no-deps: everything else (torch, numpy, safetensors, protobuf, ...) comes from the venv.
  "$py" -m pip install -q --no-deps --target "$target" -r "$pins" >&2
  touch "$stamp"
fi
echo "$target"
