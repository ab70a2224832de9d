"""``contrastive-dist``: the distributed losses in ``W`` real gloo processes, measured side by side.

``python -m mmfast.bench contrastive-dist --world 4`` runs, for every configuration, open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)`` (the baseline) and ``mmfast.ClipLoss`` with the
same flags and ``group_size`` 1, 2, 4 (``--group-sizes``; those dividing W), forward + backward with
respect to the features and the scale. ``--loss siglip`` runs open_clip's ``SigLipLoss`` (bidir)
against ``mmfast.SigLipLoss`` instead. ``--exchange gather,ring`` runs mmfast's ``exchange="gather"``
(the default, providers ``mmfast[g=2]``) and/or ``exchange="ring"`` (providers ``mmfast[g=2 ring]``,
for the group sizes below W: with one group the ring is the gather).

How: this process is rank 0 of a gloo group on 127.0.0.1; ``W - 1`` helper processes are ranks 1..W-1.
Every call the harness makes of a provider (warm-up, timed, measuring) first posts the provider's
name on the group's TCP store; the helpers read it and make the same call, so each call is one real
distributed step. The harness then reports, for rank 0: the step time (median of the rounds; it
includes one store round trip, ~0.1 ms), the peak extra memory (CPU profiler), the bytes sent per
step under :mod:`mmfast.bench.comm`'s model, and max|diff| of the loss and gradients against open_clip.
Before the run the table of bytes predicted by :mod:`mmfast.bench.scaling` is printed; after it,
``<out>/contrastive-dist_vs_model.csv`` pairs each measured row with its prediction.

Every rank runs single-threaded (``torch.set_num_threads(1)``), this process included.
Shapes: ``--batch`` 64 (``--quick`` 16) pairs per rank, ``--dim`` 256, float32.

The per-rank step builders (:func:`make_step`) and the measuring worker (:func:`measure_rank`) are
also used by ``tests/contrastive/test_scaling.py``.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import datetime
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mmfast.bench.cases import BenchCase, CaseUnavailable, register_case
from mmfast.bench.harness import BenchResult, Provider, grad_step
from mmfast.bench.report import csv_list

__all__ = ["ContrastiveDistCase", "Spec", "make_step", "measure_rank", "all_specs", "spec_key", "spec_name",
           "spec_prediction"]

#: ``(scheme, params)``; scheme in ``open_clip-clip``, ``open_clip-siglip``, ``mmfast-clip``, ``mmfast-siglip``.
Spec = tuple[str, dict[str, Any]]


def _exchange(p: dict[str, Any]) -> str:
    """An mmfast spec's exchange scheme ("gather" when the spec names none)."""
    return str(p.get("exchange", "gather"))


def spec_name(spec: Spec) -> str:
    """Provider name of a spec, e.g. ``mmfast[g=2]``, ``mmfast[g=2 ring]``, ``open_clip``,
    ``mmfast[g=1 local=0 gwg=1]``, ``mmfast[g=2 ring local=0 gwg=1]`` (``gather`` is not named)."""
    scheme, p = spec
    flags = ""
    if "local_loss" in p and (not p["local_loss"] or not p["gather_with_grad"]):
        flags = f" local={int(p['local_loss'])} gwg={int(p['gather_with_grad'])}"
    if scheme.startswith("open_clip"):
        extra = f"[{p['dist_impl']}]" if scheme == "open_clip-siglip" and p.get("dist_impl", "bidir") != "bidir" else ""
        return "open_clip" + extra + (f"[{flags.strip()}]" if flags else "")
    ex = "" if _exchange(p) == "gather" else f" {_exchange(p)}"
    return f"mmfast[g={p['group_size']}{ex}{flags}]"


def spec_key(spec: Spec) -> str:
    """A unique key of a spec: ``mmfast-clip exchange=gather gather_with_grad=True group_size=2 local_loss=True``."""
    return " ".join([spec[0], *(f"{k}={v}" for k, v in sorted(spec[1].items()))])


def all_specs(world: int, loss: str = "both") -> list[Spec]:
    """Every scheme that runs here for ``world``: open_clip ClipLoss with its four flag combinations,
    open_clip SigLipLoss bidir, mmfast ClipLoss (``exchange="gather"``) for every group size dividing W
    and every flag combination, mmfast SigLipLoss (gather) for every group size, and the ``ring``
    exchange for every group size with more than one group (g < W): ClipLoss with every flag
    combination and SigLipLoss."""
    gs = [g for g in range(1, world + 1) if world % g == 0]
    ring_gs = [g for g in gs if g < world]
    flags = list(itertools.product([True, False], repeat=2))
    out: list[Spec] = []
    if loss in ("clip", "both"):
        out += [("open_clip-clip", {"local_loss": ll, "gather_with_grad": gw}) for ll, gw in flags]
        out += [("mmfast-clip", {"group_size": g, "exchange": "gather", "local_loss": ll, "gather_with_grad": gw})
                for g in gs for ll, gw in flags]
        out += [("mmfast-clip", {"group_size": g, "exchange": "ring", "local_loss": ll, "gather_with_grad": gw})
                for g in ring_gs for ll, gw in flags]
    if loss in ("siglip", "both"):
        out += [("open_clip-siglip", {"dist_impl": "bidir"})]
        out += [("mmfast-siglip", {"group_size": g, "exchange": "gather"}) for g in gs]
        out += [("mmfast-siglip", {"group_size": g, "exchange": "ring"}) for g in ring_gs]
    return out


def _features(rank: int, b: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234 + rank)
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).to(dtype)
    txt = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).to(dtype)
    return img, txt


def make_step(spec: Spec, rank: int, world: int, b: int, d: int, dtype: str = "float32") -> Callable[[], Any]:
    """One rank's loss step for ``spec``: a callable doing forward + backward (``torch.autograd.grad``
    with respect to the features and the scale) and returning ``(loss, *grads)``."""
    scheme, p = spec
    dt = getattr(torch, dtype)
    img0, txt0 = _features(rank, b, d, dt)
    img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
    scale = torch.tensor(10.0, dtype=dt, requires_grad=True)
    bias = None
    if scheme == "open_clip-clip":
        from mmfast.bench.cases.contrastive import open_clip_loss_module

        fn = open_clip_loss_module(standalone=True).ClipLoss(
            local_loss=p["local_loss"], gather_with_grad=p["gather_with_grad"], rank=rank, world_size=world)
    elif scheme == "open_clip-siglip":
        from mmfast.bench.cases.contrastive import open_clip_loss_module

        fn = open_clip_loss_module(standalone=True).SigLipLoss(rank=rank, world_size=world,
                                                               dist_impl=p.get("dist_impl", "bidir"))
        bias = torch.tensor(-10.0, dtype=dt, requires_grad=True)
    elif scheme == "mmfast-clip":
        import mmfast

        fn = mmfast.ClipLoss(local_loss=p["local_loss"], gather_with_grad=p["gather_with_grad"], rank=rank,
                             world_size=world, group_size=p["group_size"], exchange=_exchange(p))
    elif scheme == "mmfast-siglip":
        import mmfast

        fn = mmfast.SigLipLoss(rank=rank, world_size=world, group_size=p["group_size"], exchange=_exchange(p))
        bias = torch.tensor(-10.0, dtype=dt, requires_grad=True)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return grad_step(fn, img, txt, scale, bias)


MEMORY_STEPS = 3


def measure_rank(rank: int, world: int, specs: list[Spec], b: int, d: int, dtype: str = "float32",
                 repeats: int = 0, memory: bool = False) -> dict[str, Any]:
    """Run in every rank of a process group (:func:`mmfast.testing.run_distributed`): for each spec,
    one warm-up step, one step under :func:`~mmfast.bench.comm.count_collective_bytes` (its records
    summed by ``(op, phase)``), then optionally ``repeats`` timed steps (a barrier before each; the
    median) and the peak extra memory of a step (the median over ``MEMORY_STEPS`` steps, and their
    maximum). Results are keyed by :func:`spec_key`."""
    import torch.distributed as dist

    from mmfast.bench.comm import count_collective_bytes
    from mmfast.bench.memory import peak_extra_memory

    out: dict[str, Any] = {}
    for spec in specs:
        step = make_step(spec, rank, world, b, d, dtype)
        step()
        with count_collective_bytes() as counter:
            step()
        by: dict[tuple[str, str], dict[str, int]] = {}
        for r in counter.records:
            key = (r.op, "backward" if r.in_backward else "forward")
            e = by.setdefault(key, {"calls": 0, "sent_bytes": 0})
            e["calls"] += 1
            e["sent_bytes"] += r.sent_bytes
        res: dict[str, Any] = {"sent_bytes": counter.sent_bytes, "by_op": by}
        if repeats:
            ts = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
            res["median_s"] = statistics.median(ts)
        if memory:
            # gloo's worker thread makes temporaries (a copy of a collective's buffer) whose timing
            # against the main thread's peak varies from step to step: the median of a few steps is
            # the typical peak, the maximum is kept beside it
            peaks = [peak_extra_memory(step, "cpu").peak_extra_bytes for _ in range(MEMORY_STEPS)]
            res["peak_extra_bytes"], res["peak_extra_bytes_max"] = statistics.median(peaks), max(peaks)
        out[spec_key(spec)] = res
    return out


def spec_prediction(spec: Spec, world: int, b: int, d: int, dtype: str, cluster: Any = None, rates: Any = None,
                    backend: str = "gloo") -> Any:
    """The :mod:`mmfast.bench.scaling` prediction for a spec (by default: one node of W GPUs, H200 rates)."""
    from mmfast.bench import scaling as sc

    prob = sc.Problem(world, b, d, dtype)
    cluster = cluster or sc.Cluster(gpus_per_node=world)
    rates = rates or sc.H200_BF16
    scheme, p = spec
    if scheme == "open_clip-clip":
        return sc.predict_open_clip_clip(prob, cluster, rates, local_loss=p["local_loss"],
                                         gather_with_grad=p["gather_with_grad"], backend=backend)
    if scheme == "open_clip-siglip":
        return sc.predict_open_clip_siglip(prob, cluster, rates, dist_impl=p.get("dist_impl", "bidir"),
                                           backend=backend)
    if scheme == "mmfast-clip":
        return sc.predict_mmfast(prob, cluster, rates, p["group_size"], loss="clip", local_loss=p["local_loss"],
                                 gather_with_grad=p["gather_with_grad"], backend=backend, exchange=_exchange(p))
    if scheme == "mmfast-siglip":
        return sc.predict_mmfast(prob, cluster, rates, p["group_size"], loss="siglip", backend=backend,
                                 exchange=_exchange(p))
    raise ValueError(f"unknown scheme {scheme!r}")


# ----------------------------------------------------------------------------- the lock-step group

_PREFIX = "mmfast-bench/"


def _helper_main(rank: int, world: int, port: int, cfg: dict[str, Any], specs: list[Spec]) -> None:
    """Ranks 1..W-1: wait for the next provider name on the store, make that step; ``__stop__`` ends."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False, timeout=datetime.timedelta(seconds=600))
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    steps: dict[str, Callable[[], Any]] = {}
    by_name = {spec_name(s): s for s in specs}
    i = 0
    try:
        while True:
            name = store.get(f"{_PREFIX}{i}").decode()
            i += 1
            if name == "__stop__":
                break
            if name not in steps:
                steps[name] = make_step(by_name[name], rank, world, cfg["B"], cfg["D"], cfg["dtype"])
            try:
                steps[name]()
            except Exception:  # noqa: BLE001 - rank 0 reports the provider's error in its row
                pass
    finally:
        dist.destroy_process_group()


class _Group:
    """Rank 0 (this process) and its W-1 helpers, stepping together."""

    def __init__(self, cfg: dict[str, Any], specs: list[Spec]):
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise CaseUnavailable("contrastive-dist starts its own gloo group; torch.distributed is already "
                                  "initialised in this process")
        self.cfg, self.world = cfg, cfg["world"]
        self.store = dist.TCPStore("127.0.0.1", 0, self.world, True, timeout=datetime.timedelta(seconds=600),
                                   wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_helper_main, args=(r, self.world, self.store.port, cfg, specs),
                                  daemon=True) for r in range(1, self.world)]
        for p in self.procs:
            p.start()
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.PrefixStore("pg", self.store), rank=0, world_size=self.world,
                                timeout=datetime.timedelta(seconds=120))
        self.i = 0

    def post(self, name: str) -> None:
        """Tell the helpers to make one step of provider ``name``."""
        self.store.set(f"{_PREFIX}{self.i}", name)
        self.i += 1

    def close(self) -> None:
        """Stop the helpers and leave the group."""
        import torch.distributed as dist

        try:
            self.post("__stop__")
        finally:
            for p in self.procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            torch.set_num_threads(self._threads)


_GROUP: _Group | None = None


def _close_group() -> None:
    global _GROUP
    if _GROUP is not None:
        g, _GROUP = _GROUP, None
        g.close()


atexit.register(_close_group)


@register_case
class ContrastiveDistCase(BenchCase):
    """open_clip local_loss+gather_with_grad vs mmfast group_size 1, 2, 4 (gather and/or ring), in W gloo processes."""

    name = "contrastive-dist"
    description = ("W gloo processes: open_clip ClipLoss local+gwg vs mmfast group_size 1,2,4, gather and/or ring "
                   "exchange (bytes/rank, time, memory)")
    baseline = "open_clip"

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """``--world``, ``--group-sizes``, ``--batch``, ``--dim``, ``--dtype``, ``--loss``, ``--exchange``."""
        parser.add_argument("--world", default="4", help="comma-separated world sizes (default 4)")
        parser.add_argument("--group-sizes", default="1,2,4", help="mmfast group sizes (those dividing W run)")
        parser.add_argument("--batch", type=int, default=None, help="pairs per rank (default 64; --quick 16)")
        parser.add_argument("--dim", type=int, default=256, help="embedding dimension (default 256)")
        parser.add_argument("--dtype", default="float32", help="feature dtype (default float32)")
        parser.add_argument("--loss", choices=("clip", "siglip"), default="clip",
                            help="clip: ClipLoss local+gwg (default); siglip: SigLipLoss bidir")
        parser.add_argument("--exchange", default="gather",
                            help="comma-separated mmfast exchange schemes: gather (default), ring (run for the "
                            "group sizes below W: more than one group), e.g. gather,ring")

    def check(self, opts: argparse.Namespace) -> list[str]:
        """open_clip's loss.py and mmfast's losses must import; W >= 2; ``--exchange`` names gather and/or ring."""
        from mmfast.bench.cases.contrastive import open_clip_loss_module

        try:
            open_clip_loss_module(standalone=True)
        except ImportError as exc:
            raise CaseUnavailable(f"needs open_clip's loss.py: {exc}") from exc
        import mmfast

        if not hasattr(mmfast, "ClipLoss"):
            raise CaseUnavailable("mmfast.ClipLoss is not available")
        if any(w < 2 for w in csv_list(int, opts.world)):
            raise CaseUnavailable("--world: every world size must be >= 2")
        exchanges = csv_list(str, getattr(opts, "exchange", "gather"))
        bad = [e for e in exchanges if e not in ("gather", "ring")]
        if bad or not exchanges:
            raise CaseUnavailable(f"--exchange {getattr(opts, 'exchange', '')!r}: expected gather and/or ring")
        device = str(getattr(opts, "device", "cpu"))
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            return ["note: contrastive-dist runs its ranks on CPU (gloo); pass --device cpu so that the peak "
                    "memory column is the CPU profiler's (the CUDA allocator sees none of it)"]
        return []

    def configs(self, device: str, quick: bool, opts: argparse.Namespace) -> list[dict[str, Any]]:
        """One configuration per ``--world``."""
        b = opts.batch or (16 if quick else 64)
        return [{"world": w, "B": b, "D": opts.dim, "dtype": opts.dtype, "loss": opts.loss}
                for w in csv_list(int, opts.world)]

    def shape(self, cfg: dict[str, Any]) -> str:
        """``W=4 B=64 D=256 float32``."""
        return f"W={cfg['world']} B={cfg['B']} D={cfg['D']} {cfg['dtype']}"

    def _specs(self, cfg: dict[str, Any], opts: argparse.Namespace) -> list[Spec]:
        w = cfg["world"]
        gs = [g for g in csv_list(int, opts.group_sizes) if w % g == 0]
        # the ring runs with more than one group (with one, it is the gather)
        mm = [(g, ex) for ex in dict.fromkeys(csv_list(str, getattr(opts, "exchange", "gather")))
              for g in gs if ex == "gather" or g < w]
        if cfg["loss"] == "clip":
            flags = {"local_loss": True, "gather_with_grad": True}
            return [("open_clip-clip", dict(flags))] + [("mmfast-clip", {"group_size": g, "exchange": ex, **flags})
                                                        for g, ex in mm]
        return [("open_clip-siglip", {"dist_impl": "bidir"})] + [("mmfast-siglip", {"group_size": g, "exchange": ex})
                                                                  for g, ex in mm]

    def providers(self, cfg: dict[str, Any], device: str, opts: argparse.Namespace) -> list[Provider]:
        """Start the gloo group for this configuration; one provider per spec (filtered by ``--providers``)."""
        from mmfast.bench.cases.contrastive import selected

        global _GROUP
        _close_group()
        wanted = getattr(opts, "providers", None)
        specs = [s for s in self._specs(cfg, opts) if selected(spec_name(s), wanted)]
        if not specs:
            return []
        print(f"predicted bytes sent per rank per step ({self.shape(cfg)}, mmfast.bench.scaling):")
        for s in specs:
            pred = spec_prediction(s, cfg["world"], cfg["B"], cfg["D"], cfg["dtype"])
            print(f"  {spec_name(s):<18} {pred.sent_bytes:>12,d} B")
        _GROUP = _Group(cfg, specs)
        group = _GROUP

        def provider(spec: Spec) -> Provider:
            name = spec_name(spec)

            def setup() -> Callable[[], Any]:
                step = make_step(spec, 0, cfg["world"], cfg["B"], cfg["D"], cfg["dtype"])

                def run() -> Any:
                    group.post(name)
                    return step()

                return run

            return Provider(name, setup, f"{spec[0]} {spec[1]}")

        return [provider(s) for s in specs]

    def finalize(self, results: list[BenchResult], out_dir: Path, opts: argparse.Namespace) -> list[Path]:
        """Append measured-vs-predicted bytes (and memory) of the new rows to ``contrastive-dist_vs_model.csv``."""
        new = [r for r in results if id(r) not in self._seen]
        self._seen.update(id(r) for r in new)
        if not new:
            return []
        path = Path(out_dir) / f"{self.name}_vs_model.csv"
        fresh = not path.exists() or path.stat().st_size == 0
        rows = []
        for r in new:
            cfg = r.params
            spec = next((s for s in self._specs(cfg, opts) if spec_name(s) == r.provider), None)
            if spec is None:
                continue
            pred = spec_prediction(spec, cfg["world"], cfg["B"], cfg["D"], cfg["dtype"])
            rows.append({
                "shape": r.shape, "provider": r.provider, "measured_sent_bytes": r.sent_bytes,
                "predicted_sent_bytes": pred.sent_bytes, "bytes_equal": r.sent_bytes == pred.sent_bytes,
                "measured_peak_bytes": r.peak_extra_bytes, "predicted_peak_bytes": pred.peak_memory_bytes,
                "median_ms": r.timing.median_ms if r.timing else None,
            })
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["shape"])
            if fresh:
                w.writeheader()
            w.writerows(rows)
        for row in rows:
            print(f"  {row['provider']:<18} bytes measured {row['measured_sent_bytes']} predicted "
                  f"{row['predicted_sent_bytes']} ({'equal' if row['bytes_equal'] else 'DIFFERENT'}); peak "
                  f"measured {row['measured_peak_bytes']} predicted {row['predicted_peak_bytes']}")
        return [path]
