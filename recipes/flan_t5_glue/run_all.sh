#!/usr/bin/env bash
# The SAFT paper's Flan-T5 GLUE experiment (appendix C.8), end to end:
#   for each run (sgd = plain AdamW, asam = SAFT) and task: fine-tune (finetune.py, accelerate),
#   then merge the run's task models by task arithmetic with alpha searched on validation
#   (merge_search.py), evaluate the merge (saft-hf evaluate glue), and tabulate (summary.md).
# The base model is first saved as transformers loads it (OUT/pretrained, export_pretrained.py).
# Every setting is an environment variable:
#   MODEL       base model (default google/flan-t5-base; a local dir works offline)
#   TASKS       default "cola mrpc rte sst2" (the paper); the 8-task benchmark:
#               "cola mnli mrpc qnli qqp rte sst2 stsb"
#   RUNS        configs/<run>.yaml to run, default "sgd asam" (also: asam_lora)
#   OUT         output root, default runs/flan_t5_glue
#   DATA_ROOT   local GLUE data DATA_ROOT/<task> (save_to_disk dirs or split files); empty = the Hub
#   LAUNCH      default "accelerate launch" (e.g. "accelerate launch --config_file recipes/flan_t5_glue/accelerate/ddp.yaml")
#   EXTRA_ARGS  appended to every finetune.py call (e.g. "--max_steps 100" for a smoke run)
#   SEARCH_ARGS appended to merge_search.py (e.g. "--max_samples 1000" or "--alphas 0.3 0.5")
# Finished fine-tuning runs (glue_scores.json present) are skipped, so the script can be re-run.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="${MODEL:-google/flan-t5-base}"
TASKS="${TASKS:-cola mrpc rte sst2}"
RUNS="${RUNS:-sgd asam}"
OUT="${OUT:-runs/flan_t5_glue}"
DATA_ROOT="${DATA_ROOT:-}"
LAUNCH="${LAUNCH:-accelerate launch}"
PYTHON="${PYTHON:-python}"
SAFT_HF="${SAFT_HF:-saft-hf}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
SEARCH_ARGS="${SEARCH_ARGS:-}"

# Fine-tune from, and merge against, the base model exactly as transformers loads it (same tensor
# names and ties in pretrained and fine-tuned checkpoints).
BASE="$OUT/pretrained"
if [[ ! -f "$BASE/config.json" ]]; then
  echo "== exporting $MODEL to $BASE"
  $PYTHON "$HERE/export_pretrained.py" --model "$MODEL" --output "$BASE"
fi

summary=()
for run in $RUNS; do
  for task in $TASKS; do
    dir="$OUT/$run/$task"
    if [[ -f "$dir/glue_scores.json" ]]; then
      echo "== $run/$task already done ($dir/glue_scores.json), skipping"
      continue
    fi
    echo "== fine-tuning $run/$task"
    # shellcheck disable=SC2086  # LAUNCH / EXTRA_ARGS are word lists on purpose
    $LAUNCH "$HERE/finetune.py" --config "$HERE/configs/$run.yaml" --task "$task" \
      --model_name_or_path "$BASE" --output_dir "$dir" ${DATA_ROOT:+--data_path "$DATA_ROOT/$task"} $EXTRA_ARGS
  done
  echo "== merging $run (task arithmetic, alpha searched on validation)"
  # shellcheck disable=SC2086
  $PYTHON "$HERE/merge_search.py" --pretrained "$BASE" --finetuned_root "$OUT/$run" --tasks $TASKS \
    --output "$OUT/merged_$run" --overwrite ${DATA_ROOT:+--data_root "$DATA_ROOT"} $SEARCH_ARGS
  echo "== evaluating merged_$run"
  # shellcheck disable=SC2086
  $SAFT_HF evaluate glue --model "$OUT/merged_$run" --tasks $TASKS --finetuned_root "$OUT/$run" \
    --output_dir "$OUT/eval_merged_$run" --name "$run task arithmetic" ${DATA_ROOT:+--data_root "$DATA_ROOT"}
  summary+=("$run=$OUT/eval_merged_$run/glue_eval.json")
done
$PYTHON "$HERE/summarize.py" "$OUT/summary.md" "${summary[@]}"
echo "== done: $OUT/summary.md"
