"""Per-rank peak loss memory of the distributed ClipLoss in real gloo processes, against the world size.

``python -m mmfast.bench.dist_memory --worlds 2,4,8,16`` runs one forward + backward (features and
scale) of open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` and of ``mmfast.ClipLoss``
with the same flags (``--schemes``: ``gather:G`` / ``ring:G``, ``G`` the group size; at W < G the
scheme is skipped) in W single-threaded gloo processes on this machine, for each world size, and
reports per scheme and W:

* the measured peak: the CPU profiler's peak extra memory of one step on each rank (the median of
  :data:`~mmfast.bench.cases.contrastive_dist.MEMORY_STEPS` steps), the largest over the ranks;
* the prediction of :mod:`mmfast.bench.scaling` (its gloo flavour, one node of W ranks);
* the growth of each scheme's peak from one world size to the next, and open_clip's peak over the
  scheme's at the same W.

It writes ``<out>/dist_memory.csv``, ``.md`` and ``.png`` (peak against W, measured and predicted).
Shapes: ``--batch`` 1024 pairs per rank, ``--dim`` 512, fp32.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["measure_peaks", "predicted_peak", "main"]


def measure_peaks(rank: int, world: int, schemes: Sequence[str], b: int, d: int) -> dict[str, int]:
    """In every rank (:func:`mmfast.testing.run_distributed`): per scheme, one warm-up step, then the
    median over a few steps of this rank's peak extra memory (bytes)."""
    import torch

    from mmfast.bench.cases.contrastive_dist import MEMORY_STEPS
    from mmfast.bench.memory import peak_extra_memory
    from mmfast.bench.wire import scheme_step

    torch.set_num_threads(1)
    out: dict[str, int] = {}
    for scheme in schemes:
        step = scheme_step(scheme, rank, world, b, d)
        step()
        out[scheme] = int(statistics.median(peak_extra_memory(step, "cpu").peak_extra_bytes
                                            for _ in range(MEMORY_STEPS)))
    return out


def predicted_peak(scheme: str, world: int, b: int, d: int) -> int:
    """The scaling model's peak (gloo flavour) of ``scheme`` at ``world`` ranks on one node."""
    from mmfast.bench import scaling as sc

    prob = sc.Problem(world, b, d, "float32")
    cluster = sc.Cluster(gpus_per_node=world)
    if scheme == "open_clip":
        return sc.predict_open_clip_clip(prob, cluster, sc.H200_BF16, backend="gloo").peak_memory_bytes
    exchange, g = scheme.split(":")
    return sc.predict_mmfast(prob, cluster, sc.H200_BF16, int(g), exchange=exchange,
                             backend="gloo").peak_memory_bytes


def _runs(scheme: str, world: int) -> bool:
    return scheme == "open_clip" or world % int(scheme.split(":")[1]) == 0


def _plot(rows: list[dict[str, Any]], schemes: Sequence[str], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, s in enumerate(schemes):
        mine = [r for r in rows if r["scheme"] == s]
        if not mine:
            continue
        ws = [r["world"] for r in mine]
        color = f"C{i}"
        ax.plot(ws, [r["measured_mib"] for r in mine], "o-", color=color, label=f"{s} measured")
        ax.plot(ws, [r["predicted_mib"] for r in mine], "x--", color=color, alpha=0.6, label=f"{s} model")
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    worlds = sorted({r["world"] for r in rows})
    ax.set_xticks(worlds, [str(w) for w in worlds])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("world size W (gloo processes)")
    ax.set_ylabel("peak loss memory per rank (MiB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfast.bench.dist_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="2,4,8,16", help="comma-separated world sizes (default 2,4,8,16)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--schemes", default="open_clip,ring:2,ring:1,gather:2",
                        help="open_clip, gather:G, ring:G (G = group_size)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per world size")
    opts = parser.parse_args(argv)
    from mmfast.bench.report import cpu_model, write_csv
    from mmfast.testing import run_distributed

    schemes = [s for s in opts.schemes.split(",") if s]
    for s in schemes:
        if s != "open_clip" and (s.count(":") != 1 or s.split(":")[0] not in ("gather", "ring")
                                 or not s.split(":")[1].isdigit() or int(s.split(":")[1]) < 1):
            parser.error(f"--schemes: {s!r} is not open_clip, gather:G or ring:G with G a positive integer")
    worlds = [int(w) for w in opts.worlds.split(",") if w]
    if not worlds or min(worlds) < 2:
        parser.error("--worlds: world sizes of at least 2")
    b, d, mib = opts.batch, opts.dim, 2**20
    cpu, today = cpu_model(), datetime.date.today().isoformat()
    rows: list[dict[str, Any]] = []
    for w in worlds:
        run = [s for s in schemes if _runs(s, w)]
        print(f"W={w}: {', '.join(run)} ...", flush=True)
        res = run_distributed(measure_peaks, w, run, b, d, timeout=opts.timeout)
        for s in run:
            peak = max(r[s] for r in res)
            pred = predicted_peak(s, w, b, d)
            rows.append({"scheme": s, "world": w, "batch": b, "dim": d, "dtype": "float32",
                         "measured_bytes": peak, "predicted_bytes": pred,
                         "measured_mib": round(peak / mib, 2), "predicted_mib": round(pred / mib, 2),
                         "measured_over_bd": round(peak / (b * d * 4), 3), "cpu": cpu, "date": today})
            print(f"  {s:>10}: {peak / mib:8.1f} MiB measured, {pred / mib:8.1f} MiB predicted", flush=True)
    by = {(r["scheme"], r["world"]): r for r in rows}
    for r in rows:  # growth from the previous world size, and open_clip over this scheme
        prev = [x for x in rows if x["scheme"] == r["scheme"] and x["world"] < r["world"]]
        r["growth_from_prev_w"] = round(r["measured_bytes"] / prev[-1]["measured_bytes"], 3) if prev else ""
        oc = by.get(("open_clip", r["world"]))
        r["open_clip_over_this"] = round(oc["measured_bytes"] / r["measured_bytes"], 2) if oc else ""
    out = Path(opts.out)
    write_csv(out / "dist_memory.csv", rows)
    title = f"ClipLoss local_loss+gather_with_grad, B={b} D={d} fp32, gloo, {cpu}"
    lines = [f"# Per-rank peak loss memory against W: {title}", "",
             f"`python -m mmfast.bench.dist_memory --worlds {opts.worlds} --batch {b} --dim {d} --schemes "
             f"{opts.schemes}`, {today}. Measured: the CPU profiler's peak extra memory of one forward + "
             "backward, median of 3 steps per rank, largest over the ranks. Model: mmfast.bench.scaling "
             "(gloo flavour). Growth: over the previous world size of the same scheme.", "",
             "| scheme | W | measured MiB | model MiB | measured / (B*D*4) | growth | open_clip / this |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['world']} | {r['measured_mib']:.1f} | {r['predicted_mib']:.1f} | "
                     f"{r['measured_over_bd']:.2f} | {r['growth_from_prev_w']} | {r['open_clip_over_this']} |")
    (out / "dist_memory.md").write_text("\n".join(lines) + "\n")
    _plot(rows, schemes, out / "dist_memory.png", title)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
