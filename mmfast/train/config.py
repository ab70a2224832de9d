"""Command line and configuration of the reference trainer (``python -m mmfast.train --help``)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

__all__ = ["ConfigError", "RESUME_MUTABLE", "TrainConfig", "build_parser", "parse_args", "validate"]


class ConfigError(ValueError):
    """A bad option value, reported before training starts."""


@dataclass
class TrainConfig:
    """Every option of a run (``config.json`` in the run folder); the CLI flags are these names with dashes."""

    # data
    train_data: str | None = None
    val_data: str | None = None
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str | None = None
    val_fraction: float = 0.1
    synthetic_train: int = 8192
    synthetic_val: int = 500
    synthetic_two_group_prob: float = 0.8
    vocab_size: int = 8192
    context_length: int = 0
    # image tower
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    window_size: int = 4
    shift: bool = True
    global_blocks: int = 2
    tome_r: int = 8
    # text tower
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 4
    text_bidirectional: bool = False
    embed_dim: int = 128
    # loss and optimisation
    loss: str = "clip"
    labels: str = "none"
    group_size: int | None = None
    steps: int = 120
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int | None = None
    grad_clip: float = 1.0
    seed: int = 0
    # run
    out: str | None = None
    resume: str | None = None
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    device: str = "auto"
    threads: int = 0
    progress: str = "auto"
    baseline: bool = False
    compare: int = 0
    deterministic: bool = True
    memory: bool = True
    plot: bool = True

    def to_dict(self) -> dict:
        """A JSON-able copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}")
        return cls(**d)


#: Options that a resumed run may change; every other option comes from the checkpoint.
RESUME_MUTABLE = frozenset({
    "steps", "out", "resume", "log_every", "eval_every", "save_every", "keep_checkpoints", "device",
    "threads", "progress", "memory", "plot", "group_size",
})


def _separator(text: str) -> str:
    return {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(text, text)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags and options whose default is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; defaults are :class:`TrainConfig`'s."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="mmfast-train",
        description="Reference CLIP/SigLIP trainer on mmfast's fused ops. With no arguments it trains a small "
                    "CLIP on a procedural shapes dataset in a few minutes on a CPU.",
        formatter_class=_Formatter)
    g = p.add_argument_group("data")
    g.add_argument("--train-data", default=d.train_data,
                   help="CSV file (open_clip format) or folder of images with .txt captions; "
                        "default: the built-in procedural shapes dataset")
    g.add_argument("--val-data", default=d.val_data,
                   help="held-out CSV/folder for retrieval; default: --val-fraction of --train-data")
    g.add_argument("--csv-img-key", default=d.csv_img_key, help="CSV column of the image paths")
    g.add_argument("--csv-caption-key", default=d.csv_caption_key, help="CSV column of the captions")
    g.add_argument("--csv-separator", type=_separator, default=d.csv_separator,
                   help="one character ('\\t' accepted); default: tab if the header line has one, else comma")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of --train-data held out when there is no --val-data")
    g.add_argument("--synthetic-train", type=int, default=d.synthetic_train, help="procedural training scenes")
    g.add_argument("--synthetic-val", type=int, default=d.synthetic_val,
                   help="procedural held-out scenes (distinct captions)")
    g.add_argument("--synthetic-two-group-prob", type=float, default=d.synthetic_two_group_prob,
                   help="share of procedural scenes with two groups; 0: one group each, 180 distinct captions "
                        "(many duplicates in a batch)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size, help="most frequent training words kept")
    g.add_argument("--context-length", type=int, default=d.context_length,
                   help="text tokens; 0: the longest training caption, at most 77")
    g = p.add_argument_group("image tower")
    g.add_argument("--image-size", type=int, default=d.image_size, help="image side, in pixels")
    g.add_argument("--patch-size", type=int, default=d.patch_size, help="patch side, in pixels")
    g.add_argument("--width", type=int, default=d.width, help="ViT width")
    g.add_argument("--depth", type=int, default=d.depth, help="blocks, window blocks first")
    g.add_argument("--heads", type=int, default=d.heads, help="ViT attention heads")
    g.add_argument("--mlp-ratio", type=float, default=d.mlp_ratio, help="MLP hidden size / width (both towers)")
    g.add_argument("--window-size", type=int, default=d.window_size, help="window side, in patches")
    g.add_argument("--no-shift", dest="shift", action="store_false",
                   help="no shifted windows (by default every second window block rolls by half a window)")
    g.add_argument("--global-blocks", type=int, default=d.global_blocks,
                   help="last blocks that attend globally (with ToMe)")
    g.add_argument("--tome-r", type=int, default=d.tome_r, help="tokens merged in each global block")
    g = p.add_argument_group("text tower")
    g.add_argument("--text-width", type=int, default=d.text_width, help="text transformer width")
    g.add_argument("--text-depth", type=int, default=d.text_depth, help="text transformer blocks")
    g.add_argument("--text-heads", type=int, default=d.text_heads, help="text attention heads")
    g.add_argument("--text-bidirectional", action="store_true", help="bidirectional instead of causal")
    g.add_argument("--embed-dim", type=int, default=d.embed_dim, help="shared embedding size")
    g = p.add_argument_group("loss and optimisation")
    g.add_argument("--loss", choices=("clip", "siglip"), default=d.loss,
                   help="mmfast.ClipLoss or mmfast.SigLipLoss (open_clip's with --baseline)")
    g.add_argument("--labels", choices=("none", "caption", "class"), default=d.labels,
                   help="contrastive labels: none (each pair its own positive), caption (identical captions in "
                        "the global batch are positives of each other), class (the procedural scenes' shape and "
                        "colour class)")
    g.add_argument("--group-size", type=int, default=d.group_size,
                   help="ranks per all-gather group of the distributed loss (default: ranks per node)")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="GLOBAL batch (split over the ranks)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of the weight matrices")
    g.add_argument("--warmup", type=int, default=d.warmup,
                   help="linear warm-up steps, then cosine decay to 0; default: 8%% of --steps")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0: off")
    g.add_argument("--seed", type=int, default=d.seed, help="initial weights, data and data order")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="run folder (default: runs/<timestamp>)")
    g.add_argument("--resume", default=d.resume,
                   help="checkpoint file, run folder, or 'auto' (latest checkpoint in --out, if any)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics.jsonl lines")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="0: steps / 5")
    g.add_argument("--save-every", type=int, default=d.save_every, help="0: = --eval-every")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest checkpoints kept")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda")
    g.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads; 0: auto (fewer when the machine is already busy)")
    g.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default=d.progress,
                   help="progress on stderr: a bar on a terminal, a line per log step otherwise")
    g.add_argument("--baseline", action="store_true",
                   help="pure-torch reference ops (mmfast.reference) and open_clip's loss")
    g.add_argument("--compare", type=int, default=d.compare, metavar="N",
                   help="time N steps of mmfast and of the baseline back to back and print the ratios")
    g.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="do not call torch.use_deterministic_algorithms")
    g.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement of one step")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="skip curves.png")
    return p


def parse_args(argv: list[str] | None) -> tuple[TrainConfig, set[str]]:
    """The config and the set of option names given explicitly on the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # a second pass with every default suppressed tells which options were given
    explicit = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                kwargs["action"] = "store_const"
                kwargs["const"] = action.const
            else:
                kwargs["type"] = action.type
            explicit.add_argument(*action.option_strings, **kwargs)
    given = set(vars(explicit.parse_known_args(argv)[0]))
    return TrainConfig(**vars(args)), given


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` for any inconsistent value (``world_size``: number of processes)."""
    pos = {"steps": cfg.steps, "batch_size": cfg.batch_size, "image_size": cfg.image_size,
           "patch_size": cfg.patch_size, "width": cfg.width, "depth": cfg.depth, "heads": cfg.heads,
           "window_size": cfg.window_size, "text_width": cfg.text_width, "text_depth": cfg.text_depth,
           "text_heads": cfg.text_heads, "embed_dim": cfg.embed_dim, "log_every": cfg.log_every,
           "keep_checkpoints": cfg.keep_checkpoints, "vocab_size": cfg.vocab_size}
    for name, v in pos.items():
        _check(v >= 1, f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("eval_every", "save_every", "threads", "compare", "tome_r", "global_blocks",
                 "context_length"):
        v = getattr(cfg, name)
        _check(v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
    for name in ("lr", "mlp_ratio"):
        v = getattr(cfg, name)
        _check(math.isfinite(v) and v > 0, f"--{name.replace('_', '-')} must be a positive number, got {v}")
    for name in ("weight_decay", "grad_clip"):
        v = getattr(cfg, name)
        _check(math.isfinite(v) and v >= 0, f"--{name.replace('_', '-')} must be >= 0, got {v}")
    _check(cfg.loss in ("clip", "siglip"), f"--loss must be clip or siglip, got {cfg.loss!r}")
    if cfg.warmup is not None:
        _check(cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}")
        _check(cfg.warmup <= cfg.steps, f"--warmup {cfg.warmup} is longer than --steps {cfg.steps}")
    _check(world_size >= 1, f"world size must be >= 1, got {world_size}")
    _check(cfg.batch_size % world_size == 0,
           f"--batch-size {cfg.batch_size} is not divisible by the world size {world_size}: it is the GLOBAL "
           f"batch, split evenly over the {world_size} processes")
    if cfg.group_size is not None:
        _check(cfg.group_size >= 1 and world_size % cfg.group_size == 0,
               f"--group-size {cfg.group_size} must be a positive divisor of the world size {world_size}")
    # image tower geometry
    _check(cfg.image_size % cfg.patch_size == 0,
           f"--patch-size {cfg.patch_size} does not divide --image-size {cfg.image_size}")
    grid = cfg.image_size // cfg.patch_size
    _check(cfg.window_size <= grid,
           f"--window-size {cfg.window_size} is larger than the {grid} x {grid} patch grid "
           f"(image {cfg.image_size} / patch {cfg.patch_size})")
    _check(grid % cfg.window_size == 0,
           f"--window-size {cfg.window_size} does not divide the {grid} x {grid} patch grid "
           f"(image {cfg.image_size} / patch {cfg.patch_size})")
    window_blocks = cfg.depth - cfg.global_blocks
    _check(cfg.global_blocks <= cfg.depth, f"--global-blocks {cfg.global_blocks} exceeds --depth {cfg.depth}")
    _check(not (cfg.shift and window_blocks >= 2 and cfg.window_size < 2),
           "--window-size 1 cannot be shifted by half a window; pass --no-shift or a larger window")
    if cfg.tome_r > 0:
        _check(cfg.global_blocks > 0,
               f"--tome-r {cfg.tome_r} merges tokens in the global blocks, but --global-blocks is 0")
        _check(cfg.tome_r <= grid * grid // 2,
               f"--tome-r {cfg.tome_r} exceeds half of the {grid * grid} image tokens")
    _check(cfg.width % cfg.heads == 0, f"--width {cfg.width} is not divisible by --heads {cfg.heads}")
    _check(cfg.text_width % cfg.text_heads == 0,
           f"--text-width {cfg.text_width} is not divisible by --text-heads {cfg.text_heads}")
    _check(cfg.context_length == 0 or cfg.context_length >= 3,
           f"--context-length must be 0 (auto) or >= 3, got {cfg.context_length}")
    # data
    if cfg.train_data is None:
        _check(cfg.image_size % 4 == 0 and cfg.image_size >= 16,
               f"the procedural dataset needs --image-size a multiple of 4 and >= 16, got {cfg.image_size}")
        _check(cfg.synthetic_train >= cfg.batch_size,
               f"--synthetic-train {cfg.synthetic_train} is smaller than --batch-size {cfg.batch_size}")
        _check(cfg.synthetic_val >= 2, f"--synthetic-val must be >= 2, got {cfg.synthetic_val}")
        _check(0.0 <= cfg.synthetic_two_group_prob <= 1.0,
               f"--synthetic-two-group-prob must be in [0, 1], got {cfg.synthetic_two_group_prob}")
    else:
        _check(os.path.exists(cfg.train_data), f"--train-data {cfg.train_data}: no such file or folder")
        if cfg.val_data is None:
            _check(0 < cfg.val_fraction < 1, f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.val_data is not None:
        _check(os.path.exists(cfg.val_data), f"--val-data {cfg.val_data}: no such file or folder")
    if cfg.csv_separator is not None:
        _check(len(cfg.csv_separator) == 1, f"--csv-separator must be one character, got {cfg.csv_separator!r}")
    _check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
           f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    _check(cfg.progress in ("auto", "bar", "lines", "none"), f"bad --progress {cfg.progress!r}")
    _check(not (cfg.compare and cfg.resume), "--compare cannot be combined with --resume")
    _check(cfg.labels in ("none", "caption", "class"), f"--labels must be none, caption or class, got {cfg.labels!r}")
    _check(cfg.labels == "none" or not (cfg.baseline or cfg.compare),
           f"--labels {cfg.labels}: the baseline (open_clip's loss) takes no labels; drop --baseline / --compare")
    _check(cfg.labels != "class" or cfg.train_data is None,
           "--labels class needs the procedural dataset (image-text files carry no classes): use --labels caption")
    _check(not (cfg.resume == "auto" and cfg.out is None), "--resume auto needs --out (the run folder to look in)")
    if cfg.resume not in (None, "auto"):
        _check(os.path.exists(cfg.resume), f"--resume {cfg.resume}: no such checkpoint file or run folder")
