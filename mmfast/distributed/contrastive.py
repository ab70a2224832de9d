"""Exact CLIP and SigLIP losses across ranks: one entry per loss, two exchange schemes.

* ``gather`` (:mod:`mmfast.distributed.gather`): every rank ends the forward pass with every text
  of the world. Fewest bytes ((W-1)*B*D each way) and fewest collectives; O(W*B*D) memory per rank.
* ``ring`` (:mod:`mmfast.distributed.ring`): texts travel in pieces of B rows around a ring between
  groups of ``group_size`` ranks and are exchanged point-to-point inside a group, forward and
  backward. O(g*B*D + W*B) memory per rank: flat in W. 1.5x the bytes of ``gather`` for fp32
  features, 2x for 16-bit ones (texts travel again in backward, with fp32 gradient sums).
* ``auto``: ``ring`` when ``gather``'s per-rank loss memory (:func:`gather_memory_bytes`) would exceed
  the memory budget (:func:`set_memory_budget`, ``MMFAST_LOSS_MEMORY_BUDGET`` in MiB, default 512
  MiB) and there is more than one group; else ``gather``. Decided from the header exchange, so every
  rank takes the same scheme (the smallest budget of any rank counts).

Collectives per step (forward + backward; k = W / g groups):

=====================  ==========================================================================
scheme                 collectives
=====================  ==========================================================================
gather, CLIP           header all-gather; column all-gather (k > 1); group all-gather (g > 1); one
                       statistics all-reduce (2N + 3 floats) | group and column reduce-scatters;
                       one upstream-gradient exchange when gather_with_grad (W floats)
gather, SigLIP         header; column + group all-gathers | group + column reduce-scatters
ring, CLIP             header; k group piece exchanges (g > 1); k - 1 ring steps; one statistics
                       all-reduce | k group piece exchanges + k group partial exchanges (g > 1);
                       2(k - 1) ring steps (texts, gradient sums); the upstream-gradient exchange
                       (gather_with_grad); one failure-flag all-reduce
ring, SigLIP           as ring CLIP, with a failure-flag all-reduce in place of the statistics one
=====================  ==========================================================================

With ``labels``, every scheme adds one all-gather of the labels (``W * B`` int64) after the header,
and CLIP's statistics all-reduce carries N more floats (each column's positive-logit partial); the
positive pairs' terms come from class sums (:mod:`mmfast.distributed.labels`), formed as the text
blocks pass through the tile loops.

The ring's point-to-point exchanges (group exchanges and ring steps) repeat once per column chunk
(``c = ring.chunking(B, row bytes)[0]``, 1 to 4: at B = 1024, D = 512 fp32, 4; with bf16 D = 768, 2).
A ring step is one asynchronous send to the next group + one receive from the previous one; a group
exchange is one batch of g - 1 sends and g - 1 receives (``batch_isend_irecv``). On gloo, reduce-scatters are
all-to-alls plus a local sum (gloo's own reduce-scatter is an all-reduce: twice the bytes).
Gradient semantics are open_clip's, per flag (see mmfast.reference.contrastive.simulate_ranks).
"""

from __future__ import annotations

import os

from torch import Tensor

from mmfast.distributed import common
from mmfast.distributed.common import EXCHANGES, report_bad_input
from mmfast.distributed.gather import ClipGatherFn, SigLipGatherFn
from mmfast.distributed.groups import get_layout
from mmfast.distributed.labels import GlobalLabels
from mmfast.distributed.ring import ClipRingFn, RingFailure, SigLipRingFn, chunking

__all__ = ["clip_loss_distributed", "siglip_loss_distributed", "pick_exchange", "gather_memory_bytes",
           "ring_memory_bytes", "set_memory_budget", "memory_budget", "report_bad_input",
           "RingFailure", "EXCHANGES"]

_DEFAULT_BUDGET_MIB = 512.0
_budget_override: float | None = None


def set_memory_budget(nbytes: float | None) -> None:
    """The per-rank loss memory (bytes) above which ``exchange="auto"`` takes the ring; ``None``
    restores the default (``MMFAST_LOSS_MEMORY_BUDGET`` in MiB, else 512 MiB)."""
    global _budget_override
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or nbytes < 0):
        raise ValueError(f"memory budget must be a non-negative number of bytes or None, got {nbytes!r}")
    _budget_override = None if nbytes is None else float(nbytes)


def memory_budget() -> float:
    if _budget_override is not None:
        return _budget_override
    env = os.environ.get("MMFAST_LOSS_MEMORY_BUDGET")
    if env:
        try:
            mib = float(env)
        except ValueError:
            raise ValueError(f"MMFAST_LOSS_MEMORY_BUDGET must be a number of MiB, got {env!r}") from None
        return mib * 2**20
    return _DEFAULT_BUDGET_MIB * 2**20


def _elt(dtype_bytes: int) -> int:
    return 8 if dtype_bytes == 8 else 4


def gather_memory_bytes(world: int, bmax: int, dim: int, dtype_bytes: int) -> int:
    """Per-rank loss memory of ``gather`` beyond the inputs (largest of forward and backward): the
    world's texts (kept for backward) and, in backward, their gradient partials in the feature dtype
    and one tile call's partials in the accumulation dtype."""
    n = world * bmax * dim
    return n * dtype_bytes * 2 + n * _elt(dtype_bytes)


def ring_memory_bytes(group_size: int, num_groups: int, bmax: int, dim: int, dtype_bytes: int) -> int:
    """Per-rank loss memory of ``ring`` beyond the inputs (backward, the larger pass), a bound: the
    image gradient and one kernel call's image-row gradient, the text gradient (accumulation dtype),
    and per column chunk of ``R`` rows (:func:`~mmfast.distributed.ring.chunking`) the ring piece, the
    next one and the other members' pieces, their partials, the sum in flight and the kernel's tile,
    plus O(W*B) statistics."""
    chunks, rows = chunking(bmax, dim * dtype_bytes)
    acc, chunk = _elt(dtype_bytes), rows * dim
    return ((2 * bmax + chunks * rows) * dim * acc + (group_size + 1) * chunk * dtype_bytes
            + (group_size + 2) * chunk * acc + bmax * rows * acc + 4 * group_size * num_groups * bmax * acc)


def pick_exchange(exchange: str, world: int, group_size: int, bmax: int, dim: int, dtype_bytes: int,
                  budget: float | None = None) -> str:
    """What ``exchange`` resolves to (no communication): ``auto`` takes the ring when ``gather`` would
    need more than ``budget`` bytes (default :func:`memory_budget`) and there is more than one group."""
    if exchange != "auto":
        return exchange
    if world // group_size == 1:
        return "gather"  # one group: the ring is the gather
    need = gather_memory_bytes(world, bmax, dim, dtype_bytes)
    return "ring" if need > (memory_budget() if budget is None else budget) else "gather"


def _setup(image: Tensor, text: Tensor, group, group_size: int, exchange: str, labels: Tensor | None):
    layout = get_layout(group, group_size)
    header = common.exchange_header(image, text, layout, exchange, memory_budget(), labels is not None)
    # everything comes from the header: every rank takes the same scheme
    scheme = pick_exchange(header.exchange, layout.world_size, layout.group_size, max(header.sizes), header.dim,
                           image.element_size(), header.budget)
    lab = None
    if labels is not None:
        lab = GlobalLabels(labels, header.sizes, header.offsets[layout.rank], layout, common.compute_dtype(image))
    return layout, header, scheme, lab


def clip_loss_distributed(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, *, group,
                          group_size: int, local_loss: bool, gather_with_grad: bool, impl: str,
                          exchange: str = "auto", labels: Tensor | None = None) -> Tensor:
    layout, header, scheme, lab = _setup(image, text, group, group_size, exchange, labels)
    fn = ClipRingFn if scheme == "ring" else ClipGatherFn
    return fn.apply(image, text, scale, bias, layout, header, local_loss, gather_with_grad, impl, lab)


def siglip_loss_distributed(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor | None, *, group,
                            group_size: int, impl: str, exchange: str = "auto", labels: Tensor | None = None
                            ) -> Tensor:
    layout, header, scheme, lab = _setup(image, text, group, group_size, exchange, labels)
    fn = SigLipRingFn if scheme == "ring" else SigLipGatherFn
    return fn.apply(image, text, scale, bias, layout, header, impl, lab)
