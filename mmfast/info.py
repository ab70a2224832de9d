"""``python -m mmfast.info``: what this install of mmfast can run, and why anything is missing."""

from __future__ import annotations

import platform
import sys

import torch


def report() -> str:
    import mmfast
    from mmfast import _ext

    lines = [
        f"mmfast {mmfast.__version__} at {mmfast.__path__[0]}",
        f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    info = _ext.build_info()
    if info:
        lines.append(
            f"extension mmfast._C: compiler {info['compiler']}; OpenMP {info['openmp']} "
            f"({info['openmp_max_threads']} threads); CPU vector ISA {info['cpu_vector_isa']}; "
            + (f"CUDA sources compiled (CUDA {info['cuda_version']}, archs {info['cuda_archs']})"
               if info["cuda"] else "CUDA sources not compiled")
        )
    lines.append("backends:")
    for name, b in _ext.backends().items():
        mark = "yes" if b["available"] else "no "
        lines.append(f"  {name:<10} {mark}  {b['detail']}")
    from mmfast.ops import registry

    lines.append("ops (backend chosen for CPU / CUDA tensors under impl='auto'):")
    for op in registry.all_ops():
        lines.append(f"  {op.name:<28} cpu -> {op.auto_backend('cpu')}, cuda -> {op.auto_backend('cuda')}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
