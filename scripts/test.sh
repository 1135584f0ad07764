#!/usr/bin/env bash
# Installs flowops, then runs the test suite (Triton kernels run on CPU under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m pytest -q tests
