"""Check what a dry run of benchmarks/gpu_check.sh left behind (GPU_CHECK_DRY_RUN=1, no GPU).

    python .ci/check_gpu_dry_run.py OUTDIR --expect-gpu-tests N

Passes when the run finished inside its budget, wrote summary.json, ran every planned step (none
out of budget or timed out), the preflight failed with its one "no GPU" line and nothing else failed,
the GPU tests collected N tests (the count the main stack collects), and OUTDIR stays inside the
device tool's limits: at most 8 files, 16 MiB each, at most two folders deep. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

MAX_FILES, MAX_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2


def problems(outdir: str, expect_gpu_tests: int) -> list[str]:
    bad: list[str] = []
    path = os.path.join(outdir, "summary.json")
    if not os.path.exists(path):
        return [f"{path} was not written"]
    with open(path) as f:
        summary = json.load(f)
    if not summary.get("dry_run"):
        bad.append("summary.json does not say dry_run")
    plan = summary["plan"]
    overhead = summary["overhead_s"]  # what the script reserves besides its steps
    if sum(plan.values()) + overhead > summary["budget_s"]:
        bad.append(f"step caps {plan} + {overhead}s exceed the budget {summary['budget_s']}s")
    if summary["elapsed_s"] > summary["budget_s"]:
        bad.append(f"took {summary['elapsed_s']}s, over the {summary['budget_s']}s budget")
    steps = {s["name"]: s for s in summary["steps"]}
    if list(steps) != list(plan):
        bad.append(f"steps run {list(steps)} are not the plan {list(plan)}")
    for name, s in steps.items():
        if s.get("timed_out"):
            bad.append(f"step {name} timed out after {s['seconds']}s")
        if name == "preflight":
            if s["rc"] != 1:
                bad.append(f"preflight exited {s['rc']} without a GPU (expected 1)")
        elif s["rc"] != 0 and not s.get("allowed_skip"):
            bad.append(f"step {name} ended with {s['rc']!r}")
    with open(os.path.join(outdir, "gpu_check.log")) as f:
        log = f.read()
    if "preflight: CUDA: no GPU visible" not in log:
        bad.append("the preflight did not print its 'no GPU visible' line")
    if "Traceback" in log.split("[preflight]")[1].split("[info]")[0]:
        bad.append("the preflight printed a traceback")
    section = log.split("[gpu_tests] timeout")[1].split("[gpu_tests] exit code")[0]
    m = re.search(r"(\d+)/\d+ tests collected", section)
    got = int(m.group(1)) if m else None
    if got != expect_gpu_tests:
        bad.append(f"pytest -m gpu collected {got} tests on this stack, the main stack {expect_gpu_tests}")
    if "error" in section.lower():
        bad.append("pytest -m gpu collection reported errors")
    files = []
    for root, _, names in os.walk(outdir):
        for n in names:
            files.append(os.path.relpath(os.path.join(root, n), outdir))
    if len(files) > MAX_FILES:
        bad.append(f"{len(files)} files in OUTDIR (the device tool brings back {MAX_FILES}): {sorted(files)}")
    for rel in files:
        size = os.path.getsize(os.path.join(outdir, rel))
        if size > MAX_BYTES:
            bad.append(f"{rel} is {size} bytes (limit {MAX_BYTES})")
        if rel.count(os.sep) > MAX_DEPTH:
            bad.append(f"{rel} is more than {MAX_DEPTH} folders deep")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir")
    parser.add_argument("--expect-gpu-tests", type=int, required=True)
    args = parser.parse_args()
    bad = problems(args.outdir, args.expect_gpu_tests)
    for line in bad:
        print(f"gpu_check dry run: {line}")
    if bad:
        sys.exit(1)
    with open(os.path.join(args.outdir, "summary.json")) as f:
        summary = json.load(f)
    print(f"gpu_check dry run ok: {len(summary['steps'])} steps in {summary['elapsed_s']}s of "
          f"{summary['budget_s']}s, {args.expect_gpu_tests} GPU tests collected")


if __name__ == "__main__":
    main()
