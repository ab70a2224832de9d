"""``python -m mmfast.info [--check]``: what this install of mmfast can run, and why anything is
missing. ``--check`` also runs every op once on every backend that can run here (the Triton kernels
through the interpreter, in a subprocess with TRITON_INTERPRET=1, when there is no GPU) and compares
each result with the pure-torch reference."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

import torch


def report() -> str:
    import mmfast
    from mmfast import _ext
    from mmfast.ops import registry

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
    if _ext.triton_status()[0] or torch.cuda.is_available():
        mods = _ext.triton_modules_status()
        lines.append("triton kernel modules: " + ", ".join(
            f"mmfast.triton.{m} {'ok' if err is None else 'FAILED (' + err + ')'}" for m, err in mods.items()))
    lines.append("backends:")
    for name, b in _ext.backends().items():
        mark = "yes" if b["available"] else "no "
        lines.append(f"  {name:<10} {mark}  {b['detail']}")
    lines.append("ops (backend chosen under impl='auto' for CPU / CUDA tensors in this process):")
    for op in registry.all_ops():
        lines.append(f"  {op.name:<28} cpu -> {op.auto_backend('cpu')}, cuda -> {op.auto_backend('cuda')}")
    return "\n".join(lines)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4))


def smoke(backend: str) -> list[tuple[str, bool, str]]:
    """Run each op once with ``backend`` on small fp32 inputs; compare with the reference."""
    import mmfast

    dev = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    out: list[tuple[str, bool, str]] = []

    def run(name, fn):
        try:
            got, want = fn(backend), fn("reference")
            ok = all(_close(x, y) for x, y in zip(got, want))
            out.append((name, ok, "matches the reference" if ok else "DIFFERS from the reference"))
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            out.append((name, False, f"{type(exc).__name__}: {exc}"))

    i, t = (torch.randn(9, 16, generator=g).to(dev) for _ in range(2))
    s = torch.tensor(10.0, device=dev)
    run("clip_loss", lambda b: [mmfast.functional.clip_loss(i, t, s, impl=b)])
    run("siglip_loss", lambda b: [mmfast.functional.siglip_loss(i, t, s, -5.0, impl=b)])
    q, k, v = (torch.randn(2, 7, 5, 2, 8, generator=g).to(dev) for _ in range(3))
    table = torch.randn(25, 2, generator=g).to(dev)
    run("window_attention", lambda b: [mmfast.functional.window_attention(
        q, k, v, window_size=3, shift_size=1, rel_pos_bias=table, impl=b)])
    metric = torch.randn(2, 17, 8, generator=g).to(dev)
    x = torch.randn(2, 17, 8, generator=g).to(dev)

    def tome(b):
        from mmfast.ops import tome as tops

        m, _ = tops.bipartite_soft_matching(metric, 4, class_token=True, impl=b)
        m.impl = b
        return list(tops.merge_wavg(m, x))

    run("tome match + merge_wavg", tome)
    return out


def check() -> int:
    from mmfast import _ext

    failures = 0
    print("smoke test (each op once per backend, against the reference):")
    status = _ext.backends()
    for backend in ("cpp", "cuda", "triton"):
        if backend == "triton" and not status["triton"]["available"] and not torch.cuda.is_available():
            # No GPU: prove the Triton kernels run, through the interpreter, in a fresh process
            # (TRITON_INTERPRET is read when the kernels are defined).
            env = dict(os.environ, TRITON_INTERPRET="1")
            code = ("from mmfast.info import smoke\n"
                    "for n, ok, msg in smoke('triton'): print(('ok  ' if ok else 'FAIL'), n, '-', msg)")
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            for line in res.stdout.splitlines():
                print(f"  triton (interpreter) {line}")
                failures += line.startswith("FAIL")
            if res.returncode:
                print(f"  triton (interpreter) FAILED to run: {res.stderr.strip().splitlines()[-1:]}")
                failures += 1
            continue
        if not status[backend]["available"]:
            print(f"  {backend:<6} skipped: {status[backend]['detail']}")
            continue
        for name, ok, msg in smoke(backend):
            print(f"  {backend:<6} {'ok  ' if ok else 'FAIL'} {name} - {msg}")
            failures += not ok
    return failures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmfast.info", description=__doc__)
    parser.add_argument("--check", action="store_true", help="run every op once on every available backend")
    args = parser.parse_args(argv)
    print(report())
    if args.check:
        sys.exit(1 if check() else 0)


if __name__ == "__main__":
    main()
