"""Bytes that really cross the wire, from Linux's interface counters (``/proc/net/dev``).

A byte model (:mod:`mmfast.bench.comm`) counts what a collective should send; a backend may send
more (gloo's ``reduce_scatter_tensor`` is an all-reduce underneath: twice the bytes). Here the
processes of a gloo group on one machine talk over the loopback interface, so its transmit counter
sees every byte every rank sends (plus TCP/IP headers and acknowledgements, ~0.1-1% here).

``python -m mmfast.bench.wire`` runs one forward + backward of open_clip's ``ClipLoss`` (local_loss +
gather_with_grad) and of ``mmfast.ClipLoss`` (the gather scheme and the ring scheme with group sizes
1 and 2) in ``--world`` gloo processes and prints, per scheme, the loopback bytes of one step (all
ranks; the traffic of the barriers around it subtracted; the least of ``--repeats`` brackets), the byte model's
count, and the ratio to open_clip's.
It writes ``<out>/wire_bytes.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["interface_tx_bytes", "step_wire_bytes", "scheme_step", "measure_schemes", "main"]


def interface_tx_bytes(iface: str = "lo") -> int:
    """Bytes transmitted so far on ``iface`` (Linux). Raises RuntimeError where there is no counter."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == iface and rest:
                    return int(rest.split()[8])
    except OSError as exc:
        raise RuntimeError(f"cannot read /proc/net/dev: {exc}") from exc
    raise RuntimeError(f"interface {iface!r} not found in /proc/net/dev")


def step_wire_bytes(step: Callable[[], Any], repeats: int = 5, iface: str = "lo") -> int:
    """Call in every rank of a gloo group whose ranks share this machine: the loopback bytes of one
    ``step()`` of all ranks together (the counter is the machine's: every rank reads the same one).
    Each repeat brackets one barrier, then a barrier, the step and a barrier: the step starts only
    once every rank has read the counter, or a rank that reads late would count the others' first
    messages in the wrong bracket. Traffic of other processes on the interface only ever adds bytes
    to a bracket, so the least of each over ``repeats`` is its own traffic (on a quiet machine every
    repeat agrees to a few hundred bytes); the step's bytes are the second less two of the first."""
    import torch.distributed as dist

    barrier, stepped = [], []
    for _ in range(repeats):
        dist.barrier()
        a = interface_tx_bytes(iface)
        dist.barrier()
        b = interface_tx_bytes(iface)
        dist.barrier()
        step()
        dist.barrier()
        c = interface_tx_bytes(iface)
        barrier.append(b - a)
        stepped.append(c - b)
    return min(stepped) - 2 * min(barrier)


def scheme_step(scheme: str, rank: int, world: int, b: int, d: int) -> Callable[[], Any]:
    """One forward + backward (features and scale) of ``scheme`` on this rank's seeded fp32 features:
    ``open_clip`` (``ClipLoss(local_loss=True, gather_with_grad=True)``), ``gather:G`` or ``ring:G``
    (``mmfast.ClipLoss`` with those flags, ``exchange`` and ``group_size=G``); ``+labels`` after
    either: with ``labels=`` (64 label values)."""
    import torch

    gen = torch.Generator().manual_seed(100 + rank)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    labels = None
    if scheme.endswith("+labels"):
        scheme = scheme[: -len("+labels")]
        labels = torch.randint(0, 64, (b,), generator=gen)
    if scheme == "open_clip":
        from open_clip.loss import ClipLoss

        fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    else:
        import mmfast

        exchange, g = scheme.split(":")
        fn = mmfast.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                             group_size=int(g), exchange=exchange)

    def step() -> None:
        loss = fn(img, txt, scale) if labels is None else fn(img, txt, scale, labels=labels)
        torch.autograd.grad(loss, [img, txt, scale])

    return step


def measure_schemes(rank: int, world: int, schemes: Sequence[str], b: int, d: int, repeats: int) -> dict[str, Any]:
    """In every rank (:func:`mmfast.testing.run_distributed`): per scheme, one warm-up step, the byte
    model's count of one step (this rank) and the loopback bytes of one step (all ranks)."""
    from mmfast.bench.comm import count_collective_bytes

    out: dict[str, Any] = {}
    for scheme in schemes:
        step = scheme_step(scheme, rank, world, b, d)
        step()
        with count_collective_bytes() as counter:
            step()
        out[scheme] = {"model_bytes": counter.sent_bytes, "wire_bytes": step_wire_bytes(step, repeats)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfast.bench.wire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schemes", default="open_clip,gather:4,ring:2,ring:1",
                        help="open_clip, gather:G, ring:G (G = group_size), each mmfast one with +labels")
    parser.add_argument("--out", default="benchmarks/results")
    opts = parser.parse_args(argv)
    from mmfast.bench.report import cpu_model, write_csv
    from mmfast.testing import run_distributed

    schemes = [s for s in opts.schemes.split(",") if s]
    res = run_distributed(measure_schemes, opts.world, schemes, opts.batch, opts.dim, opts.repeats, timeout=1200)
    base = res[0].get("open_clip", {}).get("wire_bytes")
    rows = []
    for s in schemes:
        wire = res[0][s]["wire_bytes"]
        model = sum(r[s]["model_bytes"] for r in res)
        rows.append({"scheme": s, "world": opts.world, "batch": opts.batch, "dim": opts.dim, "dtype": "float32",
                     "wire_bytes": wire, "model_bytes": model, "wire_over_model": round(wire / model, 4),
                     "open_clip_over_this": round(base / wire, 3) if base else "",
                     "cpu": cpu_model(), "date": datetime.date.today().isoformat()})
    out = Path(opts.out)
    write_csv(out / "wire_bytes.csv", rows)
    lines = [f"# Loopback bytes of one ClipLoss step (local_loss + gather_with_grad), W={opts.world}, "
             f"B={opts.batch}, D={opts.dim} fp32, gloo", "",
             f"`python -m mmfast.bench.wire --world {opts.world} --batch {opts.batch} --dim {opts.dim}` on "
             f"{rows[0]['cpu']}, {rows[0]['date']}. Wire: /proc/net/dev `lo` transmit bytes of all ranks, "
             "barrier traffic subtracted, least of the repeats. Model: mmfast.bench.comm's count, all ranks.", "",
             "| scheme | wire bytes | model bytes | wire / model | open_clip / this |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['wire_bytes']:,} | {r['model_bytes']:,} | {r['wire_over_model']:.3f} | "
                     f"{r['open_clip_over_this']} |")
    (out / "wire_bytes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
