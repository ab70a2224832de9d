"""Loading of the compiled extension, and the report of what this install can run.

Nothing here raises at import time: a missing or unloadable ``mmfast._C`` or a missing GPU only
makes the corresponding backends unavailable, with the reason recorded for ``mmfast.backends()``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform
from typing import Any

import torch

_C: Any = None
_C_ERROR: str | None = None


def _cpu_supports_build() -> str | None:
    """The x86 build is compiled with AVX2+FMA; refuse to load it on a CPU without them."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):
        return None
    return f"this CPU lacks AVX2 (torch reports {cap}); rebuild with MMFAST_CPU_ISA=generic"


def _load() -> None:
    global _C, _C_ERROR
    if os.environ.get("MMFAST_DISABLE_EXT", "0") == "1":
        _C_ERROR = "disabled by MMFAST_DISABLE_EXT=1"
        return
    if importlib.util.find_spec("mmfast._C") is None:
        _C_ERROR = "mmfast._C is not built (pure-Python install, or MMFAST_NO_EXT=1 at build time)"
        return
    reason = _cpu_supports_build()
    if reason:
        _C_ERROR = reason
        return
    try:
        _C = importlib.import_module("mmfast._C")
    except Exception as exc:  # noqa: BLE001 - any load failure degrades to the fallbacks
        _C_ERROR = f"mmfast._C failed to load: {type(exc).__name__}: {exc}"


_load()


def has_cpp() -> bool:
    return _C is not None


#: The Triton kernel modules of ``mmfast.triton`` (the ``kernels/`` folder of the source tree).
TRITON_MODULES = ("contrastive", "tome", "window_attention")


def _source_kernels_dir() -> str | None:
    """``kernels/`` beside the package when mmfast runs from a source tree (``pyproject.toml`` there)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kdir = os.path.join(root, "kernels")
    if os.path.isfile(os.path.join(kdir, "__init__.py")) and os.path.isfile(os.path.join(root, "pyproject.toml")):
        return kdir
    return None


@functools.cache
def ensure_triton_package() -> str | None:
    """Make ``mmfast.triton`` importable; None when it is, else why not.

    An installed or editable-installed mmfast maps ``kernels/`` to ``mmfast.triton`` (pyproject).
    A source tree that was only built in place (``setup.py build_ext --inplace``) has no such
    mapping: then the package is registered from the tree's ``kernels/`` folder, so that the Triton
    backends work the same way there."""
    if importlib.util.find_spec("mmfast.triton") is not None:
        return None
    kdir = _source_kernels_dir()
    if kdir is None:
        return "mmfast.triton is not installed (install mmfast with pip; kernels/ maps to mmfast.triton)"
    import sys

    spec = importlib.util.spec_from_file_location("mmfast.triton", os.path.join(kdir, "__init__.py"),
                                                  submodule_search_locations=[kdir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mmfast.triton"] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:  # noqa: BLE001 - reported, never raised at import
        del sys.modules["mmfast.triton"]
        return f"mmfast.triton (from {kdir}) failed to import: {type(exc).__name__}: {exc}"
    return None  # the attribute mmfast.triton comes from the package's __getattr__


def triton_modules_status() -> dict[str, str | None]:
    """Import every ``mmfast.triton`` module: ``{name: None}`` when it imports, else the error. This
    imports triton itself (seconds on a cold start): for ``mmfast.info`` and preflight checks, not for
    dispatch."""
    why = ensure_triton_package()
    out: dict[str, str | None] = {}
    for name in TRITON_MODULES:
        if why:
            out[name] = why
            continue
        try:
            importlib.import_module(f"mmfast.triton.{name}")
            out[name] = None
        except Exception as exc:  # noqa: BLE001 - reported
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _interpreter_problem() -> str | None:
    """Triton 3.6's interpreter breaks under numpy >= 2.4: a loop bound computed from
    ``tl.program_id`` is a 1-element array, and numpy 2.4 no longer converts those to Python ints."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter fails with numpy {numpy.__version__} ('only "
                "0-dimensional arrays can be converted to Python scalars'): install numpy<2.4, or triton "
                ">= 3.8 (works with numpy 2.4)")
    return None


@functools.cache
def triton_status() -> tuple[bool, str]:
    """(usable, how): Triton on a GPU, or the interpreter on CPU tensors (TRITON_INTERPRET=1). The
    kernel modules must be findable (they are imported only when a kernel is first wanted)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    why = ensure_triton_package()
    if why:
        return False, why
    missing = [m for m in TRITON_MODULES if importlib.util.find_spec(f"mmfast.triton.{m}") is None]
    if missing:
        return False, f"mmfast.triton lacks {', '.join(missing)} (a stale install? reinstall mmfast)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        why = _interpreter_problem()
        if why:
            return False, why
        return True, "interpreter (TRITON_INTERPRET=1): runs on CPU tensors, slow, for testing"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 0):
            return False, (f"GPU {torch.cuda.get_device_name()} is sm_{major}{minor}: mmfast's Triton "
                           "kernels need sm_80 or newer")
        return True, f"GPU: {torch.cuda.get_device_name()}"
    return False, "no CUDA GPU visible (set TRITON_INTERPRET=1 to run kernels in the interpreter)"


def flash_attn_status() -> tuple[bool, str]:
    """(usable, detail) of the optional ``flash_attn`` package (the ``flash_attn`` backend of window
    attention): usable when ``import flash_attn`` works and it has ``flash_attn_func``; detail is its
    version, or the import error. Not cached: a later install (or a test's stand-in module in
    ``sys.modules``) is seen; the registry reads it once at import, like every backend."""
    try:
        mod = importlib.import_module("flash_attn")
    except Exception as exc:  # noqa: BLE001 - any failure to import is "not available", with the reason
        if isinstance(exc, ModuleNotFoundError) and exc.name == "flash_attn":
            return False, f"flash_attn is not installed (optional extra; {type(exc).__name__}: {exc})"
        return False, f"flash_attn failed to import ({type(exc).__name__}: {exc})"
    if not callable(getattr(mod, "flash_attn_func", None)):
        return False, f"flash_attn {getattr(mod, '__version__', '?')} has no flash_attn_func"
    return True, f"flash_attn {getattr(mod, '__version__', '(version unknown)')}"


def build_info() -> dict[str, Any]:
    return dict(_C.build_info()) if _C is not None else {}


def backends() -> dict[str, dict[str, Any]]:
    """What this install can run, and why anything is missing.

    Returns ``{name: {"available": bool, "detail": str}}`` for ``cpp`` (the C++ CPU kernels),
    ``cuda`` (the compiled CUDA kernels, which also need a GPU), ``triton``, ``flash_attn`` (the
    optional flash-attn package, used by window attention only; see
    :mod:`mmfast.ops.window_attention`) and ``reference``.
    """
    out: dict[str, dict[str, Any]] = {}
    info = build_info()
    if _C is not None:
        out["cpp"] = {
            "available": True,
            "detail": f"{info.get('compiler')}, OpenMP threads {info.get('openmp_max_threads')}, "
            f"vector ISA {info.get('cpu_vector_isa')}",
        }
    else:
        out["cpp"] = {"available": False, "detail": _C_ERROR or "not built"}
    if _C is None:
        out["cuda"] = {"available": False, "detail": _C_ERROR or "not built"}
    elif not info.get("cuda"):
        out["cuda"] = {"available": False, "detail": "CUDA sources were not compiled into this build"}
    elif not torch.cuda.is_available():
        out["cuda"] = {
            "available": False,
            "detail": f"compiled (CUDA {info.get('cuda_version')}, archs {info.get('cuda_archs')}) "
            "but no CUDA GPU is visible",
        }
    else:
        out["cuda"] = {
            "available": True,
            "detail": f"CUDA {info.get('cuda_version')}, archs {info.get('cuda_archs')}, "
            f"GPU {torch.cuda.get_device_name()}",
        }
    ok, how = triton_status()
    out["triton"] = {"available": ok, "detail": how}
    ok, how = flash_attn_status()
    out["flash_attn"] = {"available": ok, "detail": how}
    out["reference"] = {"available": True, "detail": "pure PyTorch, any device"}
    return out
