#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR -- everything a GPU machine should check, in one command.
#
# Run from anywhere; it works in the repository root. Steps, each under its own `timeout` and with a
# fixed cap (the plan is printed first; the caps plus 20 s of overhead add up to GPU_CHECK_BUDGET):
#   wheels     pip install --no-deps --no-index benchmarks/wheels/*.whl (open_clip and what it needs,
#              fetched by `make gpu-wheels` and carried to the offline machine); skipped when none
#   build      MMFAST_CUDA=1 MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e .
#              (an editable install: kernels/ becomes mmfast.triton; CUDA_HOME=/usr/local/cuda if unset)
#   preflight  python3 -m mmfast.info --preflight: GPU visible and sm_80+, mmfast._C built with CUDA
#              for this GPU, every CUDA op registered, every mmfast.triton module imports; one line per
#              problem. If it fails, the run stops there: every later step counts as failed.
#   info       python3 -m mmfast.info --check (every op once per backend against the reference)
#   gpu_tests  MMFAST_GPU_STRICT=1 pytest -m gpu tests/   (a GPU test that skips fails, unless it is
#              marked optional_dep, e.g. the flash-attn one)
#   kernels    the Triton and C++ kernel test files on CUDA tensors (on the CPU they run in the
#              interpreter): tests/*/test_triton_*.py, tests/tome/test_tome_kernels.py, tests/window_attention/test_window_attention_coverage.py,
#              tests/contrastive/test_labels.py (the labelled losses on the Triton tiles)
#   contrastive, siglip
#              python3 -m mmfast.bench <case> --device cuda --out OUTDIR/bench (open_clip comparisons
#              are left out with a note when open_clip is missing)
#
# OUTDIR ends up with at most 8 files, one folder deep (the device tool brings back 8 files of at most
# 16 MiB, two folders deep): gpu_check.log (every step's output), summary.json, and
# bench/<case>.jsonl, .csv and _memory_vs_N_<device>.png for the two cases.
#
# Modes and environment:
#   GPU_CHECK_WARM=1     a rerun on a machine that already built: skip the build step
#   GPU_CHECK_DRY_RUN=1  the rehearsal without a GPU (CI): the run goes on past a failed preflight, the
#                        pytest steps only collect (and report the count), and the bench cases run
#                        tiny CPU shapes so that OUTDIR gets the files a GPU run would write
#   GPU_CHECK_BUDGET     seconds for the whole script (default 540); must cover the plan
#   GPU_CHECK_CAPS       name:seconds,... to override step caps (`--plan` prints the plan and exits)
#   PYTHON               interpreter (default python3); MMFAST_BENCH_IMPL: impl= values for the bench
#                        (default auto); BENCH_ARGS: extra arguments to every bench case
#   GPU_CHECK_SKIP       comma-separated step names not to run (they count as failed, except build
#                        under GPU_CHECK_WARM=1)
#   PYTEST_WORKERS       pytest-xdist workers for the test steps (default 8; 0 = no xdist)
# Exit status: 0 when every step ran and exited 0, else 1 (2 for a usage error or a plan over budget).
set -u

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR | --plan" >&2
    exit 2
fi
PLAN_ONLY=0
if [ "$1" = --plan ]; then
    PLAN_ONLY=1
    set -- "$(mktemp -d)"
fi
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-540}
IMPL=${MMFAST_BENCH_IMPL:-auto}
BENCH_ARGS=${BENCH_ARGS:-}
SKIP=${GPU_CHECK_SKIP:-}
WARM=${GPU_CHECK_WARM:-0}
DRY=${GPU_CHECK_DRY_RUN:-0}
WORKERS=${PYTEST_WORKERS:-8}
LOG="$OUTDIR/gpu_check.log"
BENCH_OUT="$OUTDIR/bench"
mkdir -p "$BENCH_OUT"
: >"$LOG"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1
# On the GPU the kernels must run compiled, never in the interpreter.
[ "$DRY" = 1 ] || unset TRITON_INTERPRET
START=$(date +%s)
STEPS_JSON=""
STOPPED=""

# The plan: step name and cap in seconds, in order. OVERHEAD covers nvidia-smi, the summaries and
# the pauses between steps.
PLAN=(wheels:20 build:170 preflight:20 info:30 gpu_tests:80 kernels:100 contrastive:50 siglip:50)
OVERHEAD=20
# GPU_CHECK_CAPS=name:secs,... overrides caps (CI's 2-core rehearsal builds slower than 16 cores).
IFS=',' read -r -a _caps <<<"${GPU_CHECK_CAPS:-}"
for _c in "${_caps[@]}"; do
    for i in "${!PLAN[@]}"; do
        [ "${PLAN[$i]%%:*}" = "${_c%%:*}" ] && PLAN[i]=$_c
    done
done

note() { echo "$*" | tee -a "$LOG"; }

cap_of() {
    local entry
    for entry in "${PLAN[@]}"; do
        [ "${entry%%:*}" = "$1" ] && echo "${entry##*:}" && return
    done
    echo 0
}

write_summary() {
    "$PY" - "$OUTDIR/summary.json" "$START" "$BUDGET" "$DRY" "$WARM" "$STEPS_JSON" "${PLAN[*]}" "$OVERHEAD" <<'PYEOF' || true
import json, sys, time
path, start, budget, dry, warm, steps, plan, overhead = sys.argv[1:9]
rows = [json.loads(x) for x in steps.split("\n") if x.strip()]
ok = bool(rows) and all(r["rc"] == 0 or r.get("allowed_skip") for r in rows)
summary = {"ok": ok, "dry_run": dry == "1", "warm": warm == "1", "elapsed_s": int(time.time()) - int(start),
           "budget_s": int(budget), "overhead_s": int(overhead), "plan": {p.split(":")[0]: int(p.split(":")[1]) for p in plan.split()},
           "steps": rows, "exit_codes": {r["name"]: r["rc"] for r in rows}}
with open(path, "w") as f:
    json.dump(summary, f, indent=2)
PYEOF
}

record() {  # record NAME RC SECONDS TIMEOUT TIMED_OUT ALLOWED_SKIP
    STEPS_JSON+="{\"name\": \"$1\", \"rc\": $2, \"seconds\": $3, \"timeout_s\": $4, \"timed_out\": $5, \"allowed_skip\": $6}"$'\n'
    write_summary
}

# run_step NAME CMD... : run CMD under timeout (the step's cap, less if the budget is short).
run_step() {
    local name=$1
    shift
    local cap now left t rc t0 secs timed_out=false
    cap=$(cap_of "$name")
    {
        echo
        echo "=================== [$name] $(date -u +%H:%M:%S)"
        echo "\$ $*"
    } | tee -a "$LOG"
    if [ -n "$STOPPED" ]; then
        note "[$name] NOT RUN: $STOPPED (counts as failed)"
        record "$name" '"not run"' 0 0 false false
        return 0
    fi
    if [ "$name" = build ] && [ "$WARM" = 1 ]; then
        note "[$name] skipped: warm rerun (GPU_CHECK_WARM=1)"
        record "$name" '"skipped"' 0 0 false true
        return 0
    fi
    if [[ ",$SKIP," == *",$name,"* ]]; then
        note "[$name] skipped: GPU_CHECK_SKIP=$SKIP (counts as failed)"
        record "$name" '"skipped"' 0 0 false false
        return 0
    fi
    now=$(date +%s)
    left=$((BUDGET - (now - START) - 5))
    t=$cap
    [ "$left" -lt "$t" ] && t=$left
    if [ "$t" -lt 10 ]; then
        note "[$name] NOT RUN: ${left}s left of the ${BUDGET}s budget (counts as failed)"
        record "$name" '"out of budget"' 0 "$t" false false
        return 0
    fi
    note "[$name] timeout ${t}s"
    t0=$(date +%s)
    timeout -k 5 "$t" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    secs=$(($(date +%s) - t0))
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && timed_out=true
    note "[$name] exit code $rc after ${secs}s$([ "$timed_out" = true ] && echo ' (TIMED OUT)')"
    record "$name" "$rc" "$secs" "$t" "$timed_out" false
    return 0
}

last_rc() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['steps'][-1]['rc'])" "$OUTDIR/summary.json"; }

total=$OVERHEAD
for entry in "${PLAN[@]}"; do
    [ "${entry%%:*}" = build ] && [ "$WARM" = 1 ] && continue
    total=$((total + ${entry##*:}))
done
note "gpu_check: repo $REPO, out $OUTDIR, python $(command -v "$PY"), CUDA_HOME=$CUDA_HOME" \
    "$([ "$WARM" = 1 ] && echo '(warm rerun)')$([ "$DRY" = 1 ] && echo '(DRY RUN: no GPU expected)')"
note "plan: ${PLAN[*]} + ${OVERHEAD}s overhead = ${total}s of a ${BUDGET}s budget"
if [ "$total" -gt "$BUDGET" ]; then
    note "gpu_check: the plan (${total}s) does not fit the budget (${BUDGET}s)"
    exit 2
fi
[ "$PLAN_ONLY" = 1 ] && exit 0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true

if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('open_clip') is None)" 2>/dev/null; then
    note "note: open_clip is not installed here: the bench cases run mmfast alone, without the" \
        "open_clip comparison or ratios."
fi

XDIST=()
if [ "$WORKERS" != 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$WORKERS")
fi
COLLECT=()
BENCH_DEV=(--device cuda --impl "$IMPL" --max-time 5)
if [ "$DRY" = 1 ]; then
    COLLECT=(--collect-only)
    XDIST=()
    BENCH_DEV=(--device cpu --quick --sizes 64 --dim 32 --impl "$IMPL")
fi
KERNEL_TESTS=(tests/contrastive/test_triton_contrastive.py tests/window_attention/test_triton_window_attention.py tests/tome/test_tome_kernels.py
    tests/window_attention/test_window_attention_coverage.py tests/contrastive/test_labels.py)

shopt -s nullglob
WHEELS=("$REPO"/benchmarks/wheels/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    run_step wheels "$PY" -m pip install --no-deps --no-index "${WHEELS[@]}"
else
    note "[wheels] none in benchmarks/wheels/ (make gpu-wheels fetches open_clip, ftfy and wcwidth)"
    record wheels '"skipped"' 0 0 false true
fi
run_step build env MAX_JOBS="${MAX_JOBS:-16}" MMFAST_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
run_step preflight "$PY" -m mmfast.info --preflight
if [ "$(last_rc)" != 0 ] && [ "$DRY" != 1 ]; then
    STOPPED="preflight failed"
fi
run_step info "$PY" -m mmfast.info --check
run_step gpu_tests env MMFAST_GPU_STRICT=1 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider "${XDIST[@]}" \
    "${COLLECT[@]}"
run_step kernels "$PY" -m pytest "${KERNEL_TESTS[@]}" -m "not gpu" -q -p no:cacheprovider "${XDIST[@]}" \
    "${COLLECT[@]}"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
run_step contrastive "$PY" -m mmfast.bench contrastive "${BENCH_DEV[@]}" --out "$BENCH_OUT" $BENCH_ARGS
# shellcheck disable=SC2086
run_step siglip "$PY" -m mmfast.bench siglip "${BENCH_DEV[@]}" --out "$BENCH_OUT" $BENCH_ARGS

write_summary
note ""
note "gpu_check done in $(($(date +%s) - START))s of ${BUDGET}s; exit codes:"
"$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['exit_codes']))" \
    "$OUTDIR/summary.json" 2>&1 | tee -a "$LOG"
"$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$OUTDIR/summary.json"
