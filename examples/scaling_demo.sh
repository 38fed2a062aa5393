#!/usr/bin/env bash
# The scaling-study demo on a CPU, end to end, no downloads (docs/scaling.md):
#   synthetic corpus -> Megatron shards (embedded 2k tokenizer) -> lm2-sweep plan (a tiny width
#   ladder x LM2 and vanilla, isoFLOP grids at 3 budgets) -> submit --local (the runs as local
#   processes) -> collect -> fit (isoFLOP parabolas, L(N, D), bootstrap, multiplier) -> PNGs.
#
#   bash examples/scaling_demo.sh
#
# Environment: LM2_SCALING_DEMO_DIR (default runs/scaling_demo), LM2_SCALING_DEMO_JOBS (runs at
# a time, default 2), LM2_SCALING_DEMO_WIDTHS ("[32, 48, 64, 96, 128]"), LM2_SCALING_DEMO_BUDGETS
# ("[3e10, 1e11, 3e11]" FLOPs), LM2_PYTHON (interpreter; default tools/setup_venv.sh's .venv),
# LM2_SCALING_DEMO_PLAN_ONLY=1 (stop after planning).
# Re-running resumes: finished runs are skipped, interrupted ones resume from their checkpoint.
# What this cannot show: the models are 0.1-1 M parameters trained for seconds on a 1.3 M-token
# synthetic corpus; the numbers exercise the pipeline, they are not scaling laws of LM2.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${LM2_SCALING_DEMO_DIR:-$root/runs/scaling_demo}"
jobs="${LM2_SCALING_DEMO_JOBS:-2}"
widths="${LM2_SCALING_DEMO_WIDTHS:-[32, 48, 64, 96, 128]}"
budgets="${LM2_SCALING_DEMO_BUDGETS:-[3e10, 1e11, 3e11]}"
started=$SECONDS
source "$root/examples/lib/corpus_to_shards.sh"  # lm2_python, lm2_corpus_to_shards
py="$(lm2_python "$root")"
export OMP_NUM_THREADS=1
mkdir -p "$out"

lm2_corpus_to_shards "$py" "$out" "[scaling-demo]" 6  # 1/6 corpus, 2/6 shards

# The sweep: examples/sweeps/cpu_demo.toml (its comments say what it is), with this run's
# widths, budgets, output and shards written in.
"$py" - "$root/examples/sweeps/cpu_demo.toml" "$out" "$widths" "$budgets" <<'PY'
import re, sys
source, out, widths, budgets = sys.argv[1:]
text = open(source).read()
for key, value in (("values", widths), ("budgets", budgets), ("out", f'"{out}/sweep"'),
                   ("data_path", f'["{out}/shards"]')):
    text, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, count=1, flags=re.M)
    assert count == 1, key
open(f"{out}/sweep.toml", "w").write(text)
PY

echo "[scaling-demo] 3/6 planning"
"$py" -m megatron_lm2.scaling.cli plan "$out/sweep.toml"
if [ "${LM2_SCALING_DEMO_PLAN_ONLY:-0}" = 1 ]; then echo "[scaling-demo] planned only"; exit 0; fi
echo "[scaling-demo] 4/6 running the sweep locally ($jobs at a time, one thread each)"
"$py" -m megatron_lm2.scaling.cli submit "$out/sweep" --local --jobs "$jobs" --threads 1
echo "[scaling-demo] 5/6 collecting"
"$py" -m megatron_lm2.scaling.cli collect "$out/sweep"
echo "[scaling-demo] 6/6 fitting (N = non-embedding parameters: at these widths the 2k-vocab embedding is most of N)"
"$py" -m megatron_lm2.scaling.cli fit "$out/sweep/results.csv" --parameters params_non_embedding --bootstrap 200

cat <<DONE

[scaling-demo] done in $((SECONDS - started)) s
  plan         $out/sweep/plan.json
  runs         $out/sweep/runs/<run>/  (metrics.jsonl, train.log, checkpoint)
  table        $out/sweep/results.csv
  fits         $out/sweep/fit.json
  plots        $out/sweep/isoflop.png, loss_vs_compute.png, frontier.png
DONE
