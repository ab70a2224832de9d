"""``python -m mmfast.info [--check]``: what this install of mmfast can run, and why anything is
missing. ``--check`` also runs every op once on every backend that can run here (the Triton kernels
through the interpreter, in a subprocess with TRITON_INTERPRET=1, when there is no GPU) and compares
each result with the pure-torch reference; an op with no kernel for a backend is listed as such, not
as a failure. ``--preflight`` checks, in seconds and one line per problem, that a GPU run can start
(benchmarks/gpu_check.sh runs it before anything else)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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


def smoke(backend: str) -> list[tuple[str, bool | None, str]]:
    """Run each op once with ``backend`` on small fp32 inputs; compare with the reference.

    Each row is (name, ok, message); ok is None for an op that has no ``backend`` kernel at all (not a
    failure: e.g. only window_process has a CUDA kernel)."""
    import mmfast
    from mmfast.ops import registry

    dev = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    out: list[tuple[str, bool | None, str]] = []

    def run(name, fn, ops):
        missing = [op for op in ops if backend not in registry.get(op).backends]
        if backend != "reference" and missing:
            out.append((name, None, f"no kernel ({', '.join(missing)} has no {backend} implementation)"))
            return
        try:
            got, want = fn(backend), fn("reference")
            ok = all(_close(x, y) for x, y in zip(got, want))
            out.append((name, ok, "matches the reference" if ok else "DIFFERS from the reference"))
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            out.append((name, False, f"{type(exc).__name__}: {exc}"))

    i, t = (torch.randn(9, 16, generator=g).to(dev) for _ in range(2))
    s = torch.tensor(10.0, device=dev)
    run("clip_loss", lambda b: [mmfast.functional.clip_loss(i, t, s, impl=b)],
        ["contrastive_softmax"])
    run("siglip_loss", lambda b: [mmfast.functional.siglip_loss(i, t, s, -5.0, impl=b)],
        ["contrastive_sigmoid"])
    q, k, v = (torch.randn(2, 7, 5, 2, 8, generator=g).to(dev) for _ in range(3))
    table = torch.randn(25, 2, generator=g).to(dev)
    run("window_attention", lambda b: [mmfast.functional.window_attention(
        q, k, v, window_size=3, shift_size=1, rel_pos_bias=table, impl=b)], ["window_attention"])
    grid = torch.randn(2, 7, 9, 6, generator=g).to(dev)
    pad = torch.randn(6, generator=g).to(dev)

    def process(b):
        from mmfast.ops import window_process as wp

        win = wp.window_partition(grid, (4, 4), (2, 1), pad_value=pad, impl=b)
        return [win, wp.window_unpartition(win, (7, 9), (4, 4), (2, 1), impl=b)]

    run("window_process + reverse", process, ["window_process"])
    metric = torch.randn(2, 17, 8, generator=g).to(dev)
    x = torch.randn(2, 17, 8, generator=g).to(dev)

    def tome(b):
        from mmfast.ops import tome as tops

        m, _ = tops.bipartite_soft_matching(metric, 4, class_token=True, impl=b)
        m.impl = b
        return list(tops.merge_wavg(m, x))

    run("tome match + merge_wavg", tome, ["tome_match", "tome_merge_wavg"])
    return out


_MARK = {True: "ok  ", False: "FAIL", None: "--  "}


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
            code = ("from mmfast.info import smoke, _MARK\n"
                    "for n, ok, msg in smoke('triton'): print(_MARK[ok], n, '-', msg)")
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
            print(f"  {backend:<6} {_MARK[ok]} {name} - {msg}")
            failures += ok is False
    return failures


def _runs_on(archs: str, cap: tuple[int, int]) -> bool:
    """Whether SASS built for ``archs`` (nvcc's __CUDA_ARCH_LIST__, e.g. "800,900") runs on a GPU of
    compute capability ``cap``: same major, minor no newer than the GPU's. No PTX is embedded."""
    try:
        codes = [int(a) for a in archs.split(",") if a.strip()]
    except ValueError:
        return True  # an unknown format: do not block the run on it
    return any(c // 100 == cap[0] and (c % 100) // 10 <= cap[1] for c in codes)


def preflight() -> list[str]:
    """What stops a GPU run, one line per problem (empty: ready). Prints the versions first.

    Checks: a CUDA GPU is visible and Triton can use it (``_ext.triton_status``: sm_80 or newer,
    triton and its kernel package installed), the interpreter is off, mmfast._C loads and was built
    with the CUDA sources for this GPU's architecture, every op with a CUDA backend has a CUDA kernel
    registered in the dispatcher, and every mmfast.triton module imports. Seconds: nothing is
    compiled or launched (``--check`` does that)."""
    from mmfast import _ext
    from mmfast.ops import registry

    def version(mod: str) -> str:
        try:
            return importlib.import_module(mod).__version__
        except Exception as exc:  # noqa: BLE001 - reported
            return f"missing ({type(exc).__name__})"

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {version('triton')}, numpy {version('numpy')}")
    problems: list[str] = []
    cap = None
    if not torch.cuda.is_available():
        problems.append(f"CUDA: no GPU visible to torch {torch.__version__} "
                        f"(built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    else:
        props = torch.cuda.get_device_properties(0)
        cap = (props.major, props.minor)
        print(f"GPU 0: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
              f"{torch.cuda.device_count()} visible")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpreting:
        problems.append("TRITON_INTERPRET=1 is set: the Triton kernels would run in the interpreter, "
                        "not on the GPU (unset it)")
    info = _ext.build_info()
    if not info:
        problems.append(f"mmfast._C: {_ext.backends()['cpp']['detail']}")
    elif not info.get("cuda"):
        problems.append("mmfast._C was built without the CUDA sources (rebuild with MMFAST_CUDA=1)")
    else:
        archs = str(info.get("cuda_archs", ""))
        print(f"mmfast._C: CUDA {info.get('cuda_version')}, archs {archs}")
        if cap is not None and not _runs_on(archs, cap):
            problems.append(f"mmfast._C: compiled for archs {archs}, not for this GPU's sm_{cap[0]}{cap[1]} "
                            "(rebuild on this machine, or set TORCH_CUDA_ARCH_LIST)")
        for op in registry.all_ops():
            if "cuda" not in op.backends:
                continue
            qualname = f"mmfast::{op.name}"
            try:
                has = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")
            except RuntimeError:
                has = False
            if not has:
                problems.append(f"CUDA op {qualname}: no CUDA kernel registered in this build of mmfast._C")
    usable, how = _ext.triton_status()
    if cap is not None and not interpreting and not usable:
        problems.append(f"Triton: {how}")  # the sm_80 floor, a missing triton or kernel package
    elif importlib.util.find_spec("triton") is None:
        problems.append("triton is not installed")
    else:
        for name, err in _ext.triton_modules_status().items():
            if err is not None:
                problems.append(f"mmfast.triton.{name}: {err}")
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmfast.info", description=__doc__)
    parser.add_argument("--check", action="store_true", help="run every op once on every available backend")
    parser.add_argument("--preflight", action="store_true",
                        help="only check that a GPU run can start (GPU, kernels, modules); exit 1 if not")
    args = parser.parse_args(argv)
    if args.preflight:
        problems = preflight()
        for line in problems:
            print(f"preflight: {line}")
        print("preflight: ready" if not problems else f"preflight: {len(problems)} problem(s), stop")
        sys.exit(1 if problems else 0)
    print(report())
    if args.check:
        sys.exit(1 if check() else 0)


if __name__ == "__main__":
    main()
