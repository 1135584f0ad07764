#!/usr/bin/env bash
# GPU check of flowops on a machine with one NVIDIA GPU, torch (CUDA) and triton preinstalled and
# no internet access. Run from the repository root:
#
#     bash bench/gpu_check.sh            # logs and results in ./out, or in $OUT when set
#
# Steps, each under `timeout`, the whole run within GPU_CHECK_BUDGET_S (default 450 s; steps that do not
# fit are skipped and reported, so raise it when the device time allows):
#   1. record the machine (nvidia-smi, torch / triton / CUDA versions);
#   2. install flowops editable against the installed torch (no build isolation, no dependency
#      resolution, nothing downloaded). The C++ extension holds CPU kernels only, so its build is
#      skipped unless GPU_CHECK_BUILD_EXT=1 (it takes minutes and plays no part on CUDA);
#   3. `flowops info`;
#   4. the Triton kernel tests compiled on CUDA (TRITON_INTERPRET=0): fp32/fp64/fp16/bf16 against
#      the reference, through the launchers and the registered op;
#   5. `flowops bench --device cuda --json $OUT/bench_cuda.json`.
# A failing step is recorded and the next one still runs; the exit status is that of the first
# failure. Every step writes $OUT/<step>.log; $OUT/gpu_check.log is the summary.
set -u -o pipefail

OUT="${OUT:-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"
STATUS=0

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD with its output in $OUT/NAME.log, under min(LIMIT_S, time left).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        log "SKIP  $name: out of time budget"
        (( STATUS == 0 )) && STATUS=124
        return 124
    fi
    local cmd="$*"
    (( ${#cmd} > 160 )) && cmd="${cmd:0:160}..."
    log "START $name (limit ${limit}s): ${cmd//$'\n'/ }"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    if (( rc == 124 || rc == 137 )); then
        log "TIMEOUT $name after ${limit}s"
    fi
    log "END   $name rc=$rc"
    tail -n 30 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
    (( rc != 0 && STATUS == 0 )) && STATUS=$rc
    return $rc
}

# 1. the machine
step env 60 bash -c "
    nvidia-smi || true
    $PY - <<'EOF'
import platform
import torch
print('python', platform.python_version())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
try:
    import triton
    print('triton', triton.__version__)
except Exception as exc:
    print('triton not importable:', exc)
EOF
    $PY -m pip list 2>/dev/null | grep -i -E '^(torch|triton|pytest|pytest-benchmark|setuptools|ninja|numpy) ' || true
"

# 2. install (nothing is downloaded: the machine is offline)
if ! "$PY" -c "import pytest, pytest_benchmark" > /dev/null 2>&1; then
    step test_tools 60 "$PY" -m pip install --retries 0 --timeout 5 pytest pytest-benchmark || true
fi
if [[ "${GPU_CHECK_BUILD_EXT:-0}" == "1" ]]; then
    NO_EXT=0
else
    NO_EXT=1
fi
step install 240 env FLOWOPS_NO_EXT="$NO_EXT" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .

# 3. what the package sees
step info 60 "$PY" -m flowops info

# 4. the Triton kernels, compiled for the GPU (the interpreter off)
# (without a usable GPU the CUDA cases would all skip and pass: fail instead)
step triton_tests 240 env TRITON_INTERPRET=0 bash -c '
    "$0" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \"torch.cuda.is_available() is False\")" &&
    "$0" -m pytest -q -rs --durations=15 --junitxml="$1" tests/test_triton_kernels.py' "$PY" "$OUT/triton_tests.xml"

# 5. the benchmark on CUDA
step bench 420 env TRITON_INTERPRET=0 "$PY" -m flowops bench --device cuda --json "$OUT/bench_cuda.json"

# 6. MADE / MAF: the masked_linear Triton kernels compiled on CUDA, then the MADE/MAF bench rows
#    (masked_linear vs the dense-mask reference; MAF sampling vs log_prob and vs the D-pass reference)
step made_tests 150 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs tests/test_masked_linear.py tests/test_made.py
step made_bench 240 env TRITON_INTERPRET=0 "$PY" -m flowops bench --op masked_linear maf --device cuda --no-memory \
    --json "$OUT/bench_made_cuda.json"

# 7. Glow and CNF: actnorm_invconv and mlp_trace (Triton on CUDA) against their references, a fused Glow
#    against the reference-op Glow and reversible against ordinary backprop on CUDA; then their bench rows
step glow_cnf_tests 150 env TRITON_INTERPRET=0 "$PY" -m pytest -q -rs tests/test_cuda_ops.py
step glow_cnf_bench 240 env TRITON_INTERPRET=0 "$PY" -m flowops bench --op actnorm_invconv invconv_inverse glow_step \
    mlp_trace --device cuda --no-compile --json "$OUT/bench_glow_cnf_cuda.json"

log "done in $(( $(date +%s) - START ))s, status $STATUS; logs in $OUT"
exit "$STATUS"
