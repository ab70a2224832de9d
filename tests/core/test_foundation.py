"""Packaging, extension loading, backend report and dispatch rules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast import _ext
from mmfast.ops import registry


def _run(code: str, cwd: str | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_backends_report_shape():
    b = mmfast.backends()
    assert set(b) == {"cpp", "cuda", "triton", "flash_attn", "reference"}
    assert all(set(v) == {"available", "detail"} and v["detail"] for v in b.values())
    assert b["reference"]["available"]


@pytest.mark.skipif(not _ext.has_cpp(), reason="C++ extension not built")
def test_info_check_runs_every_backend():
    res = subprocess.run([sys.executable, "-m", "mmfast.info", "--check"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "extension mmfast._C" in res.stdout
    for op in ("clip_loss", "siglip_loss", "window_attention", "tome match"):
        assert f"cpp    ok   {op}" in res.stdout
        assert any(line.startswith("  triton") and f"ok   {op}" in line for line in res.stdout.splitlines())
    assert "cpp    ok   window_process + reverse" in res.stdout
    # window_process has a C++ and a CUDA kernel only: Triton lists it as such, not as a failure
    assert any(line.startswith("  triton") and "--   window_process + reverse - no kernel" in line
               for line in res.stdout.splitlines()), res.stdout
    assert "FAIL" not in res.stdout


def test_import_without_extension_falls_back_with_one_warning():
    code = (
        "import warnings, torch, mmfast\n"
        "assert not mmfast.backends()['cpp']['available']\n"
        "print(mmfast.backends()['cpp']['detail'])\n"
        "i, t = torch.randn(5, 8), torch.randn(5, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = mmfast.ClipLoss()(i, t, torch.tensor(3.0))\n"
        "    b = mmfast.ClipLoss()(i, t, torch.tensor(3.0))\n"
        "msgs = [str(x.message) for x in w if 'reference' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "from mmfast.reference.contrastive import clip_loss\n"
        "assert torch.allclose(a, clip_loss(i, t, i, t, torch.tensor(3.0)))  # the same loss open_clip computes\n"
        "print('ok')\n"
    )
    res = _run(code, MMFAST_DISABLE_EXT="1")
    assert res.returncode == 0, res.stderr
    assert "disabled by MMFAST_DISABLE_EXT=1" in res.stdout and "ok" in res.stdout


def test_forced_backend_errors_and_context():
    spec = registry.get("contrastive_softmax_fwd")
    with pytest.raises(ValueError, match="impl must be one of"):
        spec.select(torch.device("cpu"), "nope", torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="backend must be one of"):
        with mmfast.use_backend("fast"):
            pass
    with mmfast.use_backend("reference"):
        assert spec.select(torch.device("cpu"), None, torch.zeros(1, 1), torch.zeros(1, 1)) == "reference"
        # an explicit impl= wins over the context
        if _ext.has_cpp():
            assert spec.select(torch.device("cpu"), "cpp", torch.zeros(1, 1), torch.zeros(1, 1)) == "cpp"
    with mmfast.use_backend("reference", ops=["window_attention"]):
        assert spec.select(torch.device("cpu"), None, torch.zeros(1, 1), torch.zeros(1, 1)) == spec.auto_backend("cpu")


def test_triton_package_is_inside_the_namespace(tmp_path):
    # run outside the source tree, where only the installed package is visible
    res = _run("import mmfast.triton.contrastive, mmfast.triton.window_attention, mmfast.triton.tome; print('ok')",
               cwd=str(tmp_path))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    res = _run("import kernels", cwd=str(tmp_path))
    assert res.returncode != 0  # never a top-level `kernels` package


def test_pure_python_wheel_carries_the_triton_package(tmp_path):
    # MMFAST_NO_EXT=1: no compiled extension, but mmfast.triton (the top-level kernels/ folder) is in.
    import glob
    import zipfile

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path), repo], env=dict(os.environ, MMFAST_NO_EXT="1"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    (whl,) = glob.glob(str(tmp_path / "mmfast-*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    assert {"mmfast/triton/__init__.py", "mmfast/triton/contrastive.py", "mmfast/triton/window_attention.py",
            "mmfast/triton/tome.py"} <= set(names)
    assert not any(n.endswith(".so") for n in names) and not any(n.startswith("kernels/") for n in names)


def test_source_tree_built_in_place_finds_the_triton_package():
    # `setup.py build_ext --inplace` (gpu_check.sh's old build) leaves no kernels/ -> mmfast.triton
    # mapping: mmfast must register the tree's kernels/ itself, so the Triton backends stay reachable
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()\n"
        "                    and 'editable' not in getattr(f, '__name__', '').lower()]\n"
        f"sys.path.insert(0, {repo!r})\n"
        "import importlib.util\n"
        "import mmfast\n"
        "from mmfast import _ext\n"
        f"assert mmfast.__file__.startswith({repo!r}), mmfast.__file__\n"
        "ok, how = _ext.triton_status()\n"
        "assert ok, how\n"
        "import mmfast.triton.contrastive as tk\n"
        f"assert tk.__file__.startswith({os.path.join(repo, 'kernels')!r}), tk.__file__\n"
        "assert all(v is None for v in _ext.triton_modules_status().values()), _ext.triton_modules_status()\n"
        "import torch\n"
        "i, t = torch.randn(5, 8), torch.randn(5, 8)\n"
        "a = mmfast.functional.clip_loss(i, t, torch.tensor(3.0), impl='triton')\n"
        "b = mmfast.functional.clip_loss(i, t, torch.tensor(3.0), impl='reference')\n"
        "assert torch.allclose(a, b, atol=1e-5), (a, b)\n"
        "print('ok')\n"
    )
    res = _run(code, cwd=repo, TRITON_INTERPRET="1")
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_missing_triton_package_is_a_reason_not_a_crash():
    # no mmfast.triton at all (an install without it): triton is unavailable, with the reason, and a
    # forced triton call raises a clear error instead of ModuleNotFoundError from deep inside dispatch
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n.startswith('mmfast.triton') else real(n, *a)\n"
        "import torch, mmfast\n"
        "from mmfast import _ext\n"
        "ok, how = _ext.triton_status()  # as dispatch saw it at import\n"
        "assert not ok and 'mmfast.triton lacks contrastive, tome, window_attention' in how, how\n"
        "i, t = torch.randn(5, 8), torch.randn(5, 8)\n"
        "try:\n"
        "    mmfast.functional.clip_loss(i, t, torch.tensor(3.0), impl='triton')\n"
        "except Exception as exc:\n"
        "    assert 'triton' in str(exc) and 'mmfast.triton lacks' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('a forced triton call ran without its kernels')\n"
        "_ext._source_kernels_dir = lambda: None  # and an install without the source tree\n"
        "sys.modules.pop('mmfast.triton', None)\n"
        "_ext.ensure_triton_package.cache_clear(); _ext.triton_status.cache_clear()\n"
        "ok, how = _ext.triton_status()\n"
        "assert not ok and 'mmfast.triton is not installed' in how, how\n"
        "assert all('not installed' in v for v in _ext.triton_modules_status().values())\n"
        "print('ok')\n"
    )
    res = _run(code, TRITON_INTERPRET="1")
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
