#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install megatron-lm2 into it.
#   bash tools/setup_venv.sh            -> .venv in the repo root (LM2_VENV overrides)
# On a machine without CUDA it installs the CPU torch 2.13.0 first, so pip never pulls a
# multi-GB CUDA build. Idempotent: a second run only checks. Prints the venv's python.
#   LM2_CONSTRAINTS=1 bash tools/setup_venv.sh   -> the pinned versions of constraints.txt
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LM2_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtualenv $venv" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -U pip >&2
fi
py="$venv/bin/python"
stamp="$venv/.lm2-installed"
if [ ! -f "$stamp" ] || [ "$root/setup.py" -nt "$stamp" ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] no GPU: installing the CPU torch wheel" >&2
    "$py" -m pip install -q "torch==2.13.0" >&2
  fi
  # LM2_CONSTRAINTS=1: the exact versions the tests last passed with (constraints.txt);
  # otherwise the newest releases setup.py allows.
  constraints=()
  if [ "${LM2_CONSTRAINTS:-0}" != 0 ]; then constraints=(-c "$root/constraints.txt"); fi
  echo "[setup] installing megatron-lm2 and its test dependencies ${constraints[*]}" >&2
  "$py" -m pip install -q -e "$root[dev]" "${constraints[@]}" >&2
  touch "$stamp"
fi
echo "$py"
