#!/usr/bin/env bash
# Set up the environment (tools/setup_venv.sh) and run the whole test suite on this machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/tools/setup_venv.sh")"
cd "$root"
# The venv's bin/ first: console scripts (lm2-*) and the mpiexec of the mpich wheel live there.
export PATH="$(dirname "$py"):$PATH"
exec "$py" -m pytest -q -ra --durations=15 tests "$@"
