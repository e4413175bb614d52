#!/usr/bin/env bash
# The project's test command: the whole suite, then the Triton kernels (and a Triton
# turn against the reference) under the Triton interpreter, which must be switched on
# for the whole process. Extra arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
"$PY" -m pytest -q -p no:cacheprovider tests "$@"
"$PY" -c "import triton" || { echo "run_tests.sh: triton is missing (pip install triton); the Triton kernels cannot be checked" >&2; exit 1; }
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py tests/editors/test_parity.py -k triton
