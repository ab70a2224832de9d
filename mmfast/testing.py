"""Test helpers shared by the test suite and the benchmarks.

* :func:`assert_accuracy` applies the accuracy rule of STYLE.md: a kernel's error against a
  high-precision reference must be at most ``factor`` (2) times the error of plain PyTorch in the
  same low precision against that same reference, plus a tiny absolute floor that only matters when
  the plain-PyTorch error is exactly zero (fp32 ops that are exact in both).
* :func:`max_rel_err` and :func:`assert_matches_rank` compare one rank's loss and gradients with
  :func:`mmfast.reference.contrastive.simulate_ranks`'s for that rank.
* :func:`run_distributed` runs a function in ``world_size`` real gloo processes on 127.0.0.1 with a
  timeout, and re-raises every rank's exception with its traceback. A hang fails; a bad exit code
  fails even when the results were already sent back.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["assert_accuracy", "assert_matches_rank", "max_abs_err", "max_rel_err", "run_distributed", "free_port"]


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` over the larger of ``max |b|`` and 0.01: near-zero gradients are differences
    of O(scale) terms, so their absolute rounding error is O(scale * eps), not O(|grad| * eps)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-2)).item()


def assert_matches_rank(got: tuple, want: dict, what, tol: float = 1e-10, zero_bias_grad: bool = False) -> None:
    """``got = (loss, [d_image, d_text, d_scale, d_bias])`` of one rank against ``want``, that rank's
    :func:`~mmfast.reference.contrastive.simulate_ranks` entry, each within ``tol`` (:func:`max_rel_err`).
    ``zero_bias_grad``: the bias gradient must be exactly 0 (CLIP: a constant logit shift cancels;
    the simulation's is rounding noise). ``what`` names the case in the message."""
    loss, grads = got
    assert max_rel_err(loss, want["loss"]) < tol, (what, "loss")
    for name, g, w in zip(("image", "text", "scale"), grads, want["grads"]):
        assert max_rel_err(g, w) < tol, (what, name)
    if zero_bias_grad:
        assert grads[3].abs().item() == 0.0, (what, "bias")
    elif len(grads) > 3 and want["grads"][3] is not None:
        assert max_rel_err(grads[3], want["grads"][3]) < tol, (what, "bias")


def assert_accuracy(
    out: torch.Tensor,
    ref_lowp: torch.Tensor,
    ref_high: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    name: str = "output",
) -> None:
    """Assert ``|out - ref_high| <= factor * |ref_lowp - ref_high| + floor`` (max norms).

    ``out``: the kernel's result. ``ref_lowp``: plain PyTorch computed in the same dtype as the
    kernel's inputs. ``ref_high``: the same computation in float64 (or float32 for half inputs).
    ``floor`` defaults to a few ulps of ``out``'s dtype times the reference magnitude, so that an
    exactly-representable plain-PyTorch result does not demand bit equality from a kernel that
    reassociates sums.
    """
    if out.shape != ref_high.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_high.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: kernel output has non-finite values")
    if floor is None:
        eps = torch.finfo(out.dtype).eps if out.dtype.is_floating_point else 0.0
        scale = ref_high.detach().abs().max().item() if ref_high.numel() else 0.0
        floor = 8 * eps * max(scale, 1.0)
    err = max_abs_err(out, ref_high)
    base = max_abs_err(ref_lowp, ref_high)
    bound = factor * base + floor
    if err > bound:
        raise AssertionError(
            f"{name}: max error {err:.3e} exceeds {factor}x plain-PyTorch error {base:.3e} "
            f"+ floor {floor:.1e} (dtype {out.dtype})"
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, *args)
            result = {"ok": True, "value": value}
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent verbatim
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    # The result is on disk; leave without the interpreter's exit-time teardown, where torch's
    # process-group threads have aborted a rank after a clean destroy_process_group ("terminate
    # called without an active exception", exit code -6, seen once in CI). What fn did is reported
    # through the result file, exceptions included.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return each rank's value.

    ``fn`` and its arguments must be picklable (a module-level function). Values are returned
    through pickle files, so tensors are fine. Raises ``RuntimeError`` naming every failing rank
    with its traceback, or ``TimeoutError`` when any process is still running after ``timeout``
    seconds (those processes are killed first).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mmfast-dist-") as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        import time

        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        if alive:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
            raise TimeoutError(f"run_distributed: ranks {alive} still running after {timeout:.0f}s")
        results: list[Any] = []
        errors: list[str] = []
        for r, p in enumerate(procs):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r}: exited with code {p.exitcode} and no result")
                continue
            with open(path, "rb") as f:
                res = pickle.load(f)
            if not res["ok"]:
                errors.append(f"rank {r}: {res['error']}\n{res['tb']}")
            elif p.exitcode != 0:
                errors.append(f"rank {r}: returned a result but exited with code {p.exitcode}")
            else:
                results.append(res["value"])
        if errors:
            raise RuntimeError("run_distributed failed:\n" + "\n".join(errors))
        return results
