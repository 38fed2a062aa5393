# Sourced by examples/quickstart.sh and examples/scaling_demo.sh: the interpreter both use and
# the two steps they begin with (synthetic corpus -> Megatron shards), each step skipped when
# its output is already there, so a re-run resumes.
#
#   source "$root/examples/lib/corpus_to_shards.sh"
#   py="$(lm2_python "$root")"
#   lm2_corpus_to_shards "$py" "$out" "[quickstart]" 7   # prints steps 1/7 and 2/7
#
# Writes $out/raw/synthetic.jsonl (400 stories, seed 1234) and $out/shards (manifest.json,
# blend.json, the shards; the embedded 2k-token tokenizer).

# $LM2_PYTHON, else the .venv python that tools/setup_venv.sh prints last. $1: the repository root.
lm2_python() {
  if [ -n "${LM2_PYTHON:-}" ]; then
    echo "$LM2_PYTHON"
  else
    bash "$1/tools/setup_venv.sh" | tail -n 1
  fi
}

# $1: python, $2: output directory, $3: the log prefix, $4: the script's number of steps.
lm2_corpus_to_shards() {
  local py="$1" out="$2" tag="$3" steps="$4"
  if [ ! -f "$out/raw/synthetic.jsonl" ]; then
    echo "$tag 1/$steps generating the synthetic corpus"
    "$py" -m megatron_lm2.data.synthetic_corpus --out "$out/raw" --documents 400 --seed 1234
  fi
  if [ ! -f "$out/shards/manifest.json" ]; then
    echo "$tag 2/$steps tokenizing into Megatron shards (embedded 2k-token tokenizer)"
    "$py" -m megatron_lm2.preprocess.cli --input "$out/raw/synthetic.jsonl" --json-key text --output "$out/shards"
  fi
}
