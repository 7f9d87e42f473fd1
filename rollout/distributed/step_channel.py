"""What rank 0 sends the other ranks, in the order they must act on it: steps, control, stop.

A step is the plan's token layout (rows, prefix and extend lengths, which entries sample, input ids,
KV slots) plus the request-table writes rank 0 made since the previous step; that is all a rank
needs to run the same forward (rank 0 samples and broadcasts the tokens). Everything is packed into
one int64 tensor: no Python object is pickled per step. A control message only says "apply the next
control command now" (the command itself goes by a queue: see ``rollout.engine.ranks``), so each
rank applies it at the same point between steps.

Wire form: an 8-entry header ``[kind, body_len, n_entries, n_tokens, n_writes, future_inputs, op, 0]``
then the body, each sent with one broadcast from rank 0 on the plan group.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rollout.batch import BatchPlan

_HEADER = 8


class Kind(enum.IntEnum):
    STEP = 1
    CONTROL = 2
    STOP = 3


TableWrite = tuple[int, int, list[int]]  # (row, start, slots): table[row, start:start+len] = slots


@dataclass(slots=True)
class RankMessage:
    """One decoded message: a step (``plan`` and ``writes``), a control (``op``) or a stop."""

    kind: Kind
    plan: BatchPlan | None = None
    writes: list[TableWrite] = field(default_factory=list)
    op: int = 0


def encode_step(plan: BatchPlan, writes: list[TableWrite]) -> torch.Tensor:
    """The int64 wire form of one step (header and body)."""
    n, t = len(plan.rows), len(plan.input_ids)
    lens = [len(s) for _, _, s in writes]
    body = [
        *plan.rows, *plan.prefix_lens, *plan.extend_lens, *(int(s) for s in plan.sample),
        *plan.input_ids, *plan.out_slots,
        *(r for r, _, _ in writes), *(s for _, s, _ in writes), *lens,
        *(x for _, _, slots in writes for x in slots),
    ]
    header = [int(Kind.STEP), len(body), n, t, len(writes), int(plan.future_inputs), 0, 0]
    return torch.tensor(header + body, dtype=torch.int64)


def encode_control(op: int) -> torch.Tensor:
    return torch.tensor([int(Kind.CONTROL), 0, 0, 0, 0, 0, op, 0], dtype=torch.int64)


def encode_stop() -> torch.Tensor:
    return torch.tensor([int(Kind.STOP), 0, 0, 0, 0, 0, 0, 0], dtype=torch.int64)


def decode(header: torch.Tensor, body: torch.Tensor | None) -> RankMessage:
    """The message of a received ``header`` (8 entries) and ``body``."""
    kind, _, n, t, w, future, op, _ = header.tolist()
    kind = Kind(kind)
    if kind is not Kind.STEP:
        return RankMessage(kind, op=op)
    v = body.tolist() if body is not None else []
    cuts = [n, n, n, n, t, t, w, w, w]
    parts, at = [], 0
    for c in cuts:
        parts.append(v[at: at + c])
        at += c
    rows, prefix, extend, sample, input_ids, out_slots, wrows, wstarts, wlens = parts
    writes = []
    for r, s, k in zip(wrows, wstarts, wlens):
        writes.append((r, s, v[at: at + k]))
        at += k
    plan = BatchPlan(rows=rows, prefix_lens=prefix, extend_lens=extend, input_ids=input_ids, out_slots=out_slots,
                     sample=[bool(x) for x in sample], sampling=[], seeds=[], steps=[], banned=[],
                     return_logprob=False, return_raw_logprob=False, top_logprobs_num=0,
                     future_inputs=bool(future))
    return RankMessage(Kind.STEP, plan=plan, writes=writes)


class StepChannel:
    """Rank 0 -> every other rank, in order, by broadcast on a gloo group (host tensors)."""

    def __init__(self, group: dist.ProcessGroup | None, size: int) -> None:
        self.group = group
        self.size = size

    def send(self, wire: torch.Tensor) -> None:
        """On rank 0: deliver one encoded message to every other rank."""
        if self.size == 1:
            return
        dist.broadcast(wire[:_HEADER].contiguous(), src=0, group=self.group)
        if wire.numel() > _HEADER:
            dist.broadcast(wire[_HEADER:].contiguous(), src=0, group=self.group)

    def recv(self) -> RankMessage:
        """On any other rank: wait for rank 0's next message."""
        header = torch.empty(_HEADER, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group)
        body_len = int(header[1])
        body = None
        if body_len:
            body = torch.empty(body_len, dtype=torch.int64)
            dist.broadcast(body, src=0, group=self.group)
        return decode(header, body)
