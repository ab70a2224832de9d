"""``python -m mmfast.bench <case> [options]`` (also ``mmfast-bench``): run a benchmark case.

Every configuration of the case is run with :func:`mmfast.bench.harness.compare` (providers side by
side in this process), printed as it finishes, and appended to ``<out>/<case>.jsonl`` and
``<out>/<case>.csv`` right away, so an interrupted run keeps what it measured. The case may then write
extra files (the contrastive cases draw memory against N). ``--list`` shows the cases; ``<case>
--help`` shows its own options.

Exit status: 0 when every provider ran, 1 when some provider failed on some configuration (its row
records the error), 2 for a usage error, an unknown case, or a case that cannot run here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mmfast.bench.cases import BenchCase, CaseUnavailable, available_cases
from mmfast.bench.harness import BenchResult, compare
from mmfast.bench.report import default_out_dir, environment, format_table, write_results

__all__ = ["build_parser", "main", "run_case"]

PROG = "python -m mmfast.bench"


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("harness options (every case)")
    g.add_argument("--quick", action="store_true", help="small shapes and few repeats (a smoke run, ~20 s)")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory the JSON/CSV rows are appended to (default {default_out_dir()})",
    )
    g.add_argument("--no-save", action="store_true", help="print only; write nothing")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    g.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per configuration (default 10; 5 quick)"
    )
    g.add_argument("--warmup", type=int, default=1, help="untimed calls per provider first (default 1)")
    g.add_argument("--min-repeats", type=int, default=3, help="rounds always run, whatever --max-time says")
    g.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="stop a configuration's rounds after this many timed seconds (default 30; 2 quick)",
    )
    g.add_argument(
        "--providers",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="comma-separated providers to run (a name, or its part before '[': mmfast)",
    )
    g.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the untimed measuring call (peak memory, bytes sent, output check)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")


def build_parser(cases: dict[str, BenchCase] | None = None) -> argparse.ArgumentParser:
    """The CLI parser: one sub-command per registered case, with the harness options and the case's own."""
    cases = available_cases() if cases is None else cases
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Time mmfast's fused kernels against their baselines (open_clip...) side by side: "
        "median and spread, ratio vs baseline, peak extra memory, bytes communicated.",
        epilog="cases: "
        + "; ".join(f"{n} ({c.description})" for n, c in cases.items())
        + f". '{PROG} <case> --help' lists a case's options.",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmark cases and exit")
    sub = parser.add_subparsers(dest="case", metavar="<case>", title="cases")
    for name, case in cases.items():
        p = sub.add_parser(name, help=case.description, description=case.description)
        _add_common(p)
        case.add_arguments(p)
    return parser


def _device(spec: str) -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CaseUnavailable(f"--device {spec}: torch {torch.__version__} sees no CUDA GPU")
    return str(dev)


def run_case(
    case: BenchCase, opts: argparse.Namespace, *, echo: bool = True
) -> tuple[list[BenchResult], list[Path]]:
    """Run every configuration of ``case`` with the CLI's options; return the results and files written."""
    device = _device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    notes = case.check(opts)
    for note in notes:
        print(note, flush=True)
    repeats = opts.repeats if opts.repeats is not None else (5 if opts.quick else 10)
    max_time = opts.max_time if opts.max_time is not None else (2.0 if opts.quick else 30.0)
    out_dir = Path(opts.out) if opts.out is not None else default_out_dir()
    env = environment(device)
    env["notes"] = notes
    if echo:
        print(
            f"# {case.name} on {env['device_name']} | torch {env['torch_version']} | mmfast "
            f"{env['mmfast_version']} | commit {(env['git_commit'] or 'none')[:12]}"
            f"{' (dirty)' if env['git_dirty'] else ''}",
            flush=True,
        )
    results: list[BenchResult] = []
    written: list[Path] = []
    configs = case.configs(device, opts.quick, opts)
    for cfg in configs:
        providers = case.providers(cfg, device, opts)
        if not providers:
            raise CaseUnavailable(f"{case.name}: no provider left to run (--providers {opts.providers})")
        baseline = case.baseline if any(p.name == case.baseline for p in providers) else None
        rows = compare(
            case.name,
            cfg,
            providers,
            baseline=baseline,
            device=device,
            shape=case.shape(cfg),
            warmup=opts.warmup,
            repeats=repeats,
            min_repeats=opts.min_repeats,
            max_time_s=max_time,
            memory=not opts.no_memory,
        )
        results += rows
        if echo:
            print(format_table(rows) + "\n", flush=True)
        if not opts.no_save:
            for p in write_results(rows, out_dir, env, stem=case.name):
                if p not in written:
                    written.append(p)
            for p in case.finalize(results, out_dir, opts):
                if p not in written:
                    written.append(p)
    return results, written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mmfast.bench`` and ``mmfast-bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cases = available_cases()
    if argv and not argv[0].startswith("-") and argv[0] not in cases:
        print(
            f"{PROG}: error: unknown benchmark case {argv[0]!r}; available cases: {', '.join(cases)} "
            f"(see '{PROG} --list')",
            file=sys.stderr,
        )
        return 2
    parser = build_parser(cases)
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    if opts.list:
        for name, case in cases.items():
            print(f"{name:<14} {case.description}")
        return 0
    if not opts.case:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: name a benchmark case: {', '.join(cases)}", file=sys.stderr)
        return 2
    case = cases[opts.case]
    try:
        results, written = run_case(case, opts)
    except CaseUnavailable as exc:
        print(f"{PROG} {case.name}: cannot run: {exc}", file=sys.stderr)
        return 2
    print("== all configurations ==")
    print(format_table(results))
    for p in written:
        print(f"wrote {p}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
