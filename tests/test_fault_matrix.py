"""The fault matrix's fast half runs in CI (benchmarks/faults.py --quick: the trials that need
no trained run or corpus); the whole matrix is `python benchmarks/faults.py` (docs/training.md)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fault_matrix_quick_half_passes(tmp_path):
    out = tmp_path / "faults.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "faults.py"), "--quick", "--out",
                             str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    assert len(rows) >= 10 and all(row.split(" | ")[3] in ("ok", "skipped") for row in rows), rows
    assert ", 0 failed; tracebacks 0, hangs 0, exit 0 on bad input 0" in out.read_text()
