"""The ``tome`` case's outputs: the markdown summary and the figure (:mod:`mmfast.bench.cases.tome`)."""

from __future__ import annotations

import math
from pathlib import Path

from mmfast.bench.harness import BenchResult
from mmfast.bench.report import cpu_model, save_figure

__all__ = ["plot_tome", "summary_markdown"]


def _med(r: BenchResult | None) -> float | None:
    return None if r is None or r.timing is None else r.timing.median_ms


def _min(r: BenchResult | None) -> float | None:
    return None if r is None or r.timing is None else r.timing.min_ms


def _model_table(lines: list[str], models: list[BenchResult], heading: str) -> None:
    """The images/s table of whole-model configurations (inference or training step), appended to ``lines``."""
    if models:
        lines += [f"## {heading}", "",
                  "x unmerged / x tome-ref: that median over this provider's (above 1: faster); (min): the same "
                  "with the fastest sample of each (less sensitive to other jobs on a shared machine); max abs "
                  "diff: logits vs tome-ref.", "",
                  "| configuration | provider | median ms | IQR ms | min ms | images/s | x unmerged | x tome-ref | "
                  "x unmerged (min) | x tome-ref (min) | peak+ MiB | max abs diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for shape in dict.fromkeys(r.shape for r in models):
            rows = [r for r in models if r.shape == shape]
            base = {r.provider: r for r in rows}
            t_unm, t_ref = _med(base.get("timm")), _med(base.get("tome-ref"))
            m_unm, m_ref = _min(base.get("timm")), _min(base.get("tome-ref"))
            for r in rows:
                t, tm = _med(r), _min(r)
                ips = "-" if t is None else f"{r.params['B'] / (t / 1e3):.2f}"
                vs_u = "-" if t is None or t_unm is None else f"{t_unm / t:.2f}"
                vs_r = "-" if t is None or t_ref is None else f"{t_ref / t:.2f}"
                mvs_u = "-" if tm is None or m_unm is None else f"{m_unm / tm:.2f}"
                mvs_r = "-" if tm is None or m_ref is None else f"{m_ref / tm:.2f}"
                lines.append(
                    f"| {shape} | {r.provider} | {'-' if t is None else f'{t:.1f}'} | "
                    f"{'-' if r.timing is None else f'{r.timing.iqr_ms:.1f}'} | {'-' if tm is None else f'{tm:.1f}'} | "
                    f"{ips} | {vs_u} | {vs_r} | {mvs_u} | {mvs_r} | "
                    f"{'-' if r.peak_extra_bytes is None else f'{r.peak_extra_bytes / 2**20:.1f}'} | "
                    f"{'-' if r.max_abs_diff is None else f'{r.max_abs_diff:.2e}'} |"
                    + (f" error: {r.error[:80]}" if r.error else ""))
            ctrl = base.get("timm+fused-linear")
            mm = next((r for n, r in base.items() if n.startswith("mmfast[") and "+" not in n), None)
            if ctrl is not None and mm is not None and _med(ctrl) and _med(mm):
                lines += ["", f"Merging alone, with the same fused linears in both models ({shape}): "
                          f"timm+fused-linear / {mm.provider} = {_med(ctrl) / _med(mm):.2f}x (median), "
                          f"{_min(ctrl) / _min(mm):.2f}x (min); the fused linears alone: timm / timm+fused-linear "
                          f"= {t_unm / _med(ctrl):.2f}x." if t_unm else ""]
            best = {fam: min((t for n, r in base.items() if n.startswith(fam) and "+eager" not in n
                              and (t := _med(r)) is not None), default=None) for fam in ("mmfast[", "tome-ref")}
            if best["mmfast["] and best["tome-ref"]:
                lines += ["", f"The faster of mmfast eager and compiled against the faster of plain ToMe eager and "
                          f"compiled ({shape}): {best['tome-ref'] / best['mmfast[']:.2f}x"
                          + (f"; against unmerged: {t_unm / best['mmfast[']:.2f}x." if t_unm else ".")]
        lines.append("")


def summary_markdown(results: list[BenchResult], title: str) -> str:
    """Images/s and ratios (vs unmerged, vs tome-ref) of the model configurations; the match+merge share."""
    lines = [f"# {title}", ""]
    if results and results[0].device.startswith("cpu"):
        lines += [f"CPU: {cpu_model()}", ""]
    for part, heading in (("model", "whole model (inference)"),
                          ("train", "training step (forward + backward of every parameter, train mode)")):
        _model_table(lines, [r for r in results if r.params.get("part") == part], heading)
    merges = [r for r in results if r.params.get("part") == "merge"]
    if merges:
        lines += ["## match + merge share of a block (per-layer shapes)", "",
                  "share = median of merge_tokens (matching + merge) / median of the whole ToMe block of the same "
                  "provider.", "",
                  "| layer | tokens | r | ref merge ms | ref block ms | ref share | mmfast merge ms | mmfast block ms "
                  "| mmfast share | merge x ref | max abs diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        totals = {"rm": 0.0, "rb": 0.0, "mm": 0.0, "mb": 0.0}
        complete = True
        for shape in dict.fromkeys(r.shape for r in merges):
            rows = {r.provider: r for r in merges if r.shape == shape}
            p = next(iter(rows.values())).params
            mm_name = next((n for n in rows if n.startswith("mmfast[") and not n.endswith(":block")), None)
            rm, rb = _med(rows.get("tome-ref")), _med(rows.get("tome-ref:block"))
            mm = _med(rows.get(mm_name)) if mm_name else None
            mb = _med(rows.get(f"{mm_name}:block")) if mm_name else None
            diff = rows[mm_name].max_abs_diff if mm_name else None
            for k, v in (("rm", rm), ("rb", rb), ("mm", mm), ("mb", mb)):
                if v is None:
                    complete = False
                else:
                    totals[k] += v

            def f(v: float | None, spec: str = ".2f") -> str:
                return "-" if v is None else format(v, spec)

            lines.append(
                f"| {p['layer']} | {p['N']} | {p['r_eff']} | {f(rm)} | {f(rb)} | "
                f"{f(rm / rb * 100 if rm and rb else None, '.1f')}% | {f(mm)} | {f(mb)} | "
                f"{f(mm / mb * 100 if mm and mb else None, '.1f')}% | {f(rm / mm if rm and mm else None)} | "
                f"{'-' if diff is None else f'{diff:.1e}'} |")
        if complete and len(merges) > 4:
            lines.append(
                f"| all | | | {totals['rm']:.2f} | {totals['rb']:.2f} | {totals['rm'] / totals['rb'] * 100:.1f}% | "
                f"{totals['mm']:.2f} | {totals['mb']:.2f} | {totals['mm'] / totals['mb'] * 100:.1f}% | "
                f"{totals['rm'] / totals['mm']:.2f} | |")
        lines.append("")
    return "\n".join(lines)


def plot_tome(results: list[BenchResult], path: Path, title: str = "") -> Path:
    """Images/s per model configuration and provider (left); match+merge share of the block per layer (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax_t, ax_s = fig.subplots(1, 2)
    models = [r for r in results if r.params.get("part") == "model"]
    shapes = list(dict.fromkeys(r.shape for r in models))
    provs = list(dict.fromkeys(r.provider for r in models))
    by = {(r.shape, r.provider): r for r in models}
    width = 0.8 / max(1, len(provs))
    for i, prov in enumerate(provs):
        xs = [j + (i - (len(provs) - 1) / 2) * width for j in range(len(shapes))]
        ips = []
        for s in shapes:
            t = _med(by.get((s, prov)))
            ips.append(math.nan if t is None else by[(s, prov)].params["B"] / (t / 1e3))
        ax_t.bar(xs, ips, width, label=prov)
    ax_t.set_xticks(range(len(shapes)))
    ax_t.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
    ax_t.set_ylabel("images / s")
    merges = [r for r in results if r.params.get("part") == "merge"]
    series: dict[str, list[tuple[int, float]]] = {}
    for shape in dict.fromkeys(r.shape for r in merges):
        rows = {r.provider: r for r in merges if r.shape == shape}
        for name, r in rows.items():
            if name.endswith(":block"):
                continue
            t, tb = _med(r), _med(rows.get(f"{name}:block"))
            if t and tb:
                series.setdefault(name, []).append((r.params["layer"], 100 * t / tb))
    for name, pts in series.items():
        ax_s.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax_s.set_xlabel("layer")
    ax_s.set_ylabel("match+merge / block time (%)")
    for ax in (ax_t, ax_s):
        ax.grid(True, alpha=0.3)
        if ax.lines or ax.patches:
            ax.legend(fontsize=8)
    return save_figure(fig, path, title)
