#!/usr/bin/env bash
# Installs flowops and its dependencies on a fresh machine (CPU torch wheel; builds the C++ extension).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet setuptools wheel ninja
"$PY" -m pip install --quiet --no-build-isolation -e ".[dev]"
"$PY" -c "import flowops, flowops._backend as b; print('flowops installed; C++ extension:', b.has_cpp())"
