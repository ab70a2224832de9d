"""Collectives of the distributed losses that cost what they should on every backend.

* :func:`reduce_scatter`: NCCL's reduce-scatter, or on gloo (whose ``reduce_scatter_tensor`` is an
  all-reduce underneath and sends twice the bytes) an all-to-all of the chunks plus a local sum:
  ``(n-1)/n`` of the input leaves each rank, the bandwidth optimum.
* :class:`RingChannel`: point-to-point exchange with the previous and next rank of a ring
  (``batch_isend_irecv``), asynchronous so that it overlaps the tile compute of the block in hand.
* :func:`combine_column_stats`: the per-column log-sum-exp partials of every rank combined with ONE
  all-reduce (a shift every rank knows in advance, in float64), instead of a max all-reduce then a
  sum all-reduce; extra scalars (loss terms, error flags) ride along.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["reduce_scatter", "RingChannel", "combine_column_stats"]


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


class _Pending:
    """Asynchronous collectives (``works``) and the local work that completes them. Holds no
    reference cycle, so that its buffers are freed as soon as the caller drops it (a per-call class
    or closure would keep every step's buffers alive until the cyclic garbage collector runs)."""

    __slots__ = ("_works", "_finish", "result", "_keep")

    def __init__(self, works, result: Tensor | None = None, finish=None, keep=None):
        self._works, self._finish, self.result, self._keep = list(works), finish, result, keep

    def wait(self) -> Tensor:
        if self._works:
            for w in self._works:
                w.wait()
            self._works = []
            self._keep = None
            if self._finish is not None:
                self.result, self._finish = self._finish(self.result), None
        return self.result


def reduce_scatter(inp: Tensor, group, *, async_op: bool = False):
    """Sum ``inp`` ``[n * m, ...]`` over the ``n`` ranks of ``group``; rank ``i`` gets chunk ``i``
    (``[m, ...]``). Returns the chunk, or with ``async_op`` an object whose ``wait()`` returns it."""
    n = dist.get_world_size(group)
    if inp.shape[0] % n:
        raise ValueError(f"reduce_scatter: {inp.shape[0]} rows do not split into {n} chunks")
    inp = inp.contiguous()
    if _is_nccl(group):
        out = inp.new_empty((inp.shape[0] // n, *inp.shape[1:]))
        pending = _Pending([dist.reduce_scatter_tensor(out, inp, group=group, async_op=True)], out, keep=inp)
    else:
        # gloo: all-to-all moves each chunk to its owner once; the owner sums the n copies.
        recv = torch.empty_like(inp)
        work = dist.all_to_all_single(recv, inp, group=group, async_op=True)
        pending = _Pending([work], recv, _sum_chunks(n), keep=inp)
    return pending if async_op else pending.wait()


class _sum_chunks:  # noqa: N801 - a picklable, cycle-free callable
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __call__(self, recv: Tensor) -> Tensor:
        return recv.view(self.n, -1, *recv.shape[1:]).sum(0)


class RingChannel:
    """Sends to the next rank of a ring and receives from the previous one (``ranks``: the ring in
    order, as global ranks; this rank at ``index``). ``exchange`` posts one send and one receive and
    returns a handle whose ``wait()`` gives the received tensor."""

    def __init__(self, group, ranks: list[int], index: int):
        self.group, self.size = group, len(ranks)
        self.next, self.prev = ranks[(index + 1) % self.size], ranks[(index - 1) % self.size]

    def exchange(self, send: Tensor | None, recv: Tensor | None, *, tag: int = 0) -> _Pending:
        """Post ``send`` to the next rank and ``recv`` from the previous one. Messages of one ``tag``
        between two ranks arrive in the order they were posted."""
        ops = []
        if send is not None:
            send = send.contiguous()
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, group=self.group, tag=tag))
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self.next, group=self.group, tag=tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Pending(works, recv, keep=send)


def combine_column_stats(lse: Tensor, mean_logit: Tensor, shift: Tensor, extra: Tensor, group
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Combine every rank's column partials ``(lse_j, mean_logit_j)`` (``-inf`` / anything where a
    rank saw no row) into the global ones, and sum ``extra`` (a few scalars) over the ranks.

    ``shift[j]`` must be the same on every rank and bound the logits of column j from above (the
    caller passes ``|scale| * max_i |image_i| * |text_j| + bias``). Then ``exp(lse_j - shift_j)`` never
    overflows and, in float64, underflows only when the logits sit ~700 below the bound; that case is
    detected from the (identical) all-reduced sums on every rank and redone exactly with a max
    all-reduce first. Returns (lse, mean_logit, extra summed), lse and mean_logit in ``lse.dtype``.
    """
    dt = lse.dtype
    n = lse.shape[0]
    lse64, shift64 = lse.double(), shift.double()
    w = torch.exp(lse64 - shift64)
    packed = torch.cat([w, w * mean_logit.double(), extra.double().reshape(-1)])
    dist.all_reduce(packed, group=group)
    sums, weighted, extra_sum = packed[:n], packed[n:2 * n], packed[2 * n:]
    tiny = torch.finfo(torch.float64).tiny
    if n and bool((sums < tiny).any()):  # the same decision on every rank: the sums are identical
        gmax = lse64.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        w = torch.exp(lse64 - gmax)
        both = torch.stack([w, w * mean_logit.double()])
        dist.all_reduce(both, group=group)
        return (gmax + torch.log(both[0])).to(dt), (both[1] / both[0]).to(dt), extra_sum
    return (shift64 + torch.log(sums)).to(dt), (weighted / sums).to(dt), extra_sum
