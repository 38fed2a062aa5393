#!/usr/bin/env bash
# Set up the environment (tools/setup_venv.sh) and run the whole test suite on this machine;
# then, without arguments, the exported Hugging Face model's tests once more on the oldest
# transformers it supports (the venv holds the newest the install resolved to).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/tools/setup_venv.sh")"
cd "$root"
# The venv's bin/ first: console scripts (lm2-*) and the mpiexec of the mpich wheel live there.
export PATH="$(dirname "$py"):$PATH"
"$py" -m pytest -q -ra --durations=15 tests "$@"
if [ $# -eq 0 ] && [ "${LM2_HF_MATRIX:-1}" != 0 ]; then
  oldest="$(bash "$root/tools/setup_oldest_transformers.sh" "$py")"
  echo "[matrix] the exported HF model on transformers $(PYTHONPATH="$oldest" "$py" -c 'import transformers; print(transformers.__version__)')"
  PYTHONPATH="$oldest" "$py" -m pytest -q -ra -p no:cacheprovider -m "not gpu" \
    tests/test_hf_generation.py tests/test_convert.py tests/test_eval_hf_lm2.py
fi
