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
# ("[3e10, 1e11, 3e11]" FLOPs), LM2_PYTHON (interpreter; default tools/setup_venv.sh's .venv).
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

# The sweep: widths 32..128 (depth = width / 16, head dim 16), memory slots = width, memory head
# dim 16, two memory chunks per 128-token sequence; DeepSeek's batch/LR rule with the LR clamped
# (the rule extrapolated to 1e11 FLOPs asks for ~1e-2) and the batch floored at 8 sequences.
cat > "$out/sweep.toml" <<TOML
name = "scaling-demo"
out = "sweep"

[model]
lm2_flavor = "debug"
vanilla_flavor = "debug-vanilla"
vocab_size = 2048
seq_length = 128

[ladder]
knob = "width"
values = $widths
aspect_ratio = 16
head_dim = 16
ffn_ratio = 4.0
ffn_multiple = 16

[memory]
# The paper's attention write, as when benchmarks/scaling_demo.md was recorded (the recipes' token
# write is the sweep file's default since issue 10, 2026-12-06 at 097fc56).
write = "attention"
scores = "dot"
forget_bias = 0.0
write_shift = 0
qk_init = "independent"
slots_rule = "proportional"
slots_per_width = 1.0
heads_rule = "head_dim"
head_dim = 16
chunks_per_sequence = 2
layers = "all"

[isoflop]
budgets = $budgets
min_tokens_per_parameter = 0.001
max_tokens_per_parameter = 1000

[schedule]
rule = "deepseek"
lr_max = 3e-3
batch_min_sequences = 8
batch_max_sequences = 32
warmup_fraction = 0.05
min_steps = 10
evals_per_run = 4
eval_iters = 2
log_interval = 10

[cluster]
nodes = 1
gpus_per_node = 1
gpu = "cpu"
bf16 = false
micro_batch_sizes = [8]
max_tensor_parallel = 1
max_pipeline_parallel = 1

[data]
data_path = ["$out/shards"]
split = "98,2,0"
TOML

echo "[scaling-demo] 3/6 planning"
"$py" -m megatron_lm2.scaling.cli plan "$out/sweep.toml"
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
