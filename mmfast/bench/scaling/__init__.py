"""Scaling model of the distributed contrastive losses: memory, bytes and step time per rank, 8 to 4096 GPUs.

``python -m mmfast.bench.scaling`` writes a table, JSON/CSV rows and a PNG of the predicted loss step
time and peak loss memory against the world size for every scheme (see :func:`main`).

What is predicted, per rank and per step (loss forward + backward, the features given):

* the **collectives as each implementation issues them** (:class:`Collective`: op, sub-group, payload
  bytes, dtype, forward/backward; :class:`Stage`: what runs in sequence and what overlaps), read off
  the code:

  - ``mmfast`` (:mod:`mmfast.distributed.contrastive`, ``group_size`` g, ``K = W // g`` groups),
    both exchanges start with the header: one world ``all_gather_into_tensor`` of 8 fp64 a rank.
    Reduce-scatters (:func:`mmfast.distributed.comm.reduce_scatter`) are ``reduce_scatter_tensor``
    on NCCL and ``all_to_all_single`` of the same input (plus a local sum) on gloo.

    ``exchange="gather"`` (:mod:`mmfast.distributed.gather`): forward: the texts
    ``all_gather_into_tensor`` over ``column`` (K ranks, ``B*D`` elements each); the column block
    ``all_gather_into_tensor`` over ``intra`` (g ranks, ``K*B*D``), async, overlapped with the column
    block's tiles; CLIP adds one world ``all_reduce`` of ``2N + 3`` fp64 (column statistics and the
    loss terms, N = W*B). Backward: CLIP with ``gather_with_grad`` one scalar
    (``all_gather_into_tensor`` with ``local_loss``, else ``all_reduce``); the text-gradient
    partials reduce-scattered over ``intra`` (input ``g*K*B*D``), async, overlapped with the column
    block's tiles, then over ``column`` (input ``K*B*D``), in the feature dtype.

    ``exchange="ring"`` (:mod:`mmfast.distributed.ring`, :func:`predict_mmfast_ring`): the texts
    travel in ``B*D`` pieces. Forward: per step (K of them) one ``batch_isend_irecv`` inside the
    group (g > 1: the ring piece of this position to and from the g-1 other members, each overlapped
    with the other members' pieces' tiles) and K-1 column ring steps (one ``batch_isend_irecv`` of
    one ``B*D`` isend + one irecv), overlapped with the ring piece's tiles; CLIP one world
    ``all_reduce`` of ``2N + 4`` fp64 (with a failure flag), SigLIP one of 1 fp64. Backward: the
    upstream-gradient scalar as for gather; the own block last; per step the group piece exchange
    again, a group exchange of gradient partials (g-1 ``B*D`` sends and receives in the accumulation
    dtype: fp32, fp64 for fp64 features), K-1 text ring steps and K-1 gradient-sum ring steps (one
    step behind the texts); one 1-fp64 ``all_reduce``. Apart from the header, no all-gather,
    all-to-all or reduce-scatter.
  - ``open_clip`` ``ClipLoss`` (``gather_features``): two world ``all_gather`` (list) of ``B*D``;
    with ``gather_with_grad`` their backward is, on NCCL, two ``reduce_scatter`` (list) and, on gloo,
    ``torch.distributed.nn``'s all-to-all emulation, ``W`` ``scatter`` calls each of which this rank
    is the root of one. No overlap.
  - ``open_clip`` ``SigLipLoss`` ``bidir``: ``(W-1)//2`` ``batch_isend_irecv`` of two ``B*D`` sends
    (left and right) and one of a single send when ``W-1`` is odd, the same again in backward,
    blocking (``shift``: ``W-1`` single sends each way).
  - ``Inf-CL`` ring (model only, not installed here; from its published ``inf_cl/ring.py``): one call
    per direction (image->text and text->image, both needed for CLIP); in each call the ``k``
    features, cast to fp32, go around the ring in ``W-1`` ``batch_isend_irecv`` sends to rank+1 while
    step ``s``'s ``B x B`` tile is computed (forward); backward sends ``k`` again ``W-1`` times and the
    fp32 gradient block ``W`` times (it returns to its owner), each overlapped with the next tile;
    the trainable scale adds one scalar ``all_reduce`` per call.

* **bytes sent per rank** with the per-op byte model of :mod:`mmfast.bench.comm` (exactly: the
  distributed tests check the prediction against :func:`~mmfast.bench.comm.count_collective_bytes`),
  split into **intra-node and inter-node** for the *edge rank* ``gpus_per_node - 1`` (ranks are
  node-major; every ring and neighbour exchange leaves node 0 there, so it is the rank whose links
  carry the most inter-node bytes), and ``node_inter_bytes``: everything leaving one node, which the
  node's NICs share.

* **time** with an alpha-beta model per collective as issued: a ring collective over ``m`` ranks is
  ``steps * (alpha + chunk * beta)`` (all-gather ``m-1`` steps of the input, reduce-scatter ``m-1``
  of ``input/m``, all-reduce ``2(m-1)`` of ``n/m``, or a double binary tree ``2*ceil(log2 m)*alpha +
  2n*beta`` when that is faster, as NCCL would pick); ``alpha`` is the latency of the slowest hop of
  the ring; ``beta`` the slowest link: an NVLink hop costs ``1/bw_intra`` per byte, an inter-node hop
  ``X/(nics*bw_inter)`` where ``X`` is the number of hops of all the rings of the same op running
  at once (every ``intra`` group, or every ``column``) that leave one node: a node's NICs are
  shared by them (NCCL spreads a ring's node-crossing traffic over the channels of every NIC). A
  point-to-point send uses one NIC; gloo's all-to-all is timed as ``m-1`` pairwise steps of one
  chunk. Stages run one after the other; an overlapped stage costs ``max(communication,
  compute)``; in a ``concurrent`` stage (the ring's steps) collectives of different sub-group
  families (``column`` ring steps, ``intra`` all-gathers) run at once and those of one family
  (texts and gradient sums on the column ring) add up.

* **compute** from the throughput of the tile kernels (:class:`ComputeRates`; measured here by
  :func:`calibrate_compute`, or a recorded GPU figure such as :data:`H200_BF16`): the fused kernels do
  ``2*M*N*D`` FLOPs forward (logits once, row and column statistics together) and ``6*M*N*D``
  backward (logits again, then both gradients). open_clip is charged its GEMMs at the GEMM rate plus
  its passes over the materialised logits at the memory bandwidth. Both are also charged their
  elementwise copies of ``O(N*D)`` buffers (mmfast: the other groups' columns, the zeroed fp32
  partials and their casts; open_clip: the concatenation of the gathered lists) at ``mem_bw``.
  Python and kernel-launch overheads are not modelled.

* **peak loss memory** per rank (bytes allocated inside the loss call, features excluded), replaying
  each implementation's allocations in order (mmfast gather: the gathered texts, the gradient
  partials, their padded and transposed copies and the copies made for the column sets,
  ``O(W*B*D)``; mmfast ring: the group's pieces of the block in hand, the next ring piece in
  flight, the tiles' gradient partials and the running sum, ``O(g*B*D)``, plus ``O(W*B)``
  statistics; open_clip: gathered features and the ``B x W*B`` logits with their log-softmax,
  ``O(W*B*D + W*B^2)``; Inf-CL: fp32 blocks, ``O(B*D)``). The
  mmfast replays (:class:`_Heap`) free a tensor when the last variable of the code holding it lets
  go. ``backend="nccl"`` is a GPU (NCCL, the Triton kernels' gradient partials, H200 launch
  geometry); ``backend="gloo"`` adds what gloo and the C++ kernels allocate on a CPU, so that the
  distributed tests can check the prediction against the profiler.

:func:`recommend` / :func:`recommend_config` pick mmfast's ``(group_size, exchange)`` together: the
least predicted step time among the configurations whose loss memory fits a budget (default 512 MiB,
the budget of ``exchange="auto"``). :func:`predict_mmfast` with ``order="intra-first"`` is a what-if
(mmfast's first implementation, which gathered inside the group first): see its docstring. Every
figure is per rank and per step, for equal local batch sizes.

The package, one module per part of the model: :mod:`~mmfast.bench.scaling.hardware` (links, clusters,
rates, the problem, the byte model), :mod:`~mmfast.bench.scaling.collectives` (collectives, stages,
topology), :mod:`~mmfast.bench.scaling.prediction` (the result), :mod:`~mmfast.bench.scaling.memory`
(the allocation replays), :mod:`~mmfast.bench.scaling.predict` (the schemes and the recommendation),
:mod:`~mmfast.bench.scaling.calibrate` and :mod:`~mmfast.bench.scaling.report` (the command line).
"""

from mmfast.bench.scaling.calibrate import calibrate_compute, fit_alpha_beta, rates_from_json
from mmfast.bench.scaling.collectives import Collective, Stage
from mmfast.bench.scaling.hardware import (
    DEFAULT_MEMORY_BUDGET,
    DGX_H200,
    EXCHANGES,
    H200_BF16,
    IB_400G,
    NVLINK,
    OPEN_CLIP_LOGIT_PASSES,
    OPEN_CLIP_SIGLIP_PASSES,
    Cluster,
    ComputeRates,
    Link,
    Problem,
    comm_sent_bytes,
    dtype_bytes,
)
from mmfast.bench.scaling.predict import (
    predict_all,
    predict_inf_cl,
    predict_mmfast,
    predict_mmfast_ring,
    predict_open_clip_clip,
    predict_open_clip_siglip,
    recommend,
    recommend_config,
)
from mmfast.bench.scaling.prediction import Prediction
from mmfast.bench.scaling.report import format_table, main, plot, simulate, write_outputs

__all__ = [
    "Link",
    "Cluster",
    "ComputeRates",
    "Problem",
    "Collective",
    "Stage",
    "Prediction",
    "NVLINK",
    "IB_400G",
    "H200_BF16",
    "DGX_H200",
    "OPEN_CLIP_LOGIT_PASSES",
    "OPEN_CLIP_SIGLIP_PASSES",
    "dtype_bytes",
    "comm_sent_bytes",
    "predict_mmfast",
    "predict_mmfast_ring",
    "predict_open_clip_clip",
    "predict_open_clip_siglip",
    "predict_inf_cl",
    "predict_all",
    "recommend",
    "recommend_config",
    "EXCHANGES",
    "DEFAULT_MEMORY_BUDGET",
    "calibrate_compute",
    "rates_from_json",
    "fit_alpha_beta",
    "simulate",
    "format_table",
    "plot",
    "write_outputs",
    "main",
]

