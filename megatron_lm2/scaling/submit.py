"""`lm2-sweep submit`: the run list as slurm job arrays (one per node count), or, with --local,
as local processes.

Slurm: `<out>/slurm/array_<N>n.sh`, one array task per run, each training into its own run
directory. The launch line and the preemption/requeue handling are the section of
slurm/pretrain_lm2_1p7b.sh between its "launch and requeue" markers, copied verbatim (the
generated scripts are self-contained, since sbatch runs a copy of the script). Every run's
lm2-train flags are in `<run_dir>/train_args.txt`, one per line.

Resumable: a run whose `latest` names its final step is finished and skipped (the array task
exits 0; --local does not start it); an unfinished one resumes from its own checkpoint.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional

from megatron_lm2.scaling.plan import Run, SweepPlan
from megatron_lm2.scaling.util import SweepDataError, atomic_write_text
from megatron_lm2.training.checkpoint import TRACKER, iteration_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_TEMPLATE = os.path.join(ROOT, "slurm", "pretrain_lm2_1p7b.sh")
SECTION_BEGIN = "# ---- launch and requeue"
SECTION_END = "# ---- end of launch and requeue ----"
ARGS_FILE = "train_args.txt"


def is_finished(run: Run) -> bool:
    tracker = os.path.join(run.run_dir, TRACKER)
    if not os.path.isfile(tracker):
        return False
    with open(tracker) as handle:
        return handle.read().strip() == iteration_dir(run.steps)


def launch_section(template: str = SLURM_TEMPLATE) -> str:
    """The launch + requeue lines of the 1.7B script (between its markers)."""
    with open(template) as handle:
        text = handle.read()
    start, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if start < 0 or end < 0:
        raise RuntimeError(f"{template}: the '{SECTION_BEGIN}' / '{SECTION_END}' markers are missing")
    return text[start:end + len(SECTION_END)] + "\n"


def write_run_args(run: Run) -> str:
    path = os.path.join(run.run_dir, ARGS_FILE)
    atomic_write_text(path, "\n".join(run.args) + "\n")
    return path


def _time_limit(runs: List[Run], fallback_hours: float) -> str:
    hours = [r.layout["hours"] for r in runs if r.layout.get("hours") is not None]
    limit = max(1.0, math.ceil(1.25 * max(hours))) if hours else max(1.0, math.ceil(fallback_hours))
    return f"{int(limit):d}:00:00"


def array_script(plan: SweepPlan, nodes: int, runs: List[Run]) -> str:
    cluster = plan.spec.get("cluster", {})
    gpus = runs[0].layout["gpus_per_node"]
    name = f"{plan.name}-{nodes}n"
    ids = " ".join(shlex.quote(r.id) for r in runs)
    steps = " ".join(str(r.steps) for r in runs)
    logs = os.path.join(plan.out, "logs")
    header = f"""#!/bin/bash
# lm2-sweep {plan.name}: {len(runs)} runs on {nodes} node(s) x {gpus} GPUs, one array task per run.
# Written by `lm2-sweep submit` from {os.path.join(plan.out, 'plan.json')}; submit with
#   sbatch {os.path.join(plan.out, 'slurm', f'array_{nodes}n.sh')}
# Re-submitting is safe: a finished run (its `latest` names its last step) exits at once, an
# unfinished one resumes from its checkpoint. VENV (an activate script) and LAUNCHER as in
# slurm/pretrain_lm2_1p7b.sh.
#
#SBATCH --job-name={name}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time={_time_limit(runs, cluster.get('max_hours', 24.0))}
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={logs}/%x-%A_%a.out

set -euo pipefail

RUN_IDS=({ids})
RUN_STEPS=({steps})
TASK=${{SLURM_ARRAY_TASK_ID:?run this script with sbatch (an array task)}}
RUN_ID=${{RUN_IDS[$TASK]}}
CHECKPOINT_DIR={shlex.quote(os.path.join(plan.out, 'runs'))}/$RUN_ID
FINAL=$(printf 'iter_%07d' "${{RUN_STEPS[$TASK]}}")
if [[ -f "$CHECKPOINT_DIR/latest" && "$(cat "$CHECKPOINT_DIR/latest")" == "$FINAL" ]]; then
    echo "$RUN_ID is finished ($FINAL); nothing to do"
    exit 0
fi
mapfile -t ARGS < "$CHECKPOINT_DIR/{ARGS_FILE}"
NODES=${{SLURM_JOB_NUM_NODES:-{nodes}}}
GPUS_PER_NODE={gpus}
if [[ -n "${{VENV:-}}" ]]; then source "$VENV"; fi
mkdir -p {shlex.quote(logs)}

"""
    return header + launch_section()


def write_slurm(plan: SweepPlan) -> Dict[int, str]:
    """One array script per node count; returns {nodes: path}."""
    groups: Dict[int, List[Run]] = {}
    for run in plan.runs:
        write_run_args(run)
        groups.setdefault(run.layout["nodes"], []).append(run)
    paths = {}
    for nodes, runs in sorted(groups.items()):
        path = os.path.join(plan.out, "slurm", f"array_{nodes}n.sh")
        # The folder of the script's #SBATCH --output: slurm does not create it, and a job
        # whose output folder is missing loses its log.
        os.makedirs(os.path.join(plan.out, "logs"), exist_ok=True)
        atomic_write_text(path, array_script(plan, nodes, runs))
        os.chmod(path, 0o755)
        paths[nodes] = path
    return paths


# -------------------------------------------------------------------------------- local
def local_command(run: Run, python: str) -> List[str]:
    lay = run.layout
    if lay["nodes"] != 1:
        raise SweepDataError(f"run {run.id}: its layout has {lay['nodes']} nodes; --local runs one-node layouts "
                             f"only (plan the sweep with [cluster] nodes = 1)")
    if lay["gpus_per_node"] == 1:
        return [python, "-m", "megatron_lm2.train", *run.args]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={lay['gpus_per_node']}",
            "-m", "megatron_lm2.train", *run.args]


def run_local(plan: SweepPlan, jobs: int = 1, threads: int = 1, python: Optional[str] = None,
              log=print) -> int:
    """Run every unfinished run, `jobs` at a time, each with `threads` CPU threads; logs to
    <run_dir>/train.log. Returns the number of failed runs."""
    python = python or sys.executable
    todo = []
    for run in plan.runs:
        write_run_args(run)  # the flags of every run are on disk, as with the slurm arrays
        if is_finished(run):
            log(f"[lm2-sweep] {run.id}: finished, skipped")
            continue
        todo.append((run, local_command(run, python)))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    running: List[tuple] = []
    failed = 0
    started_all = time.time()

    def reap(block: bool) -> None:
        nonlocal failed
        while running:
            for item in list(running):
                run, proc, handle, started = item
                code = proc.poll()
                if code is None:
                    continue
                handle.close()
                running.remove(item)
                ok = code == 0 and is_finished(run)
                failed += not ok
                log(f"[lm2-sweep] {run.id}: {'done' if ok else f'FAILED (exit {code})'} in "
                    f"{time.time() - started:.0f} s; log {os.path.join(run.run_dir, 'train.log')}")
            if not block or len(running) < jobs:
                return
            time.sleep(0.5)

    for i, (run, command) in enumerate(todo):
        reap(block=True)
        handle = open(os.path.join(run.run_dir, "train.log"), "a")
        log(f"[lm2-sweep] {run.id}: starting ({i + 1}/{len(todo)}, {run.steps} steps)")
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        running.append((run, proc, handle, time.time()))
    while running:
        reap(block=False)
        if running:
            time.sleep(0.5)
    log(f"[lm2-sweep] local: {len(todo) - failed}/{len(todo)} runs done in {time.time() - started_all:.0f} s")
    return failed
