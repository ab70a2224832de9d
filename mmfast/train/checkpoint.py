"""Atomic checkpoints and the RNG state of a run.

A checkpoint is one ``torch.save`` file ``<run>/checkpoints/step_XXXXXXX.pt`` holding the model,
optimizer and scheduler states, the step, the RNG states of torch (and CUDA), numpy and Python,
the config, the tokenizer and the metrics history. It is written to a temporary file in the same
folder, flushed and fsync'ed, then renamed over the final name with ``os.replace``: a reader sees
either the old file or the complete new one, never a partial write. Only the newest
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_save", "capture_rng", "checkpoint_path", "find_latest", "load", "prune", "restore_rng"]

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/checkpoints/step_<step, 7 digits>.pt``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}.pt"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file and ``os.replace`` (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _, p in list_checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)


def load(path: str | Path) -> dict:
    """Read a checkpoint written by the trainer; a clear error for anything else."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot read the checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != "mmfast-train-checkpoint":
        raise ValueError(f"{path}: not an mmfast.train checkpoint")
    return ckpt


def capture_rng() -> dict:
    """The RNG states of torch (CPU and every CUDA device), numpy's global generator and ``random``."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
