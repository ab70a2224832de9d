"""The scaling model's command line: simulate a sweep, print the table, write JSON/CSV rows and the plot."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from mmfast.bench.scaling.calibrate import calibrate_compute, rates_from_json
from mmfast.bench.scaling.hardware import (
    DEFAULT_MEMORY_BUDGET,
    DGX_H200,
    EXCHANGES,
    GB,
    H200_BF16,
    IB_400G,
    NVLINK,
    Cluster,
    ComputeRates,
    Link,
    Problem,
)
from mmfast.bench.scaling.predict import predict_all, recommend
from mmfast.bench.scaling.prediction import Prediction

# ---------------------------------------------------------------------------------------- simulate

DEFAULT_WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BATCHES = (256, 1024)


def simulate(
    worlds: Sequence[int] = DEFAULT_WORLDS,
    batches: Sequence[int] = DEFAULT_BATCHES,
    dim: int = 768,
    dtype: str = "bfloat16",
    cluster: Cluster = DGX_H200,
    rates: ComputeRates = H200_BF16,
) -> list[Prediction]:
    """Predictions of every scheme (and the intra-first what-if) for each world size and local batch size."""
    out: list[Prediction] = []
    for b in batches:
        for w in worlds:
            out += predict_all(Problem(w, b, dim, dtype), cluster, rates, include_whatif=True)
    return out


def _fmt_bytes(n: float) -> str:
    for unit, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= s:
            return f"{n / s:.1f} {unit}"
    return f"{int(n)} B"


def _series(preds: Sequence[Prediction], gpn: int, memory_budget: float | None = DEFAULT_MEMORY_BUDGET
            ) -> dict[str, list[Prediction]]:
    """The lines drawn / tabulated: the baselines; mmfast ClipLoss gather with g=1, g=node (mmfast's
    default under torchrun), g=W and its best g; the ring with its best g; the recommended
    (group_size, exchange) within ``memory_budget``; mmfast SigLipLoss's recommended configuration;
    and, when predicted, the intra-first what-if at g=node."""
    s: dict[str, list[Prediction]] = {}
    by_world: dict[int, list[Prediction]] = {}
    for p in preds:
        by_world.setdefault(p.problem.world, []).append(p)
    for w, ps in sorted(by_world.items()):
        for p in ps:
            g = p.params.get("group_size")
            if p.scheme in ("open_clip-clip", "open_clip-siglip", "inf-cl"):
                s.setdefault(p.label, []).append(p)
            elif p.scheme == "mmfast-clip" and p.exchange == "gather":
                for name, want in (("g=1", 1), ("g=node", min(gpn, w)), ("g=W", w)):
                    if g == want:
                        s.setdefault(f"mmfast ClipLoss {name}", []).append(p)
            elif p.scheme == "mmfast-clip-intrafirst" and g == min(gpn, w):
                s.setdefault("what-if: intra-first g=node", []).append(p)
        s.setdefault("mmfast ClipLoss gather best g", []).append(recommend(ps, exchange="gather"))
        if any(p.scheme == "mmfast-clip" and p.exchange == "ring" for p in ps):
            s.setdefault("mmfast ClipLoss ring best g", []).append(recommend(ps, exchange="ring"))
        s.setdefault("mmfast ClipLoss recommended", []).append(recommend(ps, memory_budget=memory_budget))
        if any(p.scheme == "mmfast-siglip" for p in ps):
            s.setdefault("mmfast SigLipLoss recommended", []).append(
                recommend(ps, "mmfast-siglip", memory_budget=memory_budget))
    return s


def _config(p: Prediction) -> str:
    return f"{p.params['group_size']} {p.exchange}"


_COL = 11


def _table_row(name: str, pts: list[Prediction], fmt: Any, worlds: Sequence[int]) -> str:
    cells = {p.problem.world: fmt(p) for p in pts}
    return f"{name:<34}" + "".join(f"{cells.get(w, '-'):>{_COL}}" for w in worlds)


def format_table(preds: Sequence[Prediction], gpn: int, memory_budget: float | None = DEFAULT_MEMORY_BUDGET) -> str:
    """Text table per local batch size: step time and memory of each series, the best group size of
    each exchange and the recommended (group_size, exchange) within ``memory_budget``."""
    lines = []
    budget = "no memory budget" if memory_budget is None else f"loss memory budget {_fmt_bytes(memory_budget)}"
    for b in sorted({p.problem.batch for p in preds}):
        ps = [p for p in preds if p.problem.batch == b]
        ser = _series(ps, gpn, memory_budget)
        worlds = sorted({p.problem.world for p in ps})
        head = f"{'B=' + str(b):<34}" + "".join(f"{w:>{_COL}}" for w in worlds)
        lines += [head, "-" * len(head)]
        row = functools.partial(_table_row, worlds=worlds)

        for name, pts in ser.items():
            lines.append(row(name + " ms", pts, lambda p: f"{p.step_s * 1e3:.2f}"))
        for name, pts in ser.items():
            lines.append(row(name + " mem", pts, lambda p: _fmt_bytes(p.peak_memory_bytes)))
        lines.append(row("gather best group_size", ser["mmfast ClipLoss gather best g"],
                         lambda p: str(p.params["group_size"])))
        if "mmfast ClipLoss ring best g" in ser:
            lines.append(row("ring best group_size", ser["mmfast ClipLoss ring best g"],
                             lambda p: str(p.params["group_size"])))
        rec = ser["mmfast ClipLoss recommended"]
        lines.append(row("recommended group_size", rec, lambda p: str(p.params["group_size"])))
        lines.append(row("recommended exchange", rec, lambda p: p.exchange))
        lines.append(f"(recommended: the fastest ClipLoss (group_size, exchange) within the {budget})")
        lines.append("")
    return "\n".join(lines)


def plot(preds: Sequence[Prediction], path: Path, gpn: int, title: str = "",
         memory_budget: float | None = DEFAULT_MEMORY_BUDGET) -> Path:
    """PNG, one row per local batch size: predicted step time against W, the same relative to open_clip
    ClipLoss (CLIP schemes), and peak loss memory."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = colormaps["tab20"]
    batches = sorted({p.problem.batch for p in preds})
    fig = Figure(figsize=(17, 4.6 * len(batches)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(batches), 3, squeeze=False)
    for row, b in zip(axes, batches):
        ser = _series([p for p in preds if p.problem.batch == b], gpn, memory_budget)
        base = {p.problem.world: p.step_s for p in ser.get("open_clip ClipLoss local+gwg", [])}
        for i, (name, pts) in enumerate(ser.items()):
            style: dict[str, Any] = {"marker": "o", "markersize": 3, "color": colors(i % 20)}
            if not name.startswith("mmfast"):
                style["linestyle"] = "--" if not name.startswith("what-if") else ":"
            elif "ring" in name:
                style["linestyle"] = "-."
            ws = [p.problem.world for p in pts]
            row[0].plot(ws, [p.step_s * 1e3 for p in pts], label=name, **style)
            if "SigLip" not in name and base:
                row[1].plot(ws, [p.step_s / base[p.problem.world] for p in pts], label=name, **style)
            row[2].plot(ws, [p.peak_memory_bytes / 2**30 for p in pts], label=name, **style)
        labels = ("predicted loss step (ms)", "step / open_clip ClipLoss step", "predicted peak loss memory (GiB)")
        for ax, ylabel in zip(row, labels):
            ax.set_xscale("log", base=2)
            if ax is not row[1]:
                ax.set_yscale("log")
            ax.set_xlabel("world size W (GPUs)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"B={b} per GPU, D={preds[0].problem.dim}, {preds[0].problem.dtype}")
            ax.grid(True, which="both", alpha=0.3)
        row[1].axhline(1.0, color="grey", linewidth=0.8)
        if memory_budget is not None:
            row[2].axhline(memory_budget / 2**30, color="grey", linewidth=0.8, linestyle=":")
        row[1].set_ylim(0, 2.5)
        row[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def write_outputs(preds: Sequence[Prediction], out_dir: Path, gpn: int, stem: str = "scaling",
                  meta: dict[str, Any] | None = None,
                  memory_budget: float | None = DEFAULT_MEMORY_BUDGET) -> list[Path]:
    """``<stem>.json`` (meta, the recommended (group_size, exchange) per problem, every row),
    ``<stem>.csv``, ``<stem>.txt`` (the table), ``<stem>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [p.row() for p in preds]
    jpath, cpath, tpath, ppath = (out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "txt", "png"))
    best = {}
    for b in sorted({p.problem.batch for p in preds}):
        for w in sorted({p.problem.world for p in preds}):
            ps = [p for p in preds if p.problem.batch == b and p.problem.world == w]
            if ps:
                r = recommend(ps, memory_budget=memory_budget)
                entry = {"group_size": r.params["group_size"], "exchange": r.exchange, "step_ms": r.step_s * 1e3,
                         "peak_memory_bytes": r.peak_memory_bytes, "memory_budget_bytes": memory_budget}
                for ex in EXCHANGES:
                    if any(p.scheme == "mmfast-clip" and p.exchange == ex for p in ps):
                        e = recommend(ps, exchange=ex)
                        entry[f"{ex}_best"] = {"group_size": e.params["group_size"], "step_ms": e.step_s * 1e3,
                                               "peak_memory_bytes": e.peak_memory_bytes}
                best[f"B={b} W={w}"] = entry
    jpath.write_text(json.dumps({"meta": meta or {}, "recommended": best, "rows": rows}, indent=1, default=str))
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(cpath, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    table = format_table(preds, gpn, memory_budget)
    tpath.write_text(table + "\n")
    plot(preds, ppath, gpn, title=(meta or {}).get("title", ""), memory_budget=memory_budget)
    return [jpath, cpath, tpath, ppath]


def build_parser() -> argparse.ArgumentParser:
    """Options of ``python -m mmfast.bench.scaling``."""
    p = argparse.ArgumentParser(
        prog="python -m mmfast.bench.scaling",
        description="Predict per-rank loss step time, peak loss memory and bytes sent (intra/inter-node) "
        "of open_clip ClipLoss/SigLipLoss, Inf-CL and mmfast (every group_size, gather and ring exchange) for "
        "W = 8..4096, and recommend mmfast's (group_size, exchange).",
    )
    p.add_argument("--worlds", default=",".join(map(str, DEFAULT_WORLDS)), help="comma-separated world sizes")
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="local batch sizes B")
    p.add_argument("--dim", type=int, default=768, help="embedding dimension D (default 768)")
    p.add_argument("--dtype", default="bfloat16", help="feature dtype (default bfloat16)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=NVLINK.bandwidth / GB, help="NVLink GB/s per direction/GPU")
    p.add_argument("--intra-us", type=float, default=NVLINK.latency * 1e6, help="NVLink latency (us)")
    p.add_argument("--inter-gbps", type=float, default=IB_400G.bandwidth / GB, help="NIC GB/s per direction")
    p.add_argument("--inter-us", type=float, default=IB_400G.latency * 1e6, help="inter-node latency (us)")
    p.add_argument("--nics-per-node", type=int, default=None, help="default: --gpus-per-node")
    p.add_argument("--allreduce", choices=("auto", "ring", "tree"), default="auto")
    p.add_argument("--rates", type=Path, default=None,
                   help="JSON of recorded compute rates (tile_fwd, tile_bwd, gemm, mem_bw); default: H200 figures")
    p.add_argument("--tile-tflops", type=float, default=None, help="override both tile rates (TFLOP/s)")
    p.add_argument("--calibrate", action="store_true", help="measure the compute rates on --device and use them")
    p.add_argument("--device", default="cpu", help="device for --calibrate (cpu, cuda)")
    p.add_argument("--save-rates", type=Path, default=None, help="write the rates used to this JSON file")
    p.add_argument("--memory-budget-mib", type=float, default=DEFAULT_MEMORY_BUDGET / 2**20,
                   help="per-rank loss memory the recommended (group_size, exchange) must fit, MiB (default 512, "
                   "exchange='auto''s budget; 0: none)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results)")
    p.add_argument("--stem", default="scaling", help="output file stem (default scaling)")
    p.add_argument("--no-save", action="store_true", help="print only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mmfast.bench.scaling``: print the table, write JSON/CSV/TXT/PNG, print the answer."""
    opts = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cluster = Cluster(
        gpus_per_node=opts.gpus_per_node,
        intra=Link(opts.intra_gbps * GB, opts.intra_us * 1e-6),
        inter=Link(opts.inter_gbps * GB, opts.inter_us * 1e-6),
        nics_per_node=opts.nics_per_node,
        allreduce=opts.allreduce,
        name=f"{opts.gpus_per_node} GPU/node, intra {opts.intra_gbps:g} GB/s {opts.intra_us:g} us, "
        f"inter {opts.inter_gbps:g} GB/s/NIC {opts.inter_us:g} us",
    )
    if opts.calibrate:
        rates = calibrate_compute(opts.device, "bfloat16" if "cuda" in opts.device else "float32")
    elif opts.rates:
        rates = rates_from_json(opts.rates)
    else:
        rates = H200_BF16
    if opts.tile_tflops:
        rates = replace(rates, tile_fwd=opts.tile_tflops * 1e12, tile_bwd=opts.tile_tflops * 1e12,
                        source=rates.source + f"; tile rates set to {opts.tile_tflops:g} TFLOP/s")
    if opts.save_rates:
        opts.save_rates.write_text(json.dumps(asdict(rates), indent=1))
    worlds = [int(x) for x in opts.worlds.split(",") if x]
    batches = [int(x) for x in opts.batches.split(",") if x]
    preds = simulate(worlds, batches, opts.dim, opts.dtype, cluster, rates)
    budget = opts.memory_budget_mib * 2**20 if opts.memory_budget_mib > 0 else None
    print(f"# {cluster.name}\n# compute: {rates.source}\n")
    print(format_table(preds, cluster.gpus_per_node, budget))
    if not opts.no_save:
        from mmfast.bench.report import default_out_dir

        out = opts.out if opts.out is not None else default_out_dir()
        meta = {"cluster": asdict(cluster), "rates": asdict(rates), "dim": opts.dim, "dtype": opts.dtype,
                "memory_budget_bytes": budget,
                "command": " ".join(["python -m mmfast.bench.scaling", *(argv or sys.argv[1:])]),
                "title": f"predicted loss step and memory, D={opts.dim} {opts.dtype}, {cluster.name}"}
        for path in write_outputs(preds, out, cluster.gpus_per_node, opts.stem, meta, budget):
            print(f"wrote {path}")
    return 0
