"""Print and store benchmark results: a text table, and rows appended to ``<case>.jsonl`` / ``<case>.csv``.

Every stored row carries the provenance of its number: the device (GPU name, or the CPU model from
``/proc/cpuinfo``), the torch / triton / mmfast / open_clip versions, the git commit of the checkout
(and whether it had local changes), the date (UTC, ISO 8601), the host and the exact command line.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmfast.bench.harness import BenchResult

__all__ = [
    "csv_list",
    "save_figure",
    "short_dtype",
    "write_summary_and_figure",
    "CSV_FIELDS",
    "cpu_model",
    "write_csv",
    "default_out_dir",
    "environment",
    "format_bytes",
    "format_table",
    "git_commit",
    "write_results",
]

#: Columns of the CSV files, in order (``params`` and ``collectives`` are JSON strings there).
CSV_FIELDS: tuple[str, ...] = (
    "date",
    "case",
    "shape",
    "params",
    "provider",
    "baseline",
    "device",
    "device_name",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "iqr_ms",
    "min_ms",
    "max_ms",
    "mean_ms",
    "repeats",
    "number",
    "ratio",
    "peak_extra_bytes",
    "net_bytes",
    "memory_method",
    "sent_bytes",
    "collective_calls",
    "collectives",
    "max_abs_diff",
    "error",
    "torch_version",
    "triton_version",
    "mmfast_version",
    "open_clip_version",
    "cuda_version",
    "python_version",
    "num_threads",
    "git_commit",
    "git_dirty",
    "hostname",
    "command",
)


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """Human name of ``device``: the GPU's name for CUDA, the CPU model (and core count) for CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_model()} ({os.cpu_count()} logical cores)"


def git_commit(path: str | os.PathLike[str] | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout holding ``path`` (default: mmfast's source); Nones if none."""
    where = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return commit or None, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def _version(module: str, *dists: str) -> str | None:
    """Version of an installed package from its metadata (no import), else of the loaded module."""
    from importlib import metadata

    for dist in dists or (module,):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None) if mod is not None else None


def _mmfast_version() -> str:
    import mmfast

    return mmfast.__version__


def command_line() -> str:
    """The exact command line of this process (``sys.orig_argv``: ``python -m mmfast.bench ...``)."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return shlex.join(argv)


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Provenance fields stored with every row (see the module docstring)."""
    commit, dirty = git_commit()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": _version("triton", "triton", "pytorch-triton"),
        "mmfast_version": _mmfast_version(),
        "open_clip_version": _version("open_clip", "open_clip_torch"),
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "num_threads": torch.get_num_threads(),
        "git_commit": commit,
        "git_dirty": dirty,
        "hostname": platform.node(),
        "command": command_line(),
    }


def write_csv(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` (dicts with the keys of the first) as a CSV file, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def default_out_dir() -> Path:
    """``benchmarks/results`` of the source checkout mmfast runs from, else of the current directory."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


def format_bytes(n: float | None, unit: str = "MB") -> str:
    """``n`` bytes in MiB (``MB``) or as a short human string (``auto``); ``-`` for None."""
    if n is None:
        return "-"
    if unit == "MB":
        return f"{n / 2**20:.1f}"
    for u, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {u}"
    return f"{int(n)} B"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(results: Sequence[BenchResult]) -> str:
    """Text table: case, shape, provider, median ms, spread (IQR and min-max), ratio, peak MB, bytes sent."""
    header = (
        "case",
        "shape",
        "provider",
        "median ms",
        "IQR ms",
        "min-max ms",
        "x vs base",
        "peak+ MB",
        "sent",
        "max|diff|",
    )
    rows: list[tuple[str, ...]] = []
    for r in results:
        t = r.timing
        if r.error and t is None:
            rows.append((r.case, r.shape, r.provider, "FAILED", r.error[:60], "", "", "", "", ""))
            continue
        rows.append(
            (
                r.case,
                r.shape,
                r.provider + (" (base)" if r.provider == r.baseline else ""),
                _fmt(t.median_ms if t else None, ".3f"),
                _fmt(t.iqr_ms if t else None, ".3f"),
                f"{t.min_ms:.3f}-{t.max_ms:.3f}" if t else "-",
                _fmt(r.ratio, ".2f"),
                format_bytes(r.peak_extra_bytes),
                format_bytes(r.sent_bytes, "auto"),
                _fmt(r.max_abs_diff, ".1e"),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    errs = [r for r in results if r.error]
    for r in errs:
        lines.append(f"! {r.case} [{r.shape}] {r.provider}: {r.error}")
    return "\n".join(lines)


def result_rows(results: Iterable[BenchResult], env: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each result as a flat dict merged with the environment fields (the JSON row)."""
    return [{**r.to_dict(), **env} for r in results]


def write_results(
    results: Sequence[BenchResult],
    out_dir: str | os.PathLike[str],
    env: Mapping[str, Any] | None = None,
    *,
    stem: str | None = None,
) -> tuple[Path, Path]:
    """Append the rows to ``<out_dir>/<stem>.jsonl`` (one JSON object a line) and ``<stem>.csv``.

    ``stem`` defaults to the case name of the first result. The CSV gets its header when the file is
    new; its columns are :data:`CSV_FIELDS`. Returns the two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if env is None:
        env = environment(results[0].device if results else "cpu")
    stem = stem or (results[0].case if results else "bench")
    rows = result_rows(results, env)
    jpath, cpath = out / f"{stem}.jsonl", out / f"{stem}.csv"
    with open(jpath, "a") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    new = not cpath.exists() or cpath.stat().st_size == 0
    with open(cpath, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        if new:
            w.writeheader()
        for row in rows:
            flat = dict(row)
            for k in ("params", "collectives"):
                flat[k] = json.dumps(flat.get(k), default=str, sort_keys=True)
            w.writerow(flat)
    return jpath, cpath


def csv_list(kind: type, text: str | None) -> list[Any]:
    """``"1, 2,4"`` -> ``[kind("1"), kind("2"), kind("4")]`` (a command-line list; None or "" -> [])."""
    return [kind(x) for x in str(text or "").replace(" ", "").split(",") if x]


def save_figure(fig: Any, path: Path, title: str) -> Path:
    """Title, lay out and write a matplotlib figure to ``path`` (parents made); returns the path."""
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def short_dtype(name: str) -> str:
    """A dtype name as the configuration texts write it: fp32, bf16, fp16 (any other name as it is)."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name)


def write_summary_and_figure(case: str, results: Sequence[BenchResult], out_dir: str | os.PathLike[str], opts: Any,
                             summary: Callable[..., str], summary_title: str,
                             figure: Callable[..., Path], figure_title: str) -> list[Path]:
    """A case's ``finalize``: ``summary(results, title)`` to ``<out>/<case>_summary_<tag>.md`` and
    ``figure(results, path, title=...)`` to ``<out>/<case>_<tag>.png`` (``tag``: the device type,
    ``_quick`` added for ``--quick``; ``{device}`` in the titles is the device type); returns
    ``[png, md]``, or nothing with ``--no-plot`` or no results."""
    if getattr(opts, "no_plot", False) or not results:
        return []
    device = torch.device(results[0].device).type
    tag = f"{device}{'_quick' if getattr(opts, 'quick', False) else ''}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{case}_summary_{tag}.md"
    md.write_text(summary(results, summary_title.format(device=device)))
    png = figure(results, out / f"{case}_{tag}.png", title=figure_title.format(device=device))
    return [png, md]
