"""Count the bytes that ``torch.distributed`` collectives move, by wrapping them for a ``with`` block.

:func:`count_collective_bytes` replaces the collectives listed in :data:`PATCHED_OPS` by recording
wrappers, both as attributes of the ``torch.distributed`` module and as globals of
``torch.distributed.distributed_c10d`` (where ``P2POp``, ``batch_isend_irecv`` and the deprecated
aliases look them up), and puts the originals back on exit. Code that calls ``dist.<op>(...)``
through the module at call time is seen, which covers ``torch.distributed.nn.functional``
(``all_gather`` and friends, whose autograd ``forward`` and ``backward`` call ``dist.all_gather``,
``dist.scatter``, ``dist.reduce_scatter``, ``dist.all_to_all``... through the module), open_clip's
``gather_features`` and ``neighbour_exchange`` (``P2POp`` + ``batch_isend_irecv``), and anything
built on them. Not seen: functions bound by name before the block (``from torch.distributed import
all_gather``), functional collectives (``torch.distributed._functional_collectives``, which go
straight to ``torch.ops._c10d_functional``), and calls made by C++ (DDP's gradient buckets).

One call is one record. A wrapped op that calls another wrapped op (``all_gather_into_tensor`` calls
``all_gather_single`` in torch 2.14; ``batch_isend_irecv`` calls ``isend``/``irecv``) is recorded
once, as the outer op: a thread-local depth counter turns the inner wrappers into pass-throughs.
A rank outside the ``group`` passed (the op is a no-op there) records nothing.

Cost model: "bytes sent by this rank" (``sent_bytes``)
-------------------------------------------------------
``W`` is the size of the process group the call uses (the ``group`` argument, else the default
group), ``r`` this rank's index in it, ``n`` the byte size of the tensor named. Bandwidth-optimal
ring algorithms for the collectives, direct transfers for the rooted ones and point-to-point:

=====================================================  =========================================
op                                                      bytes sent by rank ``r``
=====================================================  =========================================
``all_gather(list, t)``                                 ring: every chunk but the one of rank
                                                        ``r+1``: ``(W-1) * n(t)`` for equal sizes
``all_gather_single / all_gather_into_tensor /``        ``(W-1) * n(input)``
``_all_gather_base``
``all_gather_coalesced(outs, ins)``                     ``(W-1) * sum n(ins)``
``reduce_scatter(out, list)``                           ring: every chunk but its own:
                                                        ``sum n(list) - n(list[r])``
``reduce_scatter_single / reduce_scatter_tensor /``     ``(W-1)/W * n(input)``
``_reduce_scatter_base``
``all_reduce(t)``                                       ring (reduce-scatter + all-gather):
                                                        ``2 (W-1)/W * n(t)``
``all_reduce_coalesced(ts)``                            ``2 (W-1)/W * sum n(ts)``
``broadcast(t, src)``                                   root: ``(W-1) * n(t)``; others 0
``reduce(t, dst)``                                      non-root: ``n(t)``; root 0
``gather(t, list, dst)`` / ``gather_single`` /          non-root: ``n(t)``; root 0
``gather_into_tensor``
``scatter(t, list, src)``                               root: ``sum n(list) - n(list[src])``;
                                                        others 0
``all_to_all(outs, ins)``                               ``sum n(ins) - n(ins[r])``
``all_to_all_single(out, in, out_splits, in_splits)``   ``n(in)`` minus the rows kept (``in_splits[r]``
                                                        rows, or ``1/W`` of ``in`` without splits)
``send / isend``                                        ``n(t)``
``recv / irecv``                                        0
``batch_isend_irecv(ops)``                              ``sum n(t)`` over its ``isend`` ops
=====================================================  =========================================

(Integer division rounds the fractional models down.) ``payload_bytes`` is the size of what this
rank contributes: the input tensor(s) (the sum of a list), the tensor sent or received for
point-to-point ops. ``torch.distributed.nn.functional.all_gather`` therefore costs, per rank and per
call, ``(W-1) * n`` forward (one ``all_gather``), and ``(W-1) * n`` again in backward: on NCCL through
one ``reduce_scatter`` of the ``W`` gradient chunks, on gloo through ``W`` ``scatter`` calls of which
this rank is the root of one. The in-backward flag of each record tells the two apart.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["CollectiveRecord", "CollectiveCounter", "count_collective_bytes", "PATCHED_OPS"]

#: Every ``torch.distributed`` function the counter wraps (those missing from the torch in use are skipped).
PATCHED_OPS: tuple[str, ...] = (
    "all_gather",
    "all_gather_single",
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather_coalesced",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "reduce",
    "gather",
    "gather_single",
    "gather_into_tensor",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)


@dataclass
class CollectiveRecord:
    """One collective call seen by :func:`count_collective_bytes` (see the module docstring's model)."""

    op: str
    payload_bytes: int
    sent_bytes: int
    world_size: int
    rank: int
    dtype: str
    in_backward: bool
    async_op: bool = False
    shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (for JSON)."""
        return asdict(self)


class CollectiveCounter:
    """The records of one :func:`count_collective_bytes` block and their totals."""

    def __init__(self) -> None:
        self.records: list[CollectiveRecord] = []
        self._lock = threading.Lock()

    def _add(self, rec: CollectiveRecord) -> None:
        with self._lock:
            self.records.append(rec)

    @property
    def sent_bytes(self) -> int:
        """Total bytes sent by this rank under the module's cost model."""
        return sum(r.sent_bytes for r in self.records)

    @property
    def payload_bytes(self) -> int:
        """Total payload bytes of the recorded calls."""
        return sum(r.payload_bytes for r in self.records)

    @property
    def calls(self) -> int:
        """Number of recorded calls."""
        return len(self.records)

    def by_op(self) -> dict[str, dict[str, int]]:
        """``{op: {"calls", "payload_bytes", "sent_bytes"}}`` summed over the records."""
        out: dict[str, dict[str, int]] = defaultdict(
            lambda: {"calls": 0, "payload_bytes": 0, "sent_bytes": 0}
        )
        for r in self.records:
            d = out[r.op]
            d["calls"] += 1
            d["payload_bytes"] += r.payload_bytes
            d["sent_bytes"] += r.sent_bytes
        return dict(out)

    def summary(self) -> dict[str, Any]:
        """Totals, split into forward and backward, and per op (JSON-ready)."""
        return {
            "calls": self.calls,
            "payload_bytes": self.payload_bytes,
            "sent_bytes": self.sent_bytes,
            "sent_bytes_forward": sum(r.sent_bytes for r in self.records if not r.in_backward),
            "sent_bytes_backward": sum(r.sent_bytes for r in self.records if r.in_backward),
            "by_op": self.by_op(),
        }

    def clear(self) -> None:
        """Forget the records so far."""
        with self._lock:
            self.records.clear()


# ------------------------------------------------------------------------------------- the patching

_state_lock = threading.Lock()
_active: list[CollectiveCounter] = []
_originals: dict[str, Callable[..., Any]] = {}  # op name -> original function, while patched
_wrappers: dict[str, Callable[..., Any]] = {}
_tls = threading.local()


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _list_bytes(ts: Sequence[Any] | None) -> int:
    return sum(_nbytes(t) for t in ts) if ts else 0


def _group_info(group: Any) -> tuple[int, int]:
    """(world size, this rank's index) of ``group`` (``None``: the default group); rank -1 if not in it."""
    import torch.distributed as dist

    return dist.get_world_size(group=group), dist.get_rank(group=group)


def _group_rank(group: Any, global_rank: int | None, group_rank: int | None) -> int:
    """The group-local index of a peer/root given as a global ``src``/``dst`` or a ``group_*`` rank."""
    import torch.distributed as dist

    if group_rank is not None:
        return group_rank
    if global_rank is None:
        return 0
    if group is None or group is dist.GroupMember.WORLD:
        return global_rank
    return dist.get_group_rank(group, global_rank)


def _first_tensor(*cands: Any) -> torch.Tensor | None:
    for c in cands:
        if isinstance(c, torch.Tensor):
            return c
        if isinstance(c, (list, tuple)):
            for t in c:
                if isinstance(t, torch.Tensor):
                    return t
                if isinstance(t, (list, tuple)) and t and isinstance(t[0], torch.Tensor):
                    return t[0]
    return None


def _shapes(*cands: Any) -> list[list[int]]:
    out: list[list[int]] = []
    for c in cands:
        if isinstance(c, torch.Tensor):
            out.append(list(c.shape))
        elif isinstance(c, (list, tuple)):
            out.extend(list(t.shape) for t in c if isinstance(t, torch.Tensor))
    return out


def _model(op: str, a: dict[str, Any]) -> tuple[int, int, int, int, list[list[int]], Any] | None:
    """(payload, sent, W, r, shapes, a tensor for the dtype) for one call, or None when not in the group."""
    if op == "batch_isend_irecv":
        p2p = a["p2p_op_list"]
        group = p2p[0].group if p2p else None
        ws, r = _group_info(group)
        if r < 0:
            return None
        sends = [p.tensor for p in p2p if _is_send(p.op)]
        payload = _list_bytes([p.tensor for p in p2p])
        return (
            payload,
            _list_bytes(sends),
            ws,
            r,
            _shapes([p.tensor for p in p2p]),
            _first_tensor([p.tensor for p in p2p]),
        )

    group = a.get("group")
    ws, r = _group_info(group)
    if r < 0:
        return None
    if op == "all_gather":
        t, outs = a["tensor"], a["tensor_list"]
        n = _nbytes(t)
        if outs and len(outs) == ws:
            sent = _list_bytes(outs) - _nbytes(outs[(r + 1) % ws])
        else:
            sent = (ws - 1) * n
        return n, sent, ws, r, _shapes(t), t
    if op in ("all_gather_single", "all_gather_into_tensor", "_all_gather_base"):
        t = a["input_tensor"]
        n = _nbytes(t)
        return n, (ws - 1) * n, ws, r, _shapes(t), t
    if op == "all_gather_coalesced":
        ins = a["input_tensor_list"]
        n = _list_bytes(ins)
        return n, (ws - 1) * n, ws, r, _shapes(ins), _first_tensor(ins)
    if op == "reduce_scatter":
        ins = a["input_list"]
        n = _list_bytes(ins)
        own = _nbytes(ins[r]) if len(ins) == ws else n // ws
        return n, n - own, ws, r, _shapes(ins), _first_tensor(ins)
    if op in ("reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base"):
        t = a["input"]
        n = _nbytes(t)
        return n, (ws - 1) * n // ws, ws, r, _shapes(t), t
    if op == "all_reduce":
        t = a["tensor"]
        n = _nbytes(t)
        return n, 2 * (ws - 1) * n // ws, ws, r, _shapes(t), t
    if op == "all_reduce_coalesced":
        ts = a["tensors"]
        ts = [ts] if isinstance(ts, torch.Tensor) else ts
        n = _list_bytes(ts)
        return n, 2 * (ws - 1) * n // ws, ws, r, _shapes(ts), _first_tensor(ts)
    if op == "broadcast":
        t = a["tensor"]
        n = _nbytes(t)
        root = _group_rank(group, a.get("src"), a.get("group_src"))
        return n, (ws - 1) * n if r == root else 0, ws, r, _shapes(t), t
    if op in ("reduce", "gather", "gather_single", "gather_into_tensor"):
        t = a["tensor"]
        n = _nbytes(t)
        root = _group_rank(group, a.get("dst"), a.get("group_dst"))
        return n, 0 if r == root else n, ws, r, _shapes(t), t
    if op == "scatter":
        t, ins = a["tensor"], a.get("scatter_list")
        root = _group_rank(group, a.get("src"), a.get("group_src"))
        if r != root or not ins:
            return 0, 0, ws, r, _shapes(t), t
        n = _list_bytes(ins)
        own = _nbytes(ins[root]) if len(ins) > root else 0
        return n, n - own, ws, r, _shapes(ins), _first_tensor(ins)
    if op == "all_to_all":
        ins = a["input_tensor_list"]
        n = _list_bytes(ins)
        own = _nbytes(ins[r]) if len(ins) > r else 0
        return n, n - own, ws, r, _shapes(ins), _first_tensor(ins)
    if op == "all_to_all_single":
        t = a["input"]
        n = _nbytes(t)
        splits = a.get("input_split_sizes")
        if splits:
            row = n // t.shape[0] if t.dim() and t.shape[0] else 0
            kept = splits[r] * row
        else:
            kept = n // ws
        return n, n - kept, ws, r, _shapes(t), t
    if op in ("send", "isend"):
        t = a["tensor"]
        return _nbytes(t), _nbytes(t), ws, r, _shapes(t), t
    if op in ("recv", "irecv"):
        t = a["tensor"]
        return _nbytes(t), 0, ws, r, _shapes(t), t
    raise AssertionError(f"no cost model for {op}")  # pragma: no cover - PATCHED_OPS and _model agree


def _is_send(fn: Any) -> bool:
    return fn is _originals.get("isend") or fn is _wrappers.get("isend")


def _make_wrapper(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(orig)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if name in ("isend", "irecv"):
            # A P2POp built inside the block but run after it: batch_isend_irecv passes the peer as
            # group_src when ``op.op`` is not (the now restored) ``isend``.
            wrong, right = ("group_src", "group_dst") if name == "isend" else ("group_dst", "group_src")
            if wrong in kwargs and right not in kwargs:
                kwargs[right] = kwargs.pop(wrong)
        depth = getattr(_tls, "depth", 0)
        if depth or not _active:
            return orig(*args, **kwargs)
        _tls.depth = depth + 1
        try:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            restore: list[tuple[Any, Any]] = []
            if name == "batch_isend_irecv":
                # torch decides send vs recv with ``p2p_op.op is isend`` against the (wrapped) module
                # global: point P2POps built before the block at the wrappers for the call.
                for p in bound.arguments["p2p_op_list"]:
                    for op_name in ("isend", "irecv"):
                        if p.op is _originals.get(op_name):
                            restore.append((p, p.op))
                            p.op = _wrappers[op_name]
            try:
                out = orig(*args, **kwargs)
            finally:
                for p, op_fn in restore:
                    p.op = op_fn
            # Modelled after the call: its arguments are valid by then, and no shape has changed.
            try:
                info = _model(name, bound.arguments)
            except Exception as exc:  # a silent undercount would be worse than a loud failure
                raise RuntimeError(f"count_collective_bytes: cannot model the {name} call: {exc}") from exc
            if info is not None:
                payload, sent, ws, r, shapes, t = info
                rec = CollectiveRecord(
                    op=name,
                    payload_bytes=int(payload),
                    sent_bytes=int(sent),
                    world_size=int(ws),
                    rank=int(r),
                    dtype=str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else "",
                    in_backward=torch._C._current_autograd_node() is not None,
                    async_op=bool(
                        bound.arguments.get("async_op", name in ("isend", "irecv", "batch_isend_irecv"))
                    ),
                    shapes=shapes,
                )
                for counter in list(_active):
                    counter._add(rec)
            return out
        finally:
            _tls.depth = depth

    wrapper.__name__ = getattr(orig, "__name__", name)
    wrapper.__qualname__ = getattr(orig, "__qualname__", name)
    wrapper.__doc__ = getattr(orig, "__doc__", None)
    wrapper.__wrapped__ = orig  # type: ignore[attr-defined]
    wrapper._mmfast_counting = True  # type: ignore[attr-defined]
    return wrapper


def _patch() -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in PATCHED_OPS:
        orig = getattr(c10d, name, None) or getattr(dist, name, None)
        if orig is None or getattr(orig, "_mmfast_counting", False):
            continue
        _originals[name] = orig
        _wrappers[name] = _make_wrapper(name, orig)
        for mod in (dist, c10d):
            if getattr(mod, name, None) is orig:
                setattr(mod, name, _wrappers[name])


def _unpatch() -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name, wrapper in list(_wrappers.items()):
        for mod in (dist, c10d):
            if getattr(mod, name, None) is wrapper:
                setattr(mod, name, _originals[name])
    _wrappers.clear()
    _originals.clear()


@contextlib.contextmanager
def count_collective_bytes() -> Iterator[CollectiveCounter]:
    """Record every ``torch.distributed`` collective called inside the block (see the module docstring).

    Yields a :class:`CollectiveCounter`; its ``records`` hold one :class:`CollectiveRecord` per call
    (op name, payload bytes, bytes sent by this rank under the stated ring/direct model, the group's
    world size and this rank's index in it, whether it ran in autograd backward). Blocks may nest (each
    counter sees the calls of its own block) and may be used from several threads; the
    ``torch.distributed`` functions are patched while at least one block is open. Works whether or not
    a process group is initialised (nothing is recorded without calls).
    """
    import torch.distributed as dist

    if not dist.is_available():
        yield CollectiveCounter()
        return
    counter = CollectiveCounter()
    with _state_lock:
        if not _active:
            _patch()
        _active.append(counter)
    try:
        yield counter
    finally:
        with _state_lock:
            _active.remove(counter)
            if not _active:
                _unpatch()
