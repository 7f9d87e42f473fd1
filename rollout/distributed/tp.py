"""``TPGroup``: this rank's place in a tensor-parallel group and the two collectives layers need.

There is no module-level group: the value is built once (``tp_group_from_default``) and handed to
each layer through its constructor, so a model built without one is the single-rank model with no
communication at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rollout.errors import InvalidArgumentError


@dataclass(frozen=True, eq=False)
class TPGroup:
    """Rank ``rank`` of ``size`` tensor-parallel ranks.

    ``group`` is the torch.distributed process group the collectives run on; None means the default
    group (and, at size 1, that no collective ever runs). Layers may read ``rank`` and ``size`` to
    pick their shard without any process group existing (e.g. to test a rank's weight loaders).
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    # MoE layers: partition the experts over the ranks (each rank whole experts, with this many spare
    # slots for copies of hot experts) instead of splitting every expert's intermediate dim.
    expert_parallel: bool = False
    spare_expert_slots: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise InvalidArgumentError(f"must be >= 1, got {self.size}", field="tp_size")
        if not 0 <= self.rank < self.size:
            raise InvalidArgumentError(f"{self.rank} not in [0, {self.size})", field="tp_rank")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks in place and return it (``x`` itself at size 1)."""
        if self.size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``x`` on every rank with rank ``src``'s ``x`` and return it (a no-op at size 1)."""
        if self.size > 1:
            dist.broadcast(x, src=self._global(src), group=self.group)
        return x

    def _global(self, rank: int) -> int:
        """The default group's rank of this group's ``rank`` (collectives name their source globally)."""
        if self.group is None or self.group is dist.group.WORLD:
            return rank
        return dist.get_global_rank(self.group, rank)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order (``x`` itself at size 1)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


SINGLE = TPGroup()


def tp_group_from_default() -> TPGroup:
    """The whole default process group (already initialised, e.g. gloo on CPU) as one TP group."""
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError("torch.distributed is not initialised", field="tp_size")
    return TPGroup(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank stores: its share, or one replicated head when there are fewer than ranks.

    Raises ``InvalidArgumentError`` unless one of the two counts divides the other.
    """
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise InvalidArgumentError(
                f"{num_kv_heads} kv heads not divisible by tp_size {tp_size}", field="num_key_value_heads"
            )
        return num_kv_heads // tp_size
    if tp_size % num_kv_heads:
        raise InvalidArgumentError(
            f"tp_size {tp_size} not a multiple of {num_kv_heads} kv heads", field="num_key_value_heads"
        )
    return 1
