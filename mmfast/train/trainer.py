"""The training loop of ``python -m mmfast.train`` (see :mod:`mmfast.train.__main__` for the user guide)."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmfast.train import checkpoint as ckpt_io
from mmfast.train.config import RESUME_MUTABLE, ConfigError, TrainConfig, validate
from mmfast.train.data import EpochSampler, ShapesDataset, batch_labels, load_path, split_train_val
from mmfast.train.distenv import DistEnv, init_distributed, pick_threads
from mmfast.train.evaluate import encode_dataset, format_retrieval, retrieval_metrics
from mmfast.train.model import FUSED_OPS, REFERENCE_OPS, build_model, fused_ops_status
from mmfast.train.progress import ProgressBar, format_duration
from mmfast.train.tokenizer import Tokenizer

__all__ = ["Diverged", "Interrupted", "train"]


class Diverged(RuntimeError):
    """The loss (or the weights) became NaN/inf; the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved; ``signum`` says which signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------------------------------
# signals


class StopFlag:
    """SIGINT/SIGTERM handlers that ask the loop to checkpoint and stop after the current step; a
    second signal aborts at once."""

    def __init__(self, say):
        self.signum: int | None = None
        self._say = say
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        self._say(f"received {signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(send it again to abort without saving)")

    def install(self) -> None:
        """Install the handlers (only possible in the main thread; elsewhere signals are left alone)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                return

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# ----------------------------------------------------------------------------------------------------
# setup


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint file ``--resume`` names (None: ``auto`` found nothing)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        return ckpt_io.find_latest(cfg.out)
    p = Path(cfg.resume)
    if p.is_dir():
        latest = ckpt_io.find_latest(p)
        if latest is None:
            raise ConfigError(f"--resume {p}: the folder has no checkpoints/step_*.pt")
        return latest
    return p


def merge_resume_config(saved: dict, cli: TrainConfig, given: set[str], path: Path) -> TrainConfig:
    """The checkpoint's config, with the explicitly given options of :data:`RESUME_MUTABLE` applied;
    any other explicitly given option must equal the saved value."""
    cfg = TrainConfig.from_dict(saved)
    for name in sorted(given):
        new = getattr(cli, name)
        if name in RESUME_MUTABLE:
            setattr(cfg, name, new)
        elif new != getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} {new} differs from the checkpoint's value "
                              f"{getattr(cfg, name)!r} ({path}); a resumed run keeps the model, data and "
                              f"optimisation settings (it may change: "
                              f"{', '.join('--' + n.replace('_', '-') for n in sorted(RESUME_MUTABLE))})")
    if "out" not in given:
        cfg.out = str(path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    cfg.resume = str(path)
    return cfg


def build_datasets(cfg: TrainConfig):
    """``(train, held_out)`` datasets of ``cfg``."""
    if cfg.train_data is None:
        p = cfg.synthetic_two_group_prob
        return (ShapesDataset(cfg.synthetic_train, cfg.image_size, cfg.seed, "train", two_group_prob=p),
                ShapesDataset(cfg.synthetic_val, cfg.image_size, cfg.seed, "val", two_group_prob=p))
    train = load_path(cfg.train_data, cfg.image_size, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
    if cfg.val_data is not None:
        val = load_path(cfg.val_data, cfg.image_size, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator)
        return train, val
    return split_train_val(train, cfg.val_fraction, cfg.seed)


def build_loss(cfg: TrainConfig, env: DistEnv, baseline: bool):
    """mmfast's ClipLoss/SigLipLoss, or open_clip's for the baseline; distributed when W > 1 (local
    loss with gradients through the gather: the mean over ranks is the global loss)."""
    w, r = env.world_size, env.rank
    if baseline:
        from open_clip.loss import ClipLoss, SigLipLoss

        if cfg.loss == "clip":
            return ClipLoss(local_loss=w > 1, gather_with_grad=w > 1, rank=r, world_size=w)
        return SigLipLoss(rank=r, world_size=w)
    import mmfast

    if cfg.loss == "clip":
        return mmfast.ClipLoss(local_loss=w > 1, gather_with_grad=w > 1, rank=r, world_size=w,
                               group_size=cfg.group_size)
    return mmfast.SigLipLoss(rank=r, world_size=w, group_size=cfg.group_size)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices only (no biases, norms, embeddings of positions, logit scale/bias)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "pos_embed" in name or "rel_pos_bias" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, steps: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class Run:
    """Everything a loop needs."""

    cfg: TrainConfig
    env: DistEnv
    train_ds: object
    val_ds: object
    tokenizer: Tokenizer
    model: torch.nn.Module  # the CLIP (unwrapped)
    ddp: torch.nn.Module  # what is called in the loop (DDP wrapper or the model)
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: EpochSampler


def build_run(cfg: TrainConfig, env: DistEnv, train_ds, val_ds, tokenizer: Tokenizer, baseline: bool) -> Run:
    """Seed, build the model, wrap it for DDP, build the loss, optimizer and schedule."""
    seed_everything(cfg.seed)
    ops = REFERENCE_OPS if baseline else FUSED_OPS
    model = build_model(cfg, tokenizer.vocab_size, cfg.context_length, Tokenizer.pad_id, Tokenizer.eos_id, ops)
    model.to(env.device)
    ddp = model
    if env.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, cfg.steps))
    sampler = EpochSampler(len(train_ds), cfg.batch_size, cfg.seed)
    return Run(cfg, env, train_ds, val_ds, tokenizer, model, ddp, build_loss(cfg, env, baseline), optimizer,
               scheduler, sampler)


def load_batch(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's images, tokens and labels (``--labels``; None for ``none``) of ``step``, on the device."""
    idx = run.sampler.shard(step, run.env.rank, run.env.world_size)
    images, captions = run.train_ds.batch(idx)
    tokens = run.tokenizer(captions, run.cfg.context_length)
    labels = batch_labels(run.train_ds, idx, run.cfg.labels)
    dev = run.env.device
    return (images.to(dev, non_blocking=True), tokens.to(dev, non_blocking=True),
            None if labels is None else labels.to(dev, non_blocking=True))


def compute_loss(run: Run, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Forward of both towers and the contrastive loss (this rank's value)."""
    image_features, text_features, scale, bias = run.ddp(images, tokens)
    if labels is None:
        loss = run.loss_fn(image_features, text_features, scale, bias)
    else:
        loss = run.loss_fn(image_features, text_features, scale, bias, labels=labels)
    return loss["contrastive_loss"] if isinstance(loss, dict) else loss


def reduce_stats(run: Run, loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """The mean loss over ranks (= the global-batch loss) and whether any rank wants to stop."""
    stats = torch.stack([loss.detach().float().reshape(()),
                         torch.tensor(float(stop), device=loss.device)])
    if run.env.world_size > 1:
        dist.all_reduce(stats)
        stats[0] /= run.env.world_size
    mean_loss, stop_count = stats.tolist()
    return mean_loss, stop_count > 0


def optimizer_step(run: Run, loss: torch.Tensor) -> None:
    """Backward (DDP averages the gradients), clip, AdamW step, schedule, clamp the logit scale."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.model.clamp_logit_scale()


def measure_step_memory(run: Run) -> dict:
    """Peak extra memory of one forward + backward (no optimizer step; gradients cleared after).

    ``mmfast.bench.memory.peak_extra_memory`` (CPU profiler / CUDA allocator) when available, plus
    the process's max RSS from ``getrusage``. Collective: every rank must call it.
    """
    images, tokens, labels = load_batch(run, 0)

    def fwd_bwd():
        compute_loss(run, images, tokens, labels).backward()

    out: dict = {}
    try:
        from mmfast.bench.memory import peak_extra_memory
    except ImportError:
        fwd_bwd()
        out["method"] = "getrusage"
    else:
        stats = peak_extra_memory(fwd_bwd, run.env.device)
        out["peak_step_memory_mb"] = stats.peak_extra_bytes / 2**20
        out["method"] = stats.method
    run.optimizer.zero_grad(set_to_none=True)
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def params_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite (checked before a checkpoint is written)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# the run folder


class RunFolder:
    """config.json, tokenizer.json, metrics.jsonl, checkpoints/, curves.png, summary.json (rank 0 only)."""

    def __init__(self, path: Path, active: bool):
        self.path, self.active = path, active
        self._metrics = None

    def start(self, cfg: TrainConfig, tokenizer: Tokenizer, history: list[dict]) -> None:
        """Create the folder, write config.json and tokenizer.json, start metrics.jsonl with ``history``."""
        if not self.active:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
        tokenizer.save(self.path / "tokenizer.json")
        self._metrics = open(self.path / "metrics.jsonl", "w")  # noqa: SIM115 (closed in close())
        for record in history:
            self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def log(self, record: dict) -> None:
        """Append one line to metrics.jsonl (flushed)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()

    def write_json(self, name: str, obj: dict) -> None:
        """Write ``obj`` to ``<run>/<name>``."""
        if self.active:
            (self.path / name).write_text(json.dumps(obj, indent=1) + "\n")

    def close(self) -> None:
        """Close metrics.jsonl."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def default_out(prefix: str = "") -> str:
    """``runs/<prefix><YYYYmmdd-HHMMSS>``."""
    return str(Path("runs") / f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}")


# ----------------------------------------------------------------------------------------------------
# training


def prepare(cfg: TrainConfig, given: set[str], env: DistEnv):
    """Resolve resume, the datasets, the tokenizer and the auto values of ``cfg``; returns
    ``(cfg, checkpoint or None, train_ds, val_ds, tokenizer)``."""
    resume_path = resolve_resume(cfg)
    ckpt = None
    if resume_path is not None:
        try:
            ckpt = ckpt_io.load(resume_path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cfg = merge_resume_config(ckpt["config"], cfg, given, resume_path)
        validate(cfg, env.world_size)
    elif cfg.resume == "auto":
        cfg.resume = None  # nothing to resume yet: a fresh run in --out
    if cfg.out is None:
        cfg.out = default_out()
    if resume_path is None and ckpt_io.find_latest(cfg.out) is not None:
        raise ConfigError(f"--out {cfg.out} already has checkpoints; pass --resume auto to continue that run "
                          "or choose another --out")
    train_ds, val_ds = build_datasets(cfg)
    if len(train_ds) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training set "
                          f"({len(train_ds)} samples)")
    if ckpt is not None:
        tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
        order = ckpt["data_order"]
        if order["n_train"] != len(train_ds):
            raise ConfigError(f"the training set has {len(train_ds)} samples but the checkpoint {resume_path} "
                              f"was trained on {order['n_train']}: the data order cannot be continued")
    else:
        tokenizer = Tokenizer.build(train_ds.captions, cfg.vocab_size)
    if cfg.context_length == 0:
        longest = max(len(tokenizer.encode(c)) for c in train_ds.captions[:20000])
        cfg.context_length = min(77, longest)
    if cfg.warmup is None:
        cfg.warmup = round(0.08 * cfg.steps)
    if cfg.eval_every == 0:
        cfg.eval_every = max(1, cfg.steps // 5)
    if cfg.save_every == 0:
        cfg.save_every = cfg.eval_every
    return cfg, ckpt, train_ds, val_ds, tokenizer


def train(cfg: TrainConfig, given: set[str] | None = None, env: DistEnv | None = None) -> dict:
    """Train (or resume) a run; returns the summary. Raises :class:`Diverged`, :class:`Interrupted`,
    :class:`ConfigError` or :class:`mmfast.train.data.DataError`."""
    env = env or init_distributed(cfg)
    validate(cfg, env.world_size)
    cfg, ckpt, train_ds, val_ds, tokenizer = prepare(cfg, given or set(), env)
    torch.set_num_threads(pick_threads(cfg, env))
    folder = RunFolder(Path(cfg.out), env.is_main)
    bar = ProgressBar(cfg.steps, mode=cfg.progress if env.is_main else "none")
    say = bar.write if env.is_main else (lambda *a, **k: None)

    run = build_run(cfg, env, train_ds, val_ds, tokenizer, cfg.baseline)
    step, history, last_ckpt = 0, [], None
    if ckpt is not None:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        step, history, last_ckpt = ckpt["step"], list(ckpt["history"]), Path(cfg.resume)
        ckpt_io.restore_rng(ckpt["rng"])
        del ckpt
    bar.start_step = bar.step = step
    folder.start(cfg, tokenizer, history)

    n_params = sum(p.numel() for p in run.model.parameters())
    impl = "baseline (mmfast.reference ops + open_clip loss)" if cfg.baseline else "mmfast"
    if env.is_main:
        ops = fused_ops_status(env.device.type)
        say(f"mmfast-train: {impl}, {cfg.loss} loss, {n_params / 1e6:.2f}M parameters, {env.world_size} "
            f"process(es) on {env.device.type}, {torch.get_num_threads()} thread(s) each, global batch "
            f"{cfg.batch_size}, {cfg.steps} steps, run folder {cfg.out}")
        say(f"data: {len(train_ds)} training / {len(val_ds)} held-out pairs ("
            f"{'procedural shapes' if cfg.train_data is None else cfg.train_data}), vocabulary "
            f"{tokenizer.vocab_size} ids, context {cfg.context_length}")
        if not cfg.baseline:
            say("ops: " + ", ".join(f"{k} -> {v}" for k, v in ops.items()))
        if step:
            say(f"resumed from {cfg.resume} at step {step}")

    def evaluate_now() -> dict | None:
        if not env.is_main:
            return None
        feats = encode_dataset(run.model, val_ds, tokenizer, cfg.context_length, env.device)
        metrics = {"type": "eval", "step": step, **retrieval_metrics(*feats)}
        history.append(metrics)
        folder.log(metrics)
        say(f"eval @ step {step}: {format_retrieval(metrics)}")
        return metrics

    def save_now() -> Path | None:
        nonlocal last_ckpt
        if not params_finite(run.model):
            raise Diverged(f"the weights are no longer finite at step {step}; not saving them. "
                           + _last_good(last_ckpt))
        if env.is_main:
            state = {
                "format": "mmfast-train-checkpoint", "version": 1, "step": step, "config": cfg.to_dict(),
                "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "rng": ckpt_io.capture_rng(),
                "tokenizer": tokenizer.to_dict(), "history": history, "world_size": env.world_size,
                "data_order": {"sampler": "epoch-permutation-v1", "seed": cfg.seed, "n_train": len(train_ds),
                               "batch_size": cfg.batch_size},
            }
            last_ckpt = ckpt_io.atomic_save(state, ckpt_io.checkpoint_path(cfg.out, step))
            ckpt_io.prune(cfg.out, cfg.keep_checkpoints)
        return last_ckpt

    stop = StopFlag(say)
    stop.install()
    old_det = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        if env.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    wall0 = time.perf_counter()
    train_time, timed_steps, ema = 0.0, 0, None
    last_eval = next((r for r in reversed(history) if r["type"] == "eval"), None)
    try:
        if step == 0:
            last_eval = evaluate_now() or last_eval
        first = True
        while step < cfg.steps:
            t0 = time.perf_counter()
            images, tokens, labels = load_batch(run, step)
            lr = run.optimizer.param_groups[0]["lr"]
            loss = compute_loss(run, images, tokens, labels)
            mean_loss, stop_now = reduce_stats(run, loss, stop.signum is not None)
            if not math.isfinite(mean_loss):
                raise Diverged(f"the loss is {mean_loss} at step {step + 1} (lr {lr:.3g}); training stopped "
                               f"before applying that step. " + _last_good(last_ckpt)
                               + " Lower --lr or raise --warmup, then resume with --resume auto.")
            optimizer_step(run, loss)
            step += 1
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            dt = time.perf_counter() - t0
            if not first:  # the first step after a (re)start pays one-time costs
                train_time += dt
                timed_steps += 1
                ema = dt if ema is None else 0.9 * ema + 0.1 * dt
            first = False
            step_time = ema or dt
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"type": "train", "step": step, "loss": mean_loss, "lr": lr,
                          "logit_scale": run.model.logit_scale.exp().item(),
                          "samples_per_s": cfg.batch_size / step_time, "time_s": time.perf_counter() - wall0}
                if run.model.logit_bias is not None:
                    record["logit_bias"] = run.model.logit_bias.item()
                history.append(record)
                folder.log(record)
            bar.update(step, mean_loss, cfg.batch_size / step_time, (cfg.steps - step) * step_time,
                       force=step % cfg.log_every == 0 or step == cfg.steps)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = evaluate_now() or last_eval
            if stop_now or step % cfg.save_every == 0 or step == cfg.steps:
                save_now()
            if stop_now:
                if env.world_size > 1:
                    dist.barrier()  # rank 0 has written the checkpoint before any rank exits
                signum = stop.signum or signal.SIGTERM  # another rank's signal
                raise Interrupted(f"interrupted at step {step}/{cfg.steps}; checkpoint {last_ckpt}; continue "
                                  f"with --resume auto --out {cfg.out}", int(signum))
        bar.close()
        summary = {"type": "summary", "impl": "baseline" if cfg.baseline else "mmfast", "steps": step,
                   "world_size": env.world_size, "threads": torch.get_num_threads(), "parameters": n_params,
                   "wall_time_s": time.perf_counter() - wall0, "train_time_s": train_time,
                   "samples_per_s": cfg.batch_size * timed_steps / train_time if train_time else None,
                   "final_loss": next((r["loss"] for r in reversed(history) if r["type"] == "train"), None),
                   "eval": last_eval, "checkpoint": str(last_ckpt) if last_ckpt else None}
        if cfg.memory:
            summary.update(measure_step_memory(run))
        history.append(summary)
        folder.log(summary)
        folder.write_json("summary.json", summary)
        if env.is_main:
            say(format_summary(summary))
        return summary
    finally:
        bar.close()
        stop.restore()
        torch.use_deterministic_algorithms(old_det)
        if env.is_main and cfg.plot and history:
            try:
                from mmfast.train.plot import plot_curves

                plot_curves(history, Path(cfg.out) / "curves.png", f"{impl}, {cfg.loss} loss")
            except Exception as e:  # a plot must never hide the run's own outcome
                print(f"mmfast-train: could not draw curves.png: {e}", file=sys.stderr)
        folder.close()


def _last_good(path: Path | None) -> str:
    if path is None:
        return "No checkpoint was written before it (the run folder keeps its metrics)."
    return f"The last good checkpoint is kept: {path}."


def format_summary(s: dict) -> str:
    """The printed run summary."""
    lines = [f"done: {s['steps']} steps in {format_duration(s['wall_time_s'])} "
             f"({s['impl']}, {s['world_size']} process(es) x {s['threads']} thread(s))"]
    if s.get("samples_per_s"):
        lines.append(f"  throughput      {s['samples_per_s']:.1f} samples/s (training steps only)")
    if s.get("peak_step_memory_mb") is not None:
        lines.append(f"  peak step mem   {s['peak_step_memory_mb']:.1f} MiB ({s['method']}, one forward+backward)")
    if s.get("max_rss_mb") is not None:
        lines.append(f"  max RSS         {s['max_rss_mb']:.0f} MiB")
    if s.get("final_loss") is not None:
        lines.append(f"  final loss      {s['final_loss']:.4f}")
    if s.get("eval"):
        lines.append(f"  held-out        {format_retrieval(s['eval'])}")
    if s.get("checkpoint"):
        lines.append(f"  checkpoint      {s['checkpoint']}")
    return "\n".join(lines)


