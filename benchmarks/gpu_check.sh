#!/usr/bin/env bash
# Issue 16's GPU checks in one run (benchmarks/README.md, "gpu_check.sh"): under 8 minutes on an
# H100/H200. Every step has its own timeout and its own log under $OUT; a failed or timed-out step
# is recorded and the next one runs; the summary (also $OUT/summary.txt) comes last.
#
#   OUT=./gpu-out bash benchmarks/gpu_check.sh
#
# Steps (worst case = the sum of the timeouts, 470 s):
#   1. env      (20 s)  nvidia-smi, torch / CUDA / transformers versions
#   2. tests    (90 s)  the tests that need CUDA (skipped on a machine without one)
#   3. ops     (120 s)  benchmarks/op_counts.py --device cuda --sync-debug at batches 1 and 8
#   4. bench   (240 s)  lightkv bench, LLaVA-1.5-7B bf16, batches 1, 8, 32, published schedule vs
#                       uncompressed, with the prefill-time-vs-FLOPs table
#
# Dry run on a CPU (proves the command lines parse; numbers meaningless):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_ARCH=cpu-small GPU_CHECK_DTYPE=float32 GPU_CHECK_BATCHES=1 \
#   GPU_CHECK_OPS_BATCHES=1 GPU_CHECK_OPS_METHODS=lightkv GPU_CHECK_NEW_TOKENS=2 GPU_CHECK_REPEATS=1 \
#   OUT=/tmp/gpu-dry bash benchmarks/gpu_check.sh
set -u

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-./gpu-out}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
ARCH="${GPU_CHECK_ARCH:-llava-1.5-7b}"
DTYPE="${GPU_CHECK_DTYPE:-bfloat16}"
BATCHES="${GPU_CHECK_BATCHES:-1,8,32}"
OPS_BATCHES="${GPU_CHECK_OPS_BATCHES:-1,8}"
OPS_METHODS="${GPU_CHECK_OPS_METHODS:-}"
NEW_TOKENS="${GPU_CHECK_NEW_TOKENS:-32}"
REPEATS="${GPU_CHECK_REPEATS:-3}"
PY="${PYTHON:-python}"
export PY PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" || exit 2

SUMMARY=()
FAILED=0

# step NAME TIMEOUT_S COMMAND...: run with its own timeout, log to $OUT/NAME.log, never abort the script.
step() {
    local name=$1 limit=$2
    shift 2
    local log="$OUT/$name.log" start=$SECONDS rc
    echo "== $name (timeout ${limit}s): $*"
    printf '$ %s\n' "$*" >"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local took=$((SECONDS - start)) state=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        state="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        state="FAILED"
    fi
    [ "$state" = ok ] || FAILED=$((FAILED + 1))
    SUMMARY+=("$(printf '%-6s %-9s rc=%-3s %4ss  %s' "$name" "$state" "$rc" "$took" "$log")")
    tail -n 3 "$log"
}

env_info() {
    nvidia-smi || echo "(no nvidia-smi)"
    "$PY" - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
}
export -f env_info

ops_args=(--device "$DEVICE" --dtype float32 --batches "$OPS_BATCHES" --sync-debug)
[ -n "$OPS_METHODS" ] && ops_args+=(--methods "$OPS_METHODS")

step env 20 bash -c env_info
# The tests that need CUDA: the measurement paths on a device and device resolution (they skip
# without one; -rs lists skips, so a run that did not use the GPU shows it).
step tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/tests-junit.xml" \
    tests/measure/test_measure.py tests/models/test_loader.py -k "cuda or device_and_dtype"
# Counts of aten ops and sync ops per prefill / decode step on the device; --sync-debug makes every
# synchronising CUDA call warn (PYTHONWARNINGS=always: every occurrence, not the first per line).
step ops 120 env PYTHONWARNINGS=always "$PY" benchmarks/op_counts.py "${ops_args[@]}"
step bench 240 "$PY" -c "from lightkv_cli.cli import main; main()" bench --arch "$ARCH" --dtype "$DTYPE" --device "$DEVICE" \
    --batches "$BATCHES" --images-per-prompt 1 --retentions "" --new-tokens "$NEW_TOKENS" \
    --repeats "$REPEATS" --warmup 1 --no-search-batch --profile-batch 8 -o "$OUT/bench"

{
    echo "gpu_check.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ), device=$DEVICE arch=$ARCH dtype=$DTYPE, $FAILED step(s) failed"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "-- tests:"
    grep -E "passed|failed|skipped|error" "$OUT/tests.log" | tail -n 5
    echo "-- ops (prefill/decode aten ops and syncs per method):"
    grep -E '^\| ' "$OUT/ops.log"
    echo "-- sync-debug warnings during op counting: $(grep -c -i 'synchroniz' "$OUT/ops.log")"
    echo "-- bench: prefill time ratio vs FLOPs ratio (published schedule):"
    sed -n '/lightkv-published: prefill time ratio/,/^results:/p' "$OUT/bench.log"
} | tee "$OUT/summary.txt"
[ "$FAILED" -eq 0 ]
