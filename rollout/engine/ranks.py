"""Rank 0's handle on the other engine ranks: steps and control commands out, reports back.

Steps go by the ``StepChannel`` (one int64 tensor each). A control command that every rank applies
(weight updates and groups, memory, info) goes in two parts: the command object into each rank's
control queue, then a control marker down the step channel, so every rank applies it at the same
point between two steps. Each rank answers with one ``RankReport``; ``wait`` collects the answers of
one command.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rollout.batch import BatchPlan
from rollout.distributed.step_channel import StepChannel, TableWrite, encode_control, encode_step, encode_stop
from rollout.engine.messages import ControlCommand
from rollout.errors import UnavailableError

logger = logging.getLogger(__name__)

_POLL_S = 0.5  # how often a waiting call looks again whether the handle was closed


@dataclass(slots=True)
class RankReport:
    """One rank's answer to one control command (``op``)."""

    op: int
    rank: int
    result: Any = None
    error_code: str | None = None
    error_message: str | None = None
    weights_valid: bool = True  # after the command; False once this rank's weights were partly written
    memory: dict[str, dict[str, object]] = field(default_factory=dict)  # its memory states after the command


class Followers:
    """Ranks 1..size-1 seen from rank 0 (which owns the only scheduler)."""

    def __init__(self, channel: StepChannel, controls: list[Any], reports: Any) -> None:
        self.channel = channel
        self.size = channel.size
        self._controls = controls  # one queue per rank 1..size-1
        self._reports = reports  # one queue from all of them
        self._op = 0
        self._got: dict[int, list[RankReport]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="rank-reports", daemon=True)
        self._reader.start()

    def step(self, plan: BatchPlan, writes: list[TableWrite]) -> None:
        """Have every rank run ``plan`` (after applying rank 0's request-table ``writes``)."""
        self.channel.send(encode_step(plan, writes))

    def control(self, command: ControlCommand) -> int:
        """Have every rank apply ``command`` now; returns the id to ``wait`` for."""
        self._op += 1
        for q in self._controls:
            q.put((self._op, command))
        self.channel.send(encode_control(self._op))
        return self._op

    def wait(self, op: int, timeout: float | None = None) -> list[RankReport]:
        """The reports of every rank on ``op``, in rank order (blocks until all arrived)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while len(self._got.get(op, ())) < self.size - 1:
                if self._closed:
                    raise UnavailableError("the engine's ranks are stopping")
                left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if left <= 0:
                    missing = sorted(set(range(1, self.size)) - {r.rank for r in self._got.get(op, ())})
                    raise UnavailableError(f"engine ranks {missing} did not answer within {timeout:g} s")
                self._cond.wait(left)
            return sorted(self._got.pop(op), key=lambda r: r.rank)

    def stop(self) -> None:
        """Tell every rank to stop (after the last step), and stop reading reports."""
        try:
            self.channel.send(encode_stop())
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _read(self) -> None:
        while not self._closed:
            try:
                report = self._reports.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            with self._cond:
                self._got.setdefault(report.op, []).append(report)
                self._cond.notify_all()
