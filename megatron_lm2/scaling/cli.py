"""lm2-sweep: scaling studies (docs/scaling.md).

    lm2-sweep plan sweep.toml --dry-run     print the runs, layouts and GPU-hours; write nothing
    lm2-sweep plan sweep.toml               write <out>/plan.json (and print the same table)
    lm2-sweep submit <out>                  write <out>/slurm/array_<N>n.sh, one array per node count
    lm2-sweep submit <out> --local          run the runs here, one after another (or --jobs K)
    lm2-sweep collect <out>                 <out>/results.csv: run list x metrics.jsonl
    lm2-sweep fit <out>/results.csv         isoFLOP + L(N, D) fits, intervals, multiplier, PNGs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megatron_lm2.cli_errors import cli_entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm2-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    plan = verbs.add_parser("plan", help="sweep.toml -> the run list (plan.json)")
    plan.add_argument("sweep", help="the sweep file (docs/scaling.md lists its keys)")
    plan.add_argument("--dry-run", action="store_true", help="print the sweep, write nothing")
    submit = verbs.add_parser("submit", help="slurm job arrays, or --local processes")
    submit.add_argument("plan", help="plan.json or the sweep's output directory")
    submit.add_argument("--local", action="store_true", help="run the runs on this machine")
    submit.add_argument("--jobs", type=int, default=1, help="--local: runs at a time")
    submit.add_argument("--threads", type=int, default=1, help="--local: CPU threads per run (OMP_NUM_THREADS)")
    collect = verbs.add_parser("collect", help="run list x metrics.jsonl -> one table")
    collect.add_argument("plan", help="plan.json or the sweep's output directory")
    collect.add_argument("--out", help="table path, .csv or .parquet (default <out>/results.csv)")
    fit = verbs.add_parser("fit", help="isoFLOP and L(N, D) fits, bootstrap intervals, multiplier, plots")
    fit.add_argument("results", help="the table lm2-sweep collect wrote")
    fit.add_argument("--out", help="directory for fit.json and the PNGs (default: next to the table)")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: none)")
    fit.add_argument("--level", type=float, default=0.90, help="interval coverage")
    fit.add_argument("--parameters", default="params_total",
                     choices=("params_total", "params_base", "params_non_embedding"), help="N for the fits")
    fit.add_argument("--loss", default="final_val_loss", help="loss column (e.g. val_loss_at_1e+19)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--no-plots", action="store_true")
    return parser


@cli_entry("lm2-sweep")
def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_lm2.cli_args import quiet_library_warnings

    quiet_library_warnings()
    args = build_parser().parse_args(argv)
    return {"plan": _plan, "submit": _submit, "collect": _collect, "fit": _fit}[args.verb](args)


def _plan(args) -> int:
    from megatron_lm2.scaling.plan import format_dry_run, plan_sweep, write_plan

    plan = plan_sweep(args.sweep)
    print(format_dry_run(plan))
    if not args.dry_run:
        print(f"wrote {write_plan(plan)}")
    return 0


def _submit(args) -> int:
    from megatron_lm2.scaling.plan import read_plan
    from megatron_lm2.scaling.submit import is_finished, run_local, write_slurm

    plan = read_plan(args.plan)
    if args.local:
        return 1 if run_local(plan, jobs=args.jobs, threads=args.threads) else 0
    paths = write_slurm(plan)
    for nodes, path in paths.items():
        runs = [r for r in plan.runs if r.layout["nodes"] == nodes]
        done = sum(is_finished(r) for r in runs)
        print(f"{path}: {len(runs)} runs on {nodes} node(s) ({done} finished, skipped when they start)")
        print(f"  sbatch {path}")
    return 0


def _collect(args) -> int:
    from megatron_lm2.scaling.collect import collect, write_table
    from megatron_lm2.scaling.plan import read_plan

    plan = read_plan(args.plan)
    rows, notes = collect(plan)
    path = write_table(rows, args.out or os.path.join(plan.out, "results.csv"))
    for note in notes:
        print(note)
    print(f"wrote {path}")
    return 0


def _fit(args) -> int:
    from megatron_lm2.scaling.fit import format_study, load_points, run_study, study_json
    from megatron_lm2.scaling.util import SweepDataError, atomic_write_text

    points = load_points(args.results, parameters=args.parameters, loss=args.loss)
    if not points:
        raise SweepDataError(f"{args.results}: no finished run has a {args.loss!r} value")
    study = run_study(points, samples=args.bootstrap, seed=args.seed, level=args.level)
    print(format_study(study, args.level))
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    atomic_write_text(os.path.join(out, "fit.json"), json.dumps(study_json(study), indent=1, default=float) + "\n")
    print(f"wrote {os.path.join(out, 'fit.json')}")
    if not args.no_plots:
        from megatron_lm2.scaling.plots import plot_all

        for path in plot_all(points, study, out).values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
