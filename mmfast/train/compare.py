"""``python -m mmfast.train --compare N``: mmfast and the baseline trained side by side from the same start."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from mmfast.train.config import TrainConfig, validate
from mmfast.train.distenv import DistEnv, init_distributed, pick_threads
from mmfast.train.model import fused_ops_status
from mmfast.train.progress import ProgressBar
from mmfast.train.trainer import (
    build_run,
    compute_loss,
    default_out,
    load_batch,
    measure_step_memory,
    optimizer_step,
    prepare,
    reduce_stats,
)

__all__ = ["compare", "format_compare"]


def compare(cfg: TrainConfig, env: DistEnv | None = None) -> dict:
    """``--compare N``: N training steps of mmfast, then of the baseline, from the same initial weights
    and data; prints a table of throughput, peak step memory and losses, writes ``compare.json``."""
    env = env or init_distributed(cfg)
    validate(cfg, env.world_size)
    cfg.resume = None
    if cfg.out is None:
        cfg.out = default_out("compare-")
    cfg.steps = cfg.compare
    cfg.warmup = None if cfg.warmup is None else min(cfg.warmup, cfg.steps)
    cfg, _, train_ds, val_ds, tokenizer = prepare(cfg, set(), env)
    torch.set_num_threads(pick_threads(cfg, env))
    say = print if env.is_main else (lambda *a, **k: None)
    old_det = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    results = {}
    try:
        for name, baseline in (("mmfast", False), ("baseline", True)):
            run = build_run(cfg, env, train_ds, val_ds, tokenizer, baseline)
            bar = ProgressBar(cfg.steps, mode=cfg.progress if env.is_main else "none")
            times, losses = [], []
            for step in range(cfg.steps):
                t0 = time.perf_counter()
                images, tokens, labels = load_batch(run, step)
                loss = compute_loss(run, images, tokens, labels)
                mean_loss, _ = reduce_stats(run, loss, False)
                optimizer_step(run, loss)
                if env.device.type == "cuda":
                    torch.cuda.synchronize(env.device)
                times.append(time.perf_counter() - t0)
                losses.append(mean_loss)
                bar.update(step + 1, mean_loss, cfg.batch_size / times[-1], None, force=False)
            bar.close()
            timed = times[1:] or times
            med = float(np.median(timed))
            results[name] = {"samples_per_s": cfg.batch_size * len(timed) / sum(timed), "median_step_ms": 1e3 * med,
                             "losses": losses, **(measure_step_memory(run) if cfg.memory else {})}
            del run
    finally:
        torch.use_deterministic_algorithms(old_det)
    a, b = results["mmfast"], results["baseline"]
    diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
    out = {"steps": cfg.steps, "world_size": env.world_size, "threads": torch.get_num_threads(),
           "ops": fused_ops_status(), "config": cfg.to_dict(), "mmfast": a, "baseline": b,
           "max_abs_loss_diff": diff}
    if env.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "compare.json").write_text(json.dumps(out, indent=1) + "\n")
        say(format_compare(out))
        say(f"wrote {Path(cfg.out) / 'compare.json'}")
    return out


def format_compare(out: dict) -> str:
    """The ratio table of :func:`compare`."""
    a, b = out["mmfast"], out["baseline"]
    rows = [("samples/s", a["samples_per_s"], b["samples_per_s"], "{:.1f}"),
            ("median step (ms)", a["median_step_ms"], b["median_step_ms"], "{:.1f}")]
    if a.get("peak_step_memory_mb") is not None and b.get("peak_step_memory_mb") is not None:
        rows.append(("peak step memory (MiB)", a["peak_step_memory_mb"], b["peak_step_memory_mb"], "{:.1f}"))
    rows.append(("final loss", a["losses"][-1], b["losses"][-1], "{:.5f}"))
    lines = [f"{out['steps']} steps, {out['world_size']} process(es) x {out['threads']} thread(s); "
             f"mmfast ops: " + ", ".join(f"{k} -> {v}" for k, v in out["ops"].items()),
             f"{'':24s}{'mmfast':>12s}{'baseline':>12s}{'mmfast/baseline':>18s}"]
    for label, x, y, fmt in rows:
        ratio = x / y if y else float("nan")
        lines.append(f"{label:24s}{fmt.format(x):>12s}{fmt.format(y):>12s}{ratio:>17.2f}x")
    lines.append(f"max |loss difference| over the steps: {out['max_abs_loss_diff']:.2e}")
    return "\n".join(lines)
