#!/usr/bin/env bash
# Installs flowops, then runs the main job: the 2-moons RealNVP example end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m flowops demo "$@"
