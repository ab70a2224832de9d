#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR -- everything a GPU machine should check, in one command.
#
# Run from anywhere; it works in the repository root. Steps (each under its own `timeout`, none
# aborting the others; every exit code lands in OUTDIR/summary.json, rewritten after each step):
#   wheels   pip install --no-deps --no-index benchmarks/wheels/*.whl (open_clip for an offline box)
#   build    MAX_JOBS=16 MMFAST_CUDA=1 python setup.py build_ext --inplace   (CUDA_HOME=/usr/local/cuda if unset)
#   info     python -m mmfast.info
#   pytest   pytest -m gpu tests/ -q
#   contrastive, siglip
#            python -m mmfast.bench <case> --device cuda --out OUTDIR/bench   (the cases' GPU shapes;
#            open_clip comparisons are skipped with a note when open_clip is missing)
#   pytest_bench (only with GPU_CHECK_PYTEST_BENCH=1)  pytest benchmarks/ --benchmark-only
#
# OUTDIR ends up with at most 8 files (the device tool brings back 8): gpu_check.log (every step's
# output, with headers), summary.json, and bench/<case>.jsonl, .csv and _memory_vs_N_cuda.png.
#
# Time: the whole script stops well inside 10 minutes. GPU_CHECK_BUDGET (seconds, default 480) is the
# total; each step gets min(its own cap, what is left minus 15 s per later step), and a step with under
# 10 s left is skipped (exit code "skipped"). Environment: PYTHON (default python), MMFAST_BENCH_IMPL
# (mmfast impl= values for the bench, default auto), BENCH_ARGS (extra arguments to every bench case,
# e.g. "--quick"), GPU_CHECK_SKIP (comma-separated step names not to run, e.g. "build,pytest").
# Exit status: 0 when every step that ran exited 0, else 1 (2 for a usage error).
set -u

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET:-480}
IMPL=${MMFAST_BENCH_IMPL:-auto}
BENCH_ARGS=${BENCH_ARGS:-}
SKIP=${GPU_CHECK_SKIP:-}
LOG="$OUTDIR/gpu_check.log"
BENCH_OUT="$OUTDIR/bench"
mkdir -p "$BENCH_OUT"
: >"$LOG"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
START=$(date +%s)
STEPS_JSON=""

note() { echo "$*" | tee -a "$LOG"; }

write_summary() {
    "$PY" - "$OUTDIR/summary.json" "$START" "$BUDGET" "$STEPS_JSON" <<'PYEOF' || true
import json, sys, time
path, start, budget, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = [json.loads(x) for x in steps.split("\n") if x.strip()]
ok = all(r["rc"] == 0 for r in rows if r["rc"] != "skipped")
summary = {"ok": ok, "elapsed_s": int(time.time()) - start, "budget_s": budget, "steps": rows,
           "exit_codes": {r["name"]: r["rc"] for r in rows}}
with open(path, "w") as f:
    json.dump(summary, f, indent=2)
PYEOF
}

# run_step NAME CAP LATER_STEPS CMD... : run CMD under timeout, log it, record its exit code.
run_step() {
    local name=$1 cap=$2 later=$3
    shift 3
    local now left t rc t0 secs
    now=$(date +%s)
    left=$((BUDGET - (now - START) - 15 * later))
    t=$cap
    [ "$left" -lt "$t" ] && t=$left
    {
        echo
        echo "=================== [$name] $(date -u +%H:%M:%S)"
        echo "\$ $*"
    } | tee -a "$LOG"
    if [[ ",$SKIP," == *",$name,"* ]]; then
        note "[$name] skipped: GPU_CHECK_SKIP=$SKIP"
        STEPS_JSON+="{\"name\": \"$name\", \"rc\": \"skipped\", \"seconds\": 0, \"timeout_s\": 0}"$'\n'
        write_summary
        return 0
    fi
    if [ "$t" -lt 10 ]; then
        note "[$name] skipped: ${left}s left of the ${BUDGET}s budget"
        STEPS_JSON+="{\"name\": \"$name\", \"rc\": \"skipped\", \"seconds\": 0, \"timeout_s\": $t}"$'\n'
        write_summary
        return 0
    fi
    note "[$name] timeout ${t}s"
    t0=$(date +%s)
    timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - t0))
    local timed_out=false
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && timed_out=true
    note "[$name] exit code $rc after ${secs}s$([ "$timed_out" = true ] && echo ' (TIMED OUT)')"
    STEPS_JSON+="{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"timeout_s\": $t, \"timed_out\": $timed_out}"$'\n'
    write_summary
    return 0
}

note "gpu_check: repo $REPO, out $OUTDIR, budget ${BUDGET}s, python $(command -v "$PY"), CUDA_HOME=$CUDA_HOME"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true

shopt -s nullglob
WHEELS=("$REPO"/benchmarks/wheels/*.whl)
shopt -u nullglob
LATER=5
if [ ${#WHEELS[@]} -gt 0 ]; then
    run_step wheels 60 $LATER "$PY" -m pip install --no-deps --no-index "${WHEELS[@]}"
else
    note "[wheels] none in benchmarks/wheels/"
fi

if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('open_clip') is None)" 2>/dev/null; then
    note "note: open_clip is not installed here (no wheel in benchmarks/wheels/): the bench cases run mmfast" \
        "alone, without the open_clip comparison or ratios."
fi

run_step build 240 4 env MAX_JOBS=16 MMFAST_CUDA=1 "$PY" setup.py build_ext --inplace
run_step info 30 3 "$PY" -m mmfast.info
run_step pytest 150 2 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
run_step contrastive 90 1 "$PY" -m mmfast.bench contrastive --device cuda --out "$BENCH_OUT" \
    --impl "$IMPL" --max-time 5 $BENCH_ARGS
# shellcheck disable=SC2086
run_step siglip 90 0 "$PY" -m mmfast.bench siglip --device cuda --out "$BENCH_OUT" \
    --impl "$IMPL" --max-time 5 $BENCH_ARGS
if [ "${GPU_CHECK_PYTEST_BENCH:-0}" = 1 ]; then
    run_step pytest_bench 90 0 "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$BENCH_OUT/pytest_benchmark.json"
fi

write_summary
note ""
note "gpu_check done in $(($(date +%s) - START))s; exit codes:"
"$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['exit_codes']))" \
    "$OUTDIR/summary.json" 2>&1 | tee -a "$LOG"
"$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$OUTDIR/summary.json"
