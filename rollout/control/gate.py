"""GenerationGate: why generation is refused right now, one entry per cause.

Generation is refused (new requests fail with FAILED_PRECONDITION, queued ones wait) while any cause
is set. Each cause has one owner that sets and clears it: the weight updater (``WEIGHTS_INVALID``,
after a partly written update or a release without backup; ``WEIGHTS_UPDATING``, between the calls
of an update sent in several) and memory control (``MEMORY_RELEASED``).
"""

from __future__ import annotations

import enum


class Blocker(enum.Enum):
    """What can block generation."""

    WEIGHTS_INVALID = "weights"  # tensors were partly written, or released without a backup
    WEIGHTS_UPDATING = "updating"  # an update sent in several calls has not had its last one yet
    MEMORY_RELEASED = "memory"  # some tagged memory is released


class GenerationGate:
    """The set of causes blocking generation, each with the message a caller will read."""

    def __init__(self) -> None:
        self._causes: dict[Blocker, str] = {}

    def block(self, cause: Blocker, message: str) -> None:
        self._causes[cause] = message

    def clear(self, cause: Blocker) -> None:
        self._causes.pop(cause, None)

    def blocks(self, cause: Blocker) -> bool:
        return cause in self._causes

    @property
    def closed(self) -> bool:
        """True while any cause is set."""
        return bool(self._causes)

    def reason(self) -> str:
        """The messages of every cause, for the error a refused request gets."""
        return "; ".join(self._causes.values())
