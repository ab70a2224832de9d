"""The scaling model's inputs: links, clusters, compute rates, the problem, dtypes, and the
per-op byte model (what one collective sends per rank)."""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8}


#: The exchange schemes of mmfast's distributed losses that the model predicts.
EXCHANGES = ("gather", "ring")
#: The per-rank loss memory a recommendation must fit by default: 512 MiB, the budget of mmfast's
#: ``exchange="auto"`` (mmfast.distributed.contrastive.set_memory_budget's default).
DEFAULT_MEMORY_BUDGET = 512 * 2**20


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype given by name (``"bfloat16"``, ``"torch.float32"``...)."""
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def stat_bytes(dtype: str) -> int:
    """The tile kernels' statistics / gradient-partial dtype: fp64 for fp64 features, else fp32."""
    return 8 if dtype_bytes(dtype) == 8 else 4


# ------------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Link:
    """One link type: ``bandwidth`` in bytes/s per direction per GPU, ``latency`` (alpha) in seconds."""

    bandwidth: float
    latency: float


#: NVLink 4 through NVSwitch (H100/H200 SXM): 450 GB/s per direction per GPU, ~3 us.
NVLINK = Link(bandwidth=450 * GB, latency=3e-6)
#: 400 Gb/s InfiniBand NDR, one NIC per GPU: 50 GB/s per direction, ~5 us.
IB_400G = Link(bandwidth=50 * GB, latency=5e-6)


@dataclass(frozen=True)
class Cluster:
    """Nodes of ``gpus_per_node`` GPUs (ranks node-major), NVLink inside a node, NICs between nodes.

    ``nics_per_node`` (default ``gpus_per_node``) NICs of ``inter`` each; a ring collective's
    node-crossing traffic is spread over them, a point-to-point send uses ``p2p_nics`` of them.
    ``allreduce``: ``"auto"`` (the faster of ring and tree), ``"ring"`` or ``"tree"``.
    """

    gpus_per_node: int = 8
    intra: Link = NVLINK
    inter: Link = IB_400G
    nics_per_node: int | None = None
    p2p_nics: int = 1
    allreduce: str = "auto"
    name: str = ""

    @property
    def nics(self) -> int:
        """NICs per node."""
        return self.nics_per_node or self.gpus_per_node


#: Nodes of 8 H200 on NVSwitch, one 400 Gb/s NIC per GPU.
DGX_H200 = Cluster(name="8x H200 per node, NVLink 450 GB/s 3 us + 8x 400 Gb/s IB 5 us")


@dataclass(frozen=True)
class ComputeRates:
    """Throughputs the compute terms use.

    ``tile_fwd`` / ``tile_bwd``: FLOP/s of the fused tile kernels, counting ``2*M*N*D`` FLOPs for a
    forward call on an ``M x N`` tile of dimension ``D`` and ``6*M*N*D`` for a backward call.
    ``gemm``: FLOP/s of a dense matmul (open_clip's logits). ``mem_bw``: bytes/s (read + written) of
    an elementwise pass into a fresh buffer (open_clip's softmax over the materialised logits, the
    copies both make of ``O(N*D)`` buffers). ``source`` says where they come from.
    """

    tile_fwd: float
    tile_bwd: float
    gemm: float
    mem_bw: float
    source: str = ""


#: H200 SXM, bf16: dense GEMM peak ~790 TFLOP/s (the figure recorded for it), HBM3e 4.8 TB/s.
#: Assumed fractions: the fused tile kernels reach 50% of the GEMM peak forward and 40% backward
#: (flash-attention-like kernels: the exp/log-sum work and the recomputation cost throughput),
#: cuBLAS GEMMs 75%, elementwise passes 80% of the HBM bandwidth.
H200_BF16 = ComputeRates(
    tile_fwd=0.50 * 790e12,
    tile_bwd=0.40 * 790e12,
    gemm=0.75 * 790e12,
    mem_bw=0.80 * 4.8e12,
    source="H200 recorded figures: 790 TFLOP/s bf16 GEMM peak (tile 50%/40%, GEMM 75%), HBM 4.8 TB/s (80%)",
)

#: open_clip ClipLoss: elementwise passes over each ``B x N`` logits matrix (forward: matmul
#: write, log_softmax read + write; backward: the nll gradient write, log_softmax backward two reads
#: and a write, two matmul reads).
OPEN_CLIP_LOGIT_PASSES = 9
#: open_clip SigLipLoss: passes over each ``B x B`` block (logits, +bias, the labels, labels*logits,
#: logsigmoid, sum; and backward).
OPEN_CLIP_SIGLIP_PASSES = 16


@dataclass(frozen=True)
class Problem:
    """One loss call: ``world`` ranks, ``batch`` pairs per rank, embedding ``dim``, feature ``dtype``."""

    world: int
    batch: int
    dim: int
    dtype: str = "bfloat16"

    @property
    def n(self) -> int:
        """Global batch ``N = W * B``."""
        return self.world * self.batch

    @property
    def es(self) -> int:
        """Bytes per feature element."""
        return dtype_bytes(self.dtype)


# ----------------------------------------------------------------------------------- byte model


def comm_sent_bytes(op: str, n: int, m: int, *, root: bool = True) -> int:
    """Bytes one rank sends for one call, under :mod:`mmfast.bench.comm`'s model.

    ``n``: the payload named in that model (the input tensor; for the list forms one chunk and, for
    ``reduce_scatter``, the whole input list is ``m`` chunks of ``n``), ``m``: the sub-group's size.
    ``root``: for ``scatter``, whether this rank is the root.
    """
    if op in ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
        return (m - 1) * n
    if op in ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base"):
        return (m - 1) * n // m
    if op == "reduce_scatter":  # n: one chunk of the m-chunk input list
        return (m - 1) * n
    if op == "all_to_all_single":  # n: the input; its own 1/m stays
        return n - n // m
    if op == "all_reduce":
        return 2 * (m - 1) * n // m
    if op == "scatter":  # n: one chunk; the root sends every chunk but its own
        return (m - 1) * n if root else 0
    if op in ("send", "isend", "batch_isend_irecv"):
        return n
    raise ValueError(f"no byte model for {op!r}")
