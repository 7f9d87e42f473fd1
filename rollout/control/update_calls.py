"""An update sent in several calls (``UpdateWeightsFromTensor.more``): what its earlier calls wrote.

A trainer that stages one bucket at a time (the verl adapter) sends each bucket as its own call. The
calls of one update carry one version; between them generation waits (``Blocker.WEIGHTS_UPDATING``),
and the last call (``more`` False) makes the version current with every call's tensors counted. If a
call fails once earlier ones were written, the weights are a mix of two versions: they count as
invalid (``Blocker.WEIGHTS_INVALID``) until an update that covers every parameter succeeds. A call
of another version while an update is open starts a new update (the open one's sender is gone): the
open one is abandoned the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rollout.control.gate import Blocker, GenerationGate
from rollout.errors import FailedPreconditionError


@dataclass
class UpdateInCalls:
    """The update whose last call has not come yet (``version`` None: none is open)."""

    # On an engine rank > 0 rank 0 decides: a call this rank finds at odds with its own open update
    # (a call rank 0 took and this rank refused, or the reverse, left the two apart) starts a new
    # update here without marking anything (``version_of``, ``check_swap``).
    follower: bool = False
    version: int | None = None
    written: set[str] = field(default_factory=set)
    # parameter -> shards the calls wrote (q in one call, k and v in the next fill qkv_proj)
    coverage: dict[str, set] = field(default_factory=dict)
    calls: int = 0
    drafted: int = 0  # draft model tensors its calls wrote

    @property
    def open(self) -> bool:
        return self.version is not None

    def version_of(self, version: int | None, gate: GenerationGate) -> int | None:
        """The version a call makes current: its own, or (None) the open update's.

        A call of another version while an update is open starts a new update: the open one's sender
        is gone (a trainer that failed mid-update and sends its next step), so it is abandoned and the
        weights count as invalid until the new one covers every parameter. On a rank > 0 rank 0 has
        decided that already: the stale update is closed without touching this rank's gate."""
        if not self.open or version is None or version == self.version:
            return self.version if self.open else version
        if self.follower:
            self.close()
        else:
            self.abandon(f"a call of version {version} started another update", gate)
        return version

    def add(self, version: int, written: set[str], drafted: bool) -> None:
        """A call with more to follow wrote ``written`` (and draft tensors if ``drafted``)."""
        self.version = version
        self.written |= written
        self.calls += 1
        self.drafted += int(drafted)

    def close(self) -> tuple[set[str], int, int]:
        """End the open update; returns what its earlier calls wrote, how many there were, and how
        many of them wrote draft tensors."""
        out = (self.written, self.calls, self.drafted)
        self.version, self.written, self.calls, self.drafted = None, set(), 0, 0
        self.coverage = {}
        return out

    def abandon(self, why: str, gate: GenerationGate) -> str:
        """The open update stops short: its calls left a mix of two versions, so the weights count
        as invalid until a full update. Returns the message a caller reads."""
        _, calls, _ = self.close()
        gate.clear(Blocker.WEIGHTS_UPDATING)
        msg = (f"the weights are invalid: an update sent in several calls stopped after {calls} of them ({why}); "
               "push a full set of weights")
        gate.block(Blocker.WEIGHTS_INVALID, msg)
        return msg

    def check_swap(self, cmd: Any) -> None:
        """A swap update neither comes in several calls nor starts while such an update is open (on a
        rank > 0, an update still open is one rank 0 has ended: it is closed, as in ``version_of``)."""
        if not getattr(cmd, "swap", False):
            return
        if self.follower and self.open:
            self.close()
        if getattr(cmd, "more", False) or self.open:
            raise FailedPreconditionError("a swap update cannot come in several calls, nor between the calls "
                                          "of an update that does")
