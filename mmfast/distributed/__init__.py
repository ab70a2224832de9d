"""Grouped all-gather and ring exchange for the contrastive losses."""

from mmfast.distributed.groups import GroupLayout, default_group_size, get_layout

__all__ = ["GroupLayout", "default_group_size", "get_layout"]
