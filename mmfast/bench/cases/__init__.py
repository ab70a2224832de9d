"""Registry of benchmark cases. Each module of this package defines a :class:`BenchCase` subclass and
registers it with :func:`register_case`; :func:`available_cases` imports them all.

A case says which configurations to run (``configs``: CPU or GPU shapes, ``--quick`` ones), which
providers compute it (``providers``: the baseline and the implementations under test), and may add its
own command-line options (``add_arguments``) and write extra outputs after the run (``finalize``,
e.g. a plot). The options several cases share (``--impl``, ``--shapes`` / ``--dtype``) are read and
checked by the helpers below :class:`BenchCase`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmfast.bench.harness import BenchResult, Provider
from mmfast.bench.report import csv_list

__all__ = ["BenchCase", "CaseUnavailable", "add_impl_argument", "available_cases", "check_choices",
           "checked_dtype", "get_case", "register_case", "shape_set"]


class CaseUnavailable(RuntimeError):
    """The case cannot run here (an implementation under test is missing); the message says why."""


class BenchCase:
    """Base class of a benchmark case (override what differs; see the package docstring)."""

    #: registry name, the CLI's ``<case>``
    name: str = ""
    #: one line for ``--help`` / ``--list``
    description: str = ""
    #: the provider the ratios are taken against (None: no ratios)
    baseline: str | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the case's own options to its sub-command parser."""

    def options(self, argv: Sequence[str] = ()) -> argparse.Namespace:
        """The case's options parsed from ``argv`` (defaults when empty), for use outside the CLI."""
        parser = argparse.ArgumentParser(prog=self.name, add_help=False)
        self.add_arguments(parser)
        return parser.parse_args(list(argv))

    def check(self, opts: argparse.Namespace) -> list[str]:
        """Raise :class:`CaseUnavailable` if the case cannot run; return notes to print (skipped parts)."""
        return []

    def configs(self, device: str, quick: bool, opts: argparse.Namespace) -> list[dict[str, Any]]:
        """The parameter sets to run on ``device`` (``"cpu"`` / ``"cuda"``)."""
        raise NotImplementedError

    def shape(self, cfg: dict[str, Any]) -> str:
        """Short text of a configuration for the table."""
        return ", ".join(f"{k}={v}" for k, v in cfg.items())

    def providers(self, cfg: dict[str, Any], device: str, opts: argparse.Namespace) -> list[Provider]:
        """The providers for one configuration (their ``setup`` builds the inputs)."""
        raise NotImplementedError

    def finalize(self, results: list[BenchResult], out_dir: Path, opts: argparse.Namespace) -> list[Path]:
        """Write extra outputs (plots) for the whole run; return their paths."""
        return []


def add_impl_argument(parser: argparse.ArgumentParser, impls: Sequence[str]) -> None:
    """``--impl``: the comma-separated mmfast ``impl=`` values (out of ``impls``), one provider each."""
    parser.add_argument("--impl", default="auto",
                        help=f"comma-separated mmfast impl= values, one provider each ({', '.join(impls)})")


def check_choices(flag: str, text: str | None, allowed: Sequence[str], expected: str = "one of") -> None:
    """Raise :class:`CaseUnavailable` for a value of the comma-separated option ``flag`` not in ``allowed``."""
    for value in csv_list(str, text):
        if value not in allowed:
            raise CaseUnavailable(f"{flag} {value!r}: expected {expected} {', '.join(allowed)}")


def checked_dtype(name: str) -> str:
    """``name`` if it names a torch dtype (``--dtype``), else :class:`CaseUnavailable`."""
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise CaseUnavailable(f"--dtype {name!r} is not a torch dtype")
    return name


def shape_set(device: str, opts: argparse.Namespace, gpu_dtype: str) -> tuple[bool, str]:
    """``(gpu, dtype)`` of a case with a CPU and a GPU shape set: whether ``--shapes`` (``auto``, ``cpu``
    or ``gpu``; ``auto``: by device) picks the GPU set, and ``--dtype`` (default ``gpu_dtype`` on the
    GPU set, float32 on the CPU one), checked."""
    gpu = torch.device(device).type == "cuda" if opts.shapes == "auto" else opts.shapes == "gpu"
    return gpu, checked_dtype(opts.dtype or (gpu_dtype if gpu else "float32"))


_REGISTRY: dict[str, BenchCase] = {}
_loaded = False


def register_case(cls: type[BenchCase]) -> type[BenchCase]:
    """Class decorator: instantiate ``cls`` and register it under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"benchmark case {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    _loaded = True


def available_cases() -> dict[str, BenchCase]:
    """Every registered case by name (imports the case modules on first use)."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_case(name: str) -> BenchCase:
    """The case called ``name``; ``KeyError`` with the list of known cases otherwise."""
    cases = available_cases()
    if name not in cases:
        raise KeyError(f"unknown benchmark case {name!r}; available: {', '.join(cases) or 'none'}")
    return cases[name]
