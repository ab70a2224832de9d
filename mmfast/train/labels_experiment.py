"""``python -m mmfast.train.labels_experiment``: held-out retrieval with and without ``--labels`` on a
procedural dataset with many duplicate captions (docs/labels.md).

Every scene is one group of shapes (``--synthetic-two-group-prob 0``), so the training set has at most
180 distinct captions and 30% of the rows of a 64-sample batch share their caption with
another row. Without labels those pairs are negatives of each other; with ``--labels caption`` (or
``--kind class``: the scenes' shape and colour class) they are positives. Both arms train the same
model from the same seed on the same batches; each seed is one run per arm. Writes
``<out>/labels_experiment_<loss>_<kind>.json`` (every evaluation of every run), ``.md`` (the final
numbers) and ``.png`` (held-out R@1 and R@5 against the step, mean over seeds with the min-max band).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmfast.bench.report import cpu_model, save_figure
from mmfast.train import main as train_main


def _evals(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "eval"]


def run(out: Path, seeds: list[int], steps: int, batch: int, loss: str, kind: str, extra: list[str]) -> dict:
    common = ["--synthetic-two-group-prob", "0", "--synthetic-val", "150", "--steps", str(steps),
              "--batch-size", str(batch), "--eval-every", str(max(1, steps // 5)), "--loss", loss,
              "--progress", "lines", "--no-plot", "--no-memory", *extra]
    results: dict = {"cpu": cpu_model(), "args": common, "loss": loss, "kind": kind, "runs": {}}
    arms = {"no labels": [], f"labels={kind}": ["--labels", kind]}
    for arm, flags in arms.items():
        for seed in seeds:
            folder = out / "runs" / f"{loss}_{kind}_{arm.replace(' ', '_').replace('=', '-')}_seed{seed}"
            print(f"== {arm}, seed {seed} -> {folder}", flush=True)
            code = train_main([*common, *flags, "--seed", str(seed), "--out", str(folder)])
            if code != 0:
                raise SystemExit(f"the {arm} run of seed {seed} failed (exit {code}); see {folder}")
            results["runs"].setdefault(arm, {})[seed] = _evals(folder)
    return results


def _mean_r1(e: dict) -> float:
    return 50.0 * (e["i2t_r1"] + e["t2i_r1"])


def _mean_r5(e: dict) -> float:
    return 50.0 * (e["i2t_r5"] + e["t2i_r5"])


def write_outputs(results: dict, out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    stem = f"labels_experiment_{results['loss']}_{results['kind']}"
    js = out / f"{stem}.json"
    js.write_text(json.dumps(results, indent=1))
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    lines = [f"# Held-out retrieval with and without labels ({results['loss']}, labels={results['kind']})", "",
             f"CPU: {results['cpu']}. Trainer arguments: `{' '.join(results['args'])}`, one run per seed and arm.",
             "", "| arm | seed | final R@1 (mean of both directions) | final R@5 | i2t R@1 | t2i R@1 |",
             "|---|---|---|---|---|---|"]
    for arm, by_seed in results["runs"].items():
        seeds = sorted(by_seed, key=int)
        steps = [e["step"] for e in by_seed[seeds[0]]]
        for ax, metric in zip(axes, (_mean_r1, _mean_r5)):
            vals = [[metric(e) for e in by_seed[s]] for s in seeds]
            mean = [sum(v) / len(v) for v in zip(*vals)]
            ax.plot(steps, mean, marker="o", label=arm)
            ax.fill_between(steps, [min(v) for v in zip(*vals)], [max(v) for v in zip(*vals)], alpha=0.2)
        for s in seeds:
            last = by_seed[s][-1]
            lines.append(f"| {arm} | {s} | {_mean_r1(last):.1f}% | {_mean_r5(last):.1f}% | "
                         f"{100 * last['i2t_r1']:.1f}% | {100 * last['t2i_r1']:.1f}% |")
    chance = next(iter(next(iter(results["runs"].values())).values()))[-1]["chance_r1"] * 100
    for ax, name in zip(axes, ("R@1", "R@5")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out {name} (%), both directions' mean")
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].axhline(chance, color="grey", ls=":", lw=1)
    seeds = sorted(next(iter(results["runs"].values())), key=int)
    png = save_figure(fig, out / f"{stem}.png", f"{results['loss']}: duplicates as negatives (no labels) or "
                      f"positives (labels={results['kind']}); mean over {len(seeds)} seeds, band: min-max")
    md = out / f"{stem}.md"
    md.write_text("\n".join(lines) + f"\n\nchance R@1: {chance:.1f}%\n")
    return [js, md, png]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmfast.train.labels_experiment", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/labels_experiment", help="folder of the runs and the outputs")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (one run per seed and arm)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--loss", choices=("clip", "siglip"), default="siglip")
    p.add_argument("--kind", choices=("caption", "class"), default="caption", help="the labelled arm's --labels")
    args, extra = p.parse_known_args(argv)
    out = Path(args.out)
    results = run(out, [int(s) for s in args.seeds.split(",")], args.steps, args.batch_size, args.loss, args.kind,
                  extra)
    for path in write_outputs(results, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
