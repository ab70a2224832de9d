"""A small progress bar on stderr (no tqdm): step, loss, samples/s and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.3 -> '1m15s'``, ``3725 -> '1h02m'``, ``9.2 -> '9s'``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressBar:
    """``mode``: ``"bar"`` redraws one line with ``\\r`` (at most 10 times a second), ``"lines"`` prints
    one line per :meth:`update` with ``force=True`` (for logs), ``"none"`` prints nothing; ``"auto"``
    is ``"bar"`` on a terminal and ``"lines"`` otherwise."""

    def __init__(self, total: int, start: int = 0, mode: str = "auto", stream: TextIO | None = None,
                 width: int = 24):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.total, self.width = mode, total, width
        self.start_step, self.step = start, start
        self._t0 = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False

    def _line(self, loss: float | None, samples_per_s: float | None, eta_s: float | None) -> str:
        frac = self.step / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        parts = [f"step {self.step}/{self.total}", f"[{'#' * filled}{'.' * (self.width - filled)}]",
                 f"{100 * frac:3.0f}%"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if samples_per_s is not None:
            parts.append(f"{samples_per_s:.1f} samples/s")
        if eta_s is not None:
            parts.append(f"ETA {format_duration(eta_s)}")
        return " | ".join([" ".join(parts[:3])] + parts[3:])

    def update(self, step: int, loss: float | None = None, samples_per_s: float | None = None,
               eta_s: float | None = None, force: bool = False) -> None:
        """Show progress at ``step`` (steps done)."""
        self.step = step
        if self.mode == "none":
            return
        now = time.perf_counter()
        if self.mode == "bar":
            if not force and now - self._last_draw < 0.1 and step < self.total:
                return
            self._last_draw = now
            self.stream.write("\r" + self._line(loss, samples_per_s, eta_s) + "\033[K")
            self._drawn = True
        elif force:
            self.stream.write(self._line(loss, samples_per_s, eta_s) + "\n")
        self.stream.flush()

    def write(self, message: str, out: TextIO | None = None) -> None:
        """Print ``message`` on ``out`` (default stdout) on its own line(s) without breaking the bar."""
        if self.mode == "bar" and self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
        out = out or sys.stdout
        out.write(message + "\n")
        out.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.mode == "bar" and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
