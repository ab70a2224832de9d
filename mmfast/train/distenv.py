"""This process's place in a (torchrun) job: ranks, device, threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mmfast.train.config import ConfigError, TrainConfig

__all__ = ["DistEnv", "world_from_env", "pick_device", "init_distributed", "pick_threads"]


@dataclass
class DistEnv:
    """This process's place in the job (from torchrun's environment variables)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that evaluates, logs and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def world_from_env() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` as torchrun sets them (1 process otherwise)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local_rank, local_world


def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """``--device``: auto = CUDA (this process's LOCAL_RANK GPU) when available, else CPU."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: no CUDA GPU is available")
    if cfg.device.startswith("cuda:"):
        return torch.device(cfg.device)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(cfg: TrainConfig) -> DistEnv:
    """Join the process group (gloo on CPU, NCCL on GPU) when launched by torchrun with several processes."""
    rank, world, local_rank, local_world = world_from_env()
    device = pick_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=10))
        owns = True
    return DistEnv(rank, world, local_rank, local_world, device, owns)


def pick_threads(cfg: TrainConfig, env: DistEnv) -> int:
    """``--threads``, or: the cores of this node divided among its processes, and only 1 when the
    machine is already saturated (OpenMP threads that wait for a busy core slow every op down)."""
    if cfg.threads > 0:
        return cfg.threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, env.local_world_size))
    try:
        idle = cores - os.getloadavg()[0]
    except OSError:
        idle = cores
    return max(1, min(share, int(idle + 0.5)))
