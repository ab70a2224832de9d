"""The GPU rehearsal's own machinery, on the CPU: ``mmfast.info --preflight``, the strict mode of
the GPU tests (MMFAST_GPU_STRICT=1), ``benchmarks/gpu_check.sh --plan`` and the dry-run checker
that CI runs on the GPU machine's stack (.ci/gpu_stack)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmfast import _ext
from mmfast.info import _runs_on

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU reports")


def _run(args, **env):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **env})


@needs_no_gpu
def test_preflight_stops_without_a_gpu_with_one_line_per_problem():
    res = _run([sys.executable, "-m", "mmfast.info", "--preflight"], TRITON_INTERPRET="1")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("python ") and "torch" in lines[0] and "triton" in lines[0]
    problems = [ln for ln in lines if ln.startswith("preflight: ") and not ln.endswith("stop")]
    assert any("CUDA: no GPU visible" in ln for ln in problems)
    assert any("TRITON_INTERPRET=1 is set" in ln for ln in problems)
    assert lines[-1] == f"preflight: {len(problems)} problem(s), stop"
    assert "Traceback" not in res.stdout + res.stderr


def test_cuda_arch_compatibility():
    assert _runs_on("800,900", (9, 0)) and _runs_on("800,900", (8, 6))
    assert not _runs_on("800,900", (10, 0)) and not _runs_on("900", (8, 0)) and not _runs_on("", (9, 0))
    assert _runs_on("unknown", (9, 0))  # an unreadable list never blocks a run


def test_triton_interpreter_problem_names_the_versions(monkeypatch):
    triton = pytest.importorskip("triton")
    import numpy

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    why = _ext._interpreter_problem()
    assert why is not None and "3.6.0" in why and "2.4.1" in why and "numpy<2.4" in why
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert _ext._interpreter_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert _ext._interpreter_problem() is None


STRICT_TESTS = '''
import pytest

@pytest.mark.gpu
def test_needs_gpu():
    pass

@pytest.mark.gpu
def test_skips_inside():
    pytest.skip("no kernel module")

@pytest.mark.gpu
@pytest.mark.optional_dep("flash_attn")
def test_optional():
    pytest.skip("flash-attn is not installed")

def test_cpu_skip():
    pytest.skip("not a GPU test: may skip")
'''


@needs_no_gpu
@pytest.mark.parametrize("strict", ["0", "1"])
def test_strict_mode_turns_gpu_skips_into_failures(tmp_path, strict):
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_strict.py").write_text(STRICT_TESTS)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "MMFAST_GPU_STRICT": strict})
    out = res.stdout
    if strict == "0":
        assert res.returncode == 0 and "4 skipped" in out, out
        return
    # the two plain GPU tests count as errors (skipped at setup here: no GPU); the test that declares
    # an optional dependency and the CPU test still skip
    assert res.returncode == 1 and "2 skipped, 2 errors" in out, out
    assert "ERROR test_strict.py::test_needs_gpu - MMFAST_GPU_STRICT=1" in out
    assert "ERROR test_strict.py::test_skips_inside - MMFAST_GPU_STRICT=1" in out
    assert "ERROR test_strict.py::test_optional" not in out and "not a GPU test: may skip" in out


GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_gpu_check_plan_fits_nine_minutes():
    res = _run(["bash", GPU_CHECK, "--plan"])
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("plan:"))
    total, budget = (int(x) for x in line.split("=")[1].replace("s of a", "").replace("s budget", "").split())
    assert total <= budget <= 540
    over = _run(["bash", GPU_CHECK, "--plan"], GPU_CHECK_CAPS="build:480")
    assert over.returncode == 2 and "does not fit the budget" in over.stdout


def _fake_dry_run(tmp_path, **change):
    """An OUTDIR as a passing dry run leaves it, with ``change`` applied to summary.json."""
    plan = {"wheels": 20, "build": 170, "preflight": 20, "info": 30, "gpu_tests": 80, "kernels": 100,
            "contrastive": 50, "siglip": 50}
    steps = [{"name": n, "rc": 1 if n == "preflight" else 0, "seconds": 1, "timeout_s": c, "timed_out": False,
              "allowed_skip": False} for n, c in plan.items()]
    summary = {"ok": False, "dry_run": True, "elapsed_s": 100, "budget_s": 540, "overhead_s": 20, "plan": plan,
               "steps": steps}
    tmp_path.mkdir(parents=True)
    summary.update(change)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "gpu_check.log").write_text(
        "[preflight] timeout 20s\npreflight: CUDA: no GPU visible to torch\n[preflight] exit code 1\n[info] timeout\n"
        "[gpu_tests] timeout 80s\n41/875 tests collected (834 deselected) in 5.80s\n[gpu_tests] exit code 0\n")
    (tmp_path / "bench").mkdir()
    for i in range(6):
        (tmp_path / "bench" / f"f{i}.csv").write_text("x")
    return tmp_path


def _check(outdir, expect=41):
    return _run([sys.executable, os.path.join(ROOT, ".ci", "check_gpu_dry_run.py"), str(outdir),
                 "--expect-gpu-tests", str(expect)])


def test_dry_run_checker_passes_a_good_run_and_names_each_problem(tmp_path):
    good = _fake_dry_run(tmp_path / "good")
    assert _check(good).returncode == 0, _check(good).stdout
    assert "41 GPU tests collected" in _check(good).stdout
    res = _check(good, expect=43)
    assert res.returncode == 1 and "collected 41 tests on this stack, the main stack 43" in res.stdout
    (good / "bench" / "extra.png").write_text("x")
    res = _check(good)
    assert res.returncode == 1 and "9 files in OUTDIR" in res.stdout
    slow = _fake_dry_run(tmp_path / "slow", elapsed_s=600)
    assert "over the 540s budget" in _check(slow).stdout
    broken = _fake_dry_run(tmp_path / "broken")
    s = json.loads((broken / "summary.json").read_text())
    s["steps"][-1]["rc"] = "out of budget"
    s["steps"][3]["timed_out"] = True
    (broken / "summary.json").write_text(json.dumps(s))
    out = _check(broken).stdout
    assert "step siglip ended with 'out of budget'" in out and "step info timed out" in out
