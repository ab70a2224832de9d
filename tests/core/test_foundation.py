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
    from mmfast.ops.contrastive import TileInputs

    spec = registry.get("contrastive_softmax")
    x = TileInputs(torch.zeros(1, 1), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="impl must be one of"):
        spec.select(x, "nope")
    with pytest.raises(ValueError, match="no mmfast op named 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        with mmfast.use_backend("fast"):
            pass
    with mmfast.use_backend("reference"):
        assert spec.select(x) == "reference"
        assert spec.select(x, use_context=False) == spec.auto_backend("cpu")
        # an explicit impl= wins over the context
        if _ext.has_cpp():
            assert spec.select(x, "cpp") == "cpp"
    with mmfast.use_backend("reference", ops=["window_attention"]):
        assert spec.select(x) == spec.auto_backend("cpu")
    assert spec.select(x, "auto") == spec.select(x, None) == spec.auto_backend("cpu")


def test_backend_table_is_data_and_errors_show_inputs_and_reasons():
    """An op is a table: each entry says how to run it and what it takes; a forced backend that
    cannot take the inputs raises an error showing them and every backend's reasons."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Two(registry.Inputs):
        x: torch.Tensor
        flag: bool

    def only_fp64(inp):
        return [] if inp.x.dtype == torch.float64 else [f"takes float64, not {inp.x.dtype}"]

    spec = registry.OpSpec("test_table_op", {
        "cpp": registry.Backend(lambda x: x + 1, lambda g: g, only_fp64),
        "reference": registry.Backend(lambda x: x + 1),
    })
    x32, x64 = Two(torch.zeros(2, 3), True), Two(torch.zeros(2, 3, dtype=torch.float64), False)
    assert x32.device == torch.device("cpu")
    assert x32.describe() == "x=float32[2, 3] on cpu, flag=True"
    assert spec.reasons("cpp", x32) == ([_ext.backends()["cpp"]["detail"]] if not _ext.has_cpp()
                                        else ["takes float64, not torch.float32"])
    assert spec.reasons("triton", x32) == ["test_table_op has no triton backend"]
    if _ext.has_cpp():
        assert spec.select(x64) == "cpp"
        with pytest.raises(RuntimeError, match=r"^test_table_op: impl='cpp' cannot run these inputs\. "
                                               r"inputs: x=float32\[2, 3\] on cpu, flag=True; backends: "
                                               r"cpp: takes float64, not torch\.float32 \| reference: can run$"):
            spec.select(x32, "cpp")
    assert spec.select(x32) == "reference"  # a check that fails passes the backend over, no error
    with pytest.raises(ValueError, match=r"impl='triton' is not a backend of this op \(it has cpp, reference\)"):
        spec.select(x32, "triton")
    with pytest.raises(ValueError, match="test_table_op has no cuda backend"):
        spec.backend("cuda")
    with pytest.raises(ValueError, match="needs a reference backend"):
        registry.OpSpec("no_ref", {"cpp": registry.Backend(lambda x: x)})
    with pytest.raises(ValueError, match="backend name must be one of"):
        registry.OpSpec("bad_name", {"fast": registry.Backend(lambda x: x), "reference": registry.Backend(lambda x: x)})
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.OpSpec("window_attention", {"reference": registry.Backend(lambda x: x)}))
    with pytest.raises(TypeError, match="holds no tensor"):
        _ = Two(1, True).device


def test_reference_fallback_warns_only_when_a_backend_is_missing():
    """The one-time warning says the install lacks a kernel; a backend passed over because of the
    inputs (e.g. a gradient the kernel cannot give) is not worth a warning."""
    import warnings
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class One(registry.Inputs):
        x: torch.Tensor

    spec = registry.OpSpec("test_warn_op", {
        "cpp": registry.Backend(lambda x: x, check=lambda inp: ["never"]),
        "reference": registry.Backend(lambda x: x),
    })
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if _ext.has_cpp():
            assert spec.select(One(torch.zeros(1))) == "reference"  # cpp is there, its check said no
    if not _ext.has_cpp():
        with pytest.warns(RuntimeWarning, match="test_warn_op runs the pure-torch reference on cpu"):
            spec.select(One(torch.zeros(1)))


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
