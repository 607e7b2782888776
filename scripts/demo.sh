#!/usr/bin/env bash
# The README's first command: set up the venv, then run the offline SAFT demo study.
# Arguments go to `saft-hf demo` (e.g. --quick, --output DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SAFT_HF_VENV:-.venv}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/saft-hf" demo "$@"
