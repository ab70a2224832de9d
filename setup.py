"""Build script for mmfast.

Builds ``mmfast._C``: a C++ CPU extension from ``csrc/**/*.cpp`` (OpenMP on), plus the CUDA
sources ``csrc/**/*.cu`` when torch has CUDA and a CUDA toolkit is found. Environment:

  MMFAST_NO_EXT=1            pure-Python install (every op falls back to its reference / Triton)
  MMFAST_CUDA=auto|0|1       compile the .cu sources: auto (default) = when torch.version.cuda is
                             set and a toolkit is found; 1 = required (error if impossible); 0 = never
  CUDA_HOME                  the toolkit; default: /usr/local/cuda, else the parent of nvcc's bin/
  TORCH_CUDA_ARCH_LIST       default "8.0;9.0" when no GPU is visible (torch needs an explicit list)
  MAX_JOBS                   parallel compile jobs (ninja), respected as torch does
  MMFAST_DEBUG=1             -O0 -g
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _find_cuda_home() -> str | None:
    """Locate the real toolkit. torch guesses CUDA_HOME from `which nvcc`; on machines where nvcc is
    a symlink in /usr/local/bin that guess is /usr/local and linking fails (-lcudart not found)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and os.path.exists(os.path.join(env, "bin", "nvcc")):
        return env
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _extensions():
    if _flag("MMFAST_NO_EXT", "0") in ("1", "true", "yes"):
        print("mmfast: MMFAST_NO_EXT set, building a pure-Python package", file=sys.stderr)
        return [], {}
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - build-time message
        raise SystemExit(
            "mmfast: building the extension needs torch installed first "
            "(pip install torch, then pip install --no-build-isolation .), or set MMFAST_NO_EXT=1"
        ) from exc

    want_cuda = _flag("MMFAST_CUDA", "auto")
    if want_cuda not in ("auto", "0", "1"):
        raise SystemExit(f"mmfast: MMFAST_CUDA must be auto, 0 or 1, got {want_cuda!r}")
    cuda_home = _find_cuda_home()
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    use_cuda = False
    why = ""
    if want_cuda == "0":
        why = "MMFAST_CUDA=0"
    elif torch.version.cuda is None:
        why = "torch was built without CUDA"
    elif cuda_home is None:
        why = "no CUDA toolkit found (set CUDA_HOME)"
    elif not cuda_sources:
        why = "no .cu sources"
    else:
        use_cuda = True
    if want_cuda == "1" and not use_cuda:
        raise SystemExit(f"mmfast: MMFAST_CUDA=1 but the CUDA sources cannot be built: {why}")

    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    from torch.utils import cpp_extension

    if use_cuda:
        # cpp_extension resolved CUDA_HOME at import time from PATH; correct it.
        cpp_extension.CUDA_HOME = cuda_home

    debug = _flag("MMFAST_DEBUG", "0") in ("1", "true", "yes")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # One C++ standard for every torch CI builds against: torch 2.14's cpp_extension defaults to
    # C++20 and its headers need it; torch 2.11's defaults to C++17, and its headers (and nvcc 13)
    # compile as C++20 too. cpp_extension adds its default only when no -std= is given, for g++ and
    # for nvcc alike (nvcc rejects two -std flags), so both get it explicitly.
    std = ["-std=c++20"]
    cxx = opt + std + ["-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64") and _flag("MMFAST_CPU_ISA", "avx2") == "avx2":
        # ATen's Vectorized<T> picks its AVX2 implementation (Sleef exp) from these macros.
        # mmfast._ext checks the CPU for AVX2 before loading _C.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    extra = {"cxx": cxx}
    if use_cuda:
        cxx.append("-DMMFAST_WITH_CUDA")
        extra["nvcc"] = opt + std + ["--use_fast_math", "-lineinfo", "-DMMFAST_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            "mmfast._C", sources + cuda_sources, extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "mmfast._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"]
        )
    print(f"mmfast: building _C with {len(sources)} C++ sources"
          + (f" and {len(cuda_sources)} CUDA sources (CUDA_HOME={cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')})" if use_cuda
             else f"; CUDA sources skipped: {why}"), file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
# mmfast.triton is the top-level kernels/ folder (see pyproject's package-dir); list it explicitly.
packages = sorted(set(find_packages(include=["mmfast", "mmfast.*"])) | {"mmfast.triton"})
setup(packages=packages, ext_modules=ext_modules, cmdclass=cmdclass)
