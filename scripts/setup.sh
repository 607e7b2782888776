#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install saft-hf with every extra.
# torch is installed first and on its own so that no dependency can pull a CUDA build;
# GPU users: install the torch build you want into the venv first, this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SAFT_HF_VENV:-.venv}"
PY="${PYTHON:-python3}"
# Extras to install: "all" (default); CI adds "peers" (mergekit, to compare merges against it).
EXTRAS="${SAFT_HF_EXTRAS:-all}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.saft-hf-installed"
want="$( (cat setup.py constraints.txt; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU wheel)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "torch==2.13.0"
fi
echo "[setup] installing saft-hf and its extras (pinned by constraints.txt)"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[$EXTRAS]"
echo "$want" > "$stamp"
"$VENV/bin/python" -c "import torch, transformers; print(f'[setup] torch {torch.__version__}, transformers {transformers.__version__}, CUDA available: {torch.cuda.is_available()}')"
