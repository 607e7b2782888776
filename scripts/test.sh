#!/usr/bin/env bash
# The README's test command: set up the venv if needed, then run pytest.
# Default: everything but tests marked `slow` (well under 20 minutes on 2 CPU cores).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the long end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SAFT_HF_VENV:-.venv}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$rc"
