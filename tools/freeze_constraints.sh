#!/usr/bin/env bash
# Write constraints.txt: the exact versions in the project's venv, i.e. what the last green
# `bash tests/run.sh` ran with. Reproducible install: pip install -e .[dev] -c constraints.txt
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${1:-$root/.venv/bin/python}"
{
  echo "# Exact versions the test suite (bash tests/run.sh) last passed with, on $(uname -m) Python $("$py" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d)."
  echo "# Reproducible install: LM2_CONSTRAINTS=1 bash tools/setup_venv.sh   (= pip install -e .[dev] -c constraints.txt)"
  echo "# Regenerate after a green run: bash tools/freeze_constraints.sh"
  "$py" -m pip list --format=freeze --exclude-editable 2>/dev/null | sed "s/+cpu$//"
} > "$root/constraints.txt"
echo "wrote $root/constraints.txt"
