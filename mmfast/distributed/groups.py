"""Rank groups for the grouped all-gather.

Ranks of a process group of size W form ``W // group_size`` groups of ``group_size`` consecutive
ranks (rank = group_index * group_size + position). Two families of sub-groups are used:

* ``intra``: the ranks of one group (usually one node: NVLink), for all-gather / reduce-scatter;
* ``column``: the ranks with the same position in every group (one per node), which carry the
  blocks of other groups: an all-gather over this ring of ``W // group_size`` ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class GroupLayout:
    world_size: int
    rank: int
    group_size: int
    num_groups: int
    group_index: int
    position: int
    group: object | None  # the parent process group (None = WORLD)
    intra: object | None  # None when group_size == 1
    column: object | None  # None when num_groups == 1


_CACHE: dict[tuple, GroupLayout] = {}


def default_group_size(world_size: int) -> int:
    """Ranks per node: LOCAL_WORLD_SIZE (set by torchrun) when it divides the world size, else W."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local and local.isdigit() and int(local) > 0 and world_size % int(local) == 0:
        return int(local)
    return world_size


def validate_group_size(group_size: int | None, world_size: int) -> int:
    if group_size is None:
        return default_group_size(world_size)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if world_size % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide the world size {world_size}")
    return group_size


def get_layout(group, group_size: int) -> GroupLayout:
    """The (cached) layout for ``group`` (None = WORLD). Creating it is collective: every rank of
    the process group must call it with the same group_size, in the same order."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    key = (id(group) if group is not None else None, world, group_size)
    layout = _CACHE.get(key)
    if layout is not None:
        return layout
    num_groups = world // group_size

    def glob(r: int) -> int:
        return r if group is None else dist.get_global_rank(group, r)

    intra = column = None
    # new_group is collective over the default group: every rank creates every sub-group.
    if group_size > 1:
        for k in range(num_groups):
            pg = dist.new_group([glob(k * group_size + p) for p in range(group_size)])
            if k == rank // group_size:
                intra = pg
    if num_groups > 1:
        for p in range(group_size):
            pg = dist.new_group([glob(k * group_size + p) for k in range(num_groups)])
            if p == rank % group_size:
                column = pg
    layout = GroupLayout(world, rank, group_size, num_groups, rank // group_size, rank % group_size, group,
                         intra, column)
    _CACHE[key] = layout
    return layout
