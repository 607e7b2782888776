#!/usr/bin/env bash
# Fine-tune CLIP on the paper's 8 vision tasks with AdamW (sam_rho 0) and with SAFT (ASAM, rho 0.5),
# then merge each family and evaluate it (weighted average / task arithmetic / TIES, test splits).
#
#   MODEL=openai/clip-vit-base-patch32 MODE=full NUM_GPUS=1 bash recipes/clip_vision/run_all.sh
#
# Environment (all optional):
#   MODEL      CLIP checkpoint (openai/clip-vit-base-patch32 | -patch16 | openai/clip-vit-large-patch14 | local dir)
#   MODE       full | ftlo | ftts                     (default full)
#   OPTIMIZERS which families to run                  (default "sgd asam")
#   TASKS      subset of the 8 tasks                   (default all)
#   NUM_GPUS   processes; 1 -> single_gpu.yaml, >1 -> multi_gpu.yaml (or set ACCELERATE_CONFIG)
#   ACCELERATE_CONFIG  e.g. recipes/clip_vision/accelerate/deepspeed_zero2.yaml
#   OUT        output root                             (default runs/clip_vision)
#   DATA_ROOT  directory with one local dataset per task (DATA_ROOT/<task>); default: the Hub datasets
#   EXTRA      extra finetune.py flags, e.g. "--bf16 true"
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=${MODEL:-openai/clip-vit-base-patch32}
MODE=${MODE:-full}
OPTIMIZERS=${OPTIMIZERS:-"sgd asam"}
TASKS=${TASKS:-"cars dtd eurosat gtsrb mnist resisc45 sun397 svhn"}
NUM_GPUS=${NUM_GPUS:-1}
OUT=${OUT:-runs/clip_vision}
EXTRA=${EXTRA:-}
if [[ -z "${ACCELERATE_CONFIG:-}" ]]; then
  if [[ "$NUM_GPUS" -gt 1 ]]; then ACCELERATE_CONFIG=recipes/clip_vision/accelerate/multi_gpu.yaml
  else ACCELERATE_CONFIG=recipes/clip_vision/accelerate/single_gpu.yaml; fi
fi
PER_DEVICE_BATCH=$((128 / NUM_GPUS))   # the paper's global batch is 128
TAG=$(basename "$MODEL")

for OPT in $OPTIMIZERS; do
  case "$OPT" in
    sgd)  RHO=0 ;;
    asam) RHO=0.5 ;;
    *) echo "unknown optimizer family $OPT (use sgd or asam)" >&2; exit 2 ;;
  esac
  RUNS=()
  for TASK in $TASKS; do
    RUN_DIR="$OUT/$TAG/$OPT/$MODE/$TASK"
    RUNS+=("$RUN_DIR")
    if [[ -f "$RUN_DIR/finetuned_accuracy.json" ]]; then
      echo "== $RUN_DIR already finished, skipping"; continue
    fi
    DATA_FLAG=()
    if [[ -n "${DATA_ROOT:-}" ]]; then DATA_FLAG=(--data_path "$DATA_ROOT/$TASK"); fi
    echo "== fine-tune $TASK ($OPT, $MODE) -> $RUN_DIR"
    # shellcheck disable=SC2086
    accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" \
      recipes/clip_vision/finetune.py --config "recipes/clip_vision/configs/$TASK.yaml" \
      --model_name_or_path "$MODEL" --finetuning_mode "$MODE" --sam_rho "$RHO" \
      --per_device_train_batch_size "$PER_DEVICE_BATCH" --output_dir "$RUN_DIR" "${DATA_FLAG[@]}" $EXTRA
  done
  DATA_ARGS=()
  if [[ -n "${DATA_ROOT:-}" ]]; then for TASK in $TASKS; do DATA_ARGS+=("$TASK=$DATA_ROOT/$TASK"); done; fi
  echo "== merge + evaluate $OPT/$MODE"
  python recipes/clip_vision/merge_and_evaluate.py "${RUNS[@]}" --output-dir "$OUT/$TAG/$OPT/$MODE/merged" \
    ${DATA_ARGS[@]:+--data "${DATA_ARGS[@]}"}
done
