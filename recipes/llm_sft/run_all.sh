#!/usr/bin/env bash
# SFT two tasks with SAFT (ASAM inside TRL's SFTTrainer), merge them by task arithmetic with
# `saft-hf merge`, and evaluate the completion loss of the base, fine-tuned and merged models on
# every task (OUT/summary.json).
#
#   bash recipes/llm_sft/run_all.sh --tiny     # offline, CPU, a few minutes: tiny Llama + synthetic tasks
#   bash recipes/llm_sft/run_all.sh            # a real model on a GPU (defaults below)
#
# Settings (environment variables):
#   MODEL       base model, Hub name or local dir (default Qwen/Qwen2.5-0.5B; ignored with --tiny)
#   TASKS       task configs in configs/ (default "gsm8k code_alpaca"; --tiny: "tiny_copy tiny_reverse")
#   OUT         output root (default runs/llm_sft, --tiny: runs/llm_sft_tiny)
#   ALPHA       task-arithmetic scaling (default 0.5)
#   LAUNCH      default "accelerate launch" (e.g. "accelerate launch --num_processes 8"); --tiny: python
#   EXTRA_ARGS  appended to every sft.py call (e.g. "--sam_rho 0" for the plain-SFT baseline)
#   EVAL_ARGS   appended to evaluate_loss.py (e.g. "--set max_eval_samples=50")
# Finished fine-tuning runs (train_results.json present) are skipped, so the script can be re-run.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TINY=0
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    *) echo "unknown argument $arg (use --tiny or environment variables, see the header)" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python}"
SAFT_HF="${SAFT_HF:-saft-hf}"
ALPHA="${ALPHA:-0.5}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
EVAL_ARGS="${EVAL_ARGS:-}"
if [[ $TINY == 1 ]]; then
  TASKS="${TASKS:-tiny_copy tiny_reverse}"
  OUT="${OUT:-runs/llm_sft_tiny}"
  LAUNCH="${LAUNCH:-$PYTHON}"
else
  MODEL="${MODEL:-Qwen/Qwen2.5-0.5B}"
  TASKS="${TASKS:-gsm8k code_alpaca}"
  OUT="${OUT:-runs/llm_sft}"
  LAUNCH="${LAUNCH:-accelerate launch}"
fi

BASE="$OUT/pretrained"
if [[ ! -f "$BASE/config.json" ]]; then
  echo "== exporting the base model to $BASE"
  if [[ $TINY == 1 ]]; then
    $PYTHON "$HERE/export_pretrained.py" --tiny --output "$BASE"
  else
    $PYTHON "$HERE/export_pretrained.py" --model "$MODEL" --output "$BASE"
  fi
fi

configs=()
models_yaml=""
for task in $TASKS; do
  config="$HERE/configs/$task.yaml"
  [[ -f "$config" ]] || { echo "no task config $config" >&2; exit 2; }
  configs+=("$config")
  dir="$OUT/sft/$task"
  models_yaml+="  - {name: $task, path: $dir}"$'\n'
  if [[ -f "$dir/train_results.json" ]]; then
    echo "== $task already fine-tuned ($dir), skipping"
    continue
  fi
  echo "== SFT + ASAM: $task"
  # shellcheck disable=SC2086  # LAUNCH / EXTRA_ARGS are word lists on purpose
  $LAUNCH "$HERE/sft.py" --config "$config" --model_name_or_path "$BASE" --output_dir "$dir" $EXTRA_ARGS
done

echo "== merging (task arithmetic, alpha $ALPHA)"
cat > "$OUT/merge.yaml" <<YAML
# written by recipes/llm_sft/run_all.sh
pretrained: $BASE
models:
${models_yaml}method: task_arithmetic
params:
  scaling: $ALPHA
YAML
$SAFT_HF merge "$OUT/merge.yaml" --output "$OUT/merged" --overwrite --no-progress

echo "== evaluating the completion loss on every task"
# shellcheck disable=SC2086
$PYTHON "$HERE/evaluate_loss.py" --model "$BASE" --tasks "${configs[@]}" --output "$OUT/eval/pretrained.json" $EVAL_ARGS
for task in $TASKS; do
  # shellcheck disable=SC2086
  $PYTHON "$HERE/evaluate_loss.py" --model "$OUT/sft/$task" --tasks "${configs[@]}" \
    --output "$OUT/eval/sft_$task.json" $EVAL_ARGS
done
# shellcheck disable=SC2086
$PYTHON "$HERE/evaluate_loss.py" --model "$OUT/merged" --tasks "${configs[@]}" --output "$OUT/eval/merged.json" $EVAL_ARGS

$PYTHON - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {p.stem: json.loads(p.read_text())["loss"] for p in sorted((out / "eval").glob("*.json"))}
(out / "summary.json").write_text(json.dumps(rows, indent=2))
tasks = list(next(iter(rows.values())))
print("model".ljust(24) + "".join(t.rjust(14) for t in tasks))
for name, losses in rows.items():
    print(name.ljust(24) + "".join(f"{losses[t]:14.4f}" for t in tasks))
PY
echo "== done: $OUT/summary.json"
