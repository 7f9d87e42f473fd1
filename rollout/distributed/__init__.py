"""Tensor-parallel groups: the value that layers receive to know their shard and to communicate."""

from rollout.distributed.tp import SINGLE, TPGroup, kv_heads_per_rank, tp_group_from_default

__all__ = ["SINGLE", "TPGroup", "kv_heads_per_rank", "tp_group_from_default"]
