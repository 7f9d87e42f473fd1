"""Expert load balancing with expert parallelism: token counts, new placements, moving expert weights.

Every rank records, per MoE layer, how many tokens were routed to each expert (the routing is the
same on every rank, so the counts are too). A rebalance computes a placement per layer from those
counts on rank 0 (``plan``), then every rank applies the same placements (``apply``): for each
expert whose new slot held something else, one rank that holds it broadcasts its weights and the
ranks that need it copy them in, after all of that layer's broadcasts (so no slot is overwritten
while it is still a source). Weights move in place: CUDA graphs and the weights' memory region stay
valid. The routing tables change in place too, and outputs stay the same (only which rank computes
which token's expert changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rollout.errors import FailedPreconditionError, InvalidArgumentError
from rollout.layers.expert_placement import ExpertPlacement, Slots, balanced
from rollout.layers.moe import SparseMoeBlock


@dataclass(frozen=True, slots=True)
class RebalanceReport:
    """Balancedness (mean over max of rank loads, averaged over layers) of the counted tokens under
    the old and the new placements, and how many expert copies moved."""

    balancedness_before: float
    balancedness_after: float
    moved: int
    tokens: int  # (token, expert) pairs counted since the previous rebalance


class ExpertBalancer:
    """The expert-parallel MoE layers of one rank's model."""

    def __init__(self, model: nn.Module) -> None:
        moe = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        self.has_moe = bool(moe)
        self.blocks = [m for m in moe if m.experts.placement is not None]

    @property
    def enabled(self) -> bool:
        return bool(self.blocks)

    def check_enabled(self) -> None:
        """Raise FAILED_PRECONDITION, saying what to change, unless there are experts to rebalance."""
        if self.enabled:
            return
        if not self.has_moe:
            raise FailedPreconditionError(
                "expert rebalancing needs an MoE model served with ep_size > 1; this model has no MoE layers")
        raise FailedPreconditionError(
            "expert rebalancing needs an MoE model served with ep_size > 1; this engine does not partition its "
            "experts over ranks (ep_size 1): start it with ep_size=N (rollout serve --ep-size N), and "
            "ep_spare_slots (--ep-spare-slots) for copies of hot experts")

    def counts(self) -> list[list[int]]:
        """Per layer, tokens routed to each expert since the last rebalance."""
        return [b.expert_counts.tolist() for b in self.blocks]

    def plan(self) -> tuple[Slots, ...]:
        """Rank 0: a balanced placement for every layer from its counts (the current one where the
        balanced one is no more even)."""
        self.check_enabled()
        out = []
        for block, counts in zip(self.blocks, self.counts()):
            current = block.experts.placement
            load = [float(c) for c in counts]
            new = balanced(load, current.ranks, current.slots_per_rank)
            # Every moved expert costs a broadcast of its weights: move only for a better balance (a
            # layer with no tokens counted, or one already as even, keeps its placement).
            out.append(new.slots if new.balancedness(load) > current.balancedness(load) else current.slots)
        return tuple(out)

    def apply(self, placements: tuple[Slots, ...]) -> RebalanceReport:
        """Every rank, in the same order: move the weights, switch the routing, reset the counts."""
        if len(placements) != len(self.blocks):
            raise InvalidArgumentError(f"{len(placements)} placements for {len(self.blocks)} MoE layers",
                                       field="placements")
        counts = self.counts()
        before, after, moved = [], [], 0
        for block, slots, c in zip(self.blocks, placements, counts):
            old = block.experts.placement
            new = ExpertPlacement(old.num_experts, slots)
            if (new.ranks, new.slots_per_rank) != (old.ranks, old.slots_per_rank):
                raise InvalidArgumentError("a placement must keep the ranks and slots per rank", field="placements")
            before.append(old.balancedness([float(x) for x in c]))
            after.append(new.balancedness([float(x) for x in c]))
            moved += _move(block, old, new)
            block.expert_counts.zero_()
        n = max(len(before), 1)
        return RebalanceReport(sum(before) / n, sum(after) / n, moved, int(sum(sum(c) for c in counts[:1])))


@torch.no_grad()
def _move(block: SparseMoeBlock, old: ExpertPlacement, new: ExpertPlacement) -> int:
    """Give this rank's slots their new experts' weights; returns the copies moved (all ranks)."""
    experts = block.experts
    tp, me = experts.tp, experts.tp.rank
    changed = [(r, s, e) for r in range(new.ranks) for s, e in enumerate(new.slots[r])
               if e >= 0 and old.slots[r][s] != e]
    sources = old.copies()
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    for e in sorted({e for _, _, e in changed}):
        src_rank, src_slot = sources[e][0]
        mine = [s for r, s, x in changed if r == me and x == e]
        for param in (experts.w13, experts.w2):
            buf = param.data[src_slot].clone() if me == src_rank else torch.empty_like(param.data[0])
            tp.broadcast(buf, src=src_rank)
            staged += [(param.data[s], buf) for s in mine]
    for dst, buf in staged:  # after every broadcast of the layer: no source is overwritten early
        dst.copy_(buf)
    experts.placement = new
    count, rank, slot = new.routing_tables(experts.copy_count.device)
    experts.copy_count.copy_(count)
    experts.copy_rank.copy_(rank)
    experts.copy_slot.copy_(slot)
    return len(changed)
