"""Where the experts of one MoE layer live when they are partitioned over ranks (expert parallelism).

Every rank has ``slots`` physical expert slots. A placement says which logical expert each slot of
each rank holds (-1: empty). The first placement is contiguous (rank 0 the first experts, then
rank 1, ...; the last rank may hold fewer when the count does not divide). ``balanced`` builds a
placement from per-expert token counts: hot experts get extra copies in the spare slots, and the
copies are packed so every rank serves about the same number of tokens. A token routed to an expert
with several copies goes to copy ``(token + k) % copies`` (the same choice on every rank), so every
placement computes the same function; only which rank does the work changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.errors import InvalidArgumentError

Slots = tuple[tuple[int, ...], ...]  # slots[rank][slot] = logical expert, -1 for none


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    """The logical expert of every slot of every rank."""

    num_experts: int
    slots: Slots

    def __post_init__(self) -> None:
        held = {e for rank in self.slots for e in rank if e >= 0}
        if held != set(range(self.num_experts)):
            missing = sorted(set(range(self.num_experts)) - held)
            raise InvalidArgumentError(f"experts {missing[:8]} have no slot", field="placement")
        if len({len(r) for r in self.slots}) != 1:
            raise InvalidArgumentError("every rank needs the same number of slots", field="placement")

    @property
    def ranks(self) -> int:
        return len(self.slots)

    @property
    def slots_per_rank(self) -> int:
        return len(self.slots[0])

    @classmethod
    def contiguous(cls, num_experts: int, ranks: int, spare_slots: int = 0) -> ExpertPlacement:
        """Experts in rank order, ``ceil(E / ranks)`` per rank plus ``spare_slots`` empty ones."""
        per = -(-num_experts // ranks)
        slots = tuple(
            tuple(e if e < num_experts else -1 for e in range(r * per, (r + 1) * per)) + (-1,) * spare_slots
            for r in range(ranks)
        )
        return cls(num_experts, slots)

    def copies(self) -> list[list[tuple[int, int]]]:
        """For every expert, its (rank, slot) copies in rank-then-slot order."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        for r, rank in enumerate(self.slots):
            for s, e in enumerate(rank):
                if e >= 0:
                    out[e].append((r, s))
        return out

    def routing_tables(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(count (E,), rank (E, R), slot (E, R))`` int64: copy ``j`` of expert ``e`` is slot
        ``slot[e, j]`` of rank ``rank[e, j]`` for ``j < count[e]``; ``R`` = the number of ranks."""
        copies = self.copies()
        count = torch.tensor([len(c) for c in copies], dtype=torch.int64)
        rank = torch.zeros(self.num_experts, self.ranks, dtype=torch.int64)
        slot = torch.zeros(self.num_experts, self.ranks, dtype=torch.int64)
        for e, cs in enumerate(copies):
            for j, (r, s) in enumerate(cs[: self.ranks]):
                rank[e, j], slot[e, j] = r, s
        return count.to(device), rank.to(device), slot.to(device)

    def rank_loads(self, counts: list[float]) -> list[float]:
        """Tokens each rank serves under this placement (an expert's tokens split evenly over its copies)."""
        loads = [0.0] * self.ranks
        for e, cs in enumerate(self.copies()):
            for r, _ in cs:
                loads[r] += counts[e] / len(cs)
        return loads

    def balancedness(self, counts: list[float]) -> float:
        """Mean over max of the ranks' loads: 1.0 is perfectly even (1.0 when there is no load)."""
        loads = self.rank_loads(counts)
        top = max(loads)
        return 1.0 if top == 0 else sum(loads) / len(loads) / top


def balanced(counts: list[float], ranks: int, slots_per_rank: int) -> ExpertPlacement:
    """A placement for these per-expert token counts: spare slots hold copies of the hottest
    experts (by tokens per copy), then copies go heaviest first to the least loaded rank that has a
    free slot and no copy of that expert yet. Deterministic."""
    num_experts = len(counts)
    total = ranks * slots_per_rank
    if total < num_experts:
        raise InvalidArgumentError(f"{total} slots for {num_experts} experts", field="placement")
    n_copies = [1] * num_experts
    for _ in range(total - num_experts):
        e = max(range(num_experts), key=lambda i: (counts[i] / n_copies[i] if n_copies[i] < ranks else -1.0, -i))
        if n_copies[e] >= ranks:
            break  # every expert is on every rank already
        n_copies[e] += 1
    items = sorted(((counts[e] / n_copies[e], e) for e in range(num_experts) for _ in range(n_copies[e])),
                   key=lambda t: (-t[0], t[1]))
    loads = [0.0] * ranks
    slots: list[list[int]] = [[] for _ in range(ranks)]
    for load, e in items:
        open_ranks = [r for r in range(ranks) if len(slots[r]) < slots_per_rank]
        free = [r for r in open_ranks if e not in slots[r]] or open_ranks  # a second copy on one rank is harmless
        r = min(free, key=lambda i: (loads[i], i))
        slots[r].append(e)
        loads[r] += load
    return ExpertPlacement(num_experts, tuple(tuple(sorted(s)) + (-1,) * (slots_per_rank - len(s)) for s in slots))
