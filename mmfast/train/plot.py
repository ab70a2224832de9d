"""``curves.png``: training loss and held-out retrieval against chance (matplotlib, Agg, no pyplot)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(history: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Draw the ``train`` and ``eval`` records of ``history``; None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    train = [r for r in history if r.get("type") == "train"]
    evals = [r for r in history if r.get("type") == "eval"]
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_ret = fig.subplots(1, 2)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    if evals:
        steps = [r["step"] for r in evals]
        for key, label, style in (("i2t_r1", "image->text R@1", "-"), ("i2t_r5", "image->text R@5", "-"),
                                  ("t2i_r1", "text->image R@1", "--"), ("t2i_r5", "text->image R@5", "--")):
            ax_ret.plot(steps, [100 * r[key] for r in evals], style, marker="o", ms=3, label=label)
        for k, color in ((1, "grey"), (5, "black")):
            ax_ret.axhline(100 * evals[-1][f"chance_r{k}"], color=color, ls=":", lw=1, label=f"chance R@{k}")
        ax_ret.legend(fontsize=8)
    ax_ret.set_xlabel("step")
    ax_ret.set_ylabel("recall (%)")
    ax_ret.set_title(f"held-out retrieval (N={evals[-1]['n']})" if evals else "held-out retrieval")
    ax_ret.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
