"""Collectives of the distributed losses that cost what they should on every backend.

* :func:`reduce_scatter`: NCCL's reduce-scatter, or on gloo (whose ``reduce_scatter_tensor`` is an
  all-reduce underneath and sends twice the bytes) an all-to-all of the chunks plus a local sum:
  ``(n-1)/n`` of the input leaves each rank, the bandwidth optimum.
* :func:`p2p`: one batch of sends and receives (the group exchanges of the ring), whose sends can
  be released before its receives complete.
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

__all__ = ["p2p", "reduce_scatter", "RingChannel", "combine_column_stats"]


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


class _Pending:
    """Asynchronous collectives (``works``) and the local work that completes them. Holds no
    reference cycle, so that its buffers are freed as soon as the caller drops it (a per-call class
    or closure would keep every step's buffers alive until the cyclic garbage collector runs).

    ``send_works`` (point-to-point sends whose work the backend returns separately: gloo) can be
    waited early with :meth:`release_sends`, which lets go of the send buffers (``keep``) while the
    receives are still outstanding."""

    __slots__ = ("_works", "_send_works", "_finish", "result", "_keep")

    def __init__(self, works, result=None, finish=None, keep=None, send_works=()):
        self._works, self._send_works = list(works), list(send_works)
        self._finish, self.result, self._keep = finish, result, keep

    def release_sends(self) -> None:
        """Wait for the sends only and let go of what they sent (where the backend does not return
        the sends' works one by one: wait for everything)."""
        if self._send_works:
            for w in self._send_works:
                w.wait()
            self._send_works = []
            self._keep = None
        elif self._keep is not None:
            self.wait()

    def wait(self):
        works, self._works, self._send_works = self._send_works + self._works, [], []
        if works:
            for w in works:
                w.wait()
            self._keep = None
        if self._finish is not None:
            self.result, self._finish = self._finish(self.result), None
        return self.result


def p2p(group, sends, recvs, *, tag: int = 0, result=None) -> _Pending:
    """One ``batch_isend_irecv`` of ``sends`` and ``recvs`` (lists of ``(global peer rank, tensor)``).
    Returns a handle whose ``wait()`` gives ``result`` (default: the list of receive buffers)."""
    ops = [dist.P2POp(dist.irecv, t, peer, group=group, tag=tag) for peer, t in recvs]
    sent = [t.contiguous() for _, t in sends]
    ops += [dist.P2POp(dist.isend, t, peer, group=group, tag=tag) for (peer, _), t in zip(sends, sent)]
    works = dist.batch_isend_irecv(ops) if ops else []
    out = [t for _, t in recvs] if result is None else result
    if len(works) == len(ops):  # one work per op (gloo): the sends can be released on their own
        return _Pending(works[:len(recvs)], out, keep=sent, send_works=works[len(recvs):])
    return _Pending(works, out, keep=sent)


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
        return p2p(self.group, [] if send is None else [(self.next, send)],
                   [] if recv is None else [(self.prev, recv)], tag=tag, result=recv)


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
