"""The engine side of an ``EngineClient`` without an engine: for timing and testing the front end.

``StandInLoop`` records the commands a client sends, answers each control call at once (so
``EngineClient.shutdown`` returns) and hands over whatever event lists are put in ``inbox``, as an
engine loop hands over one list per step. Used by ``examples/profile_stream_delivery.py`` and the
stream delivery tests.
"""

from __future__ import annotations

import queue

from rollout.engine.client import EngineClient
from rollout.engine.messages import Command, Control, ControlReply, Event


class StandInLoop:
    """Commands in (``sent``), events out (``inbox``): the two ends an ``EngineClient`` talks to."""

    def __init__(self, record: bool = True) -> None:
        self.inbox: queue.Queue[list[Event]] = queue.Queue()
        self.sent: list[Command] = []
        self._record = record

    def send(self, command: Command) -> None:
        if self._record:
            self.sent.append(command)
        if isinstance(command, Control):
            self.inbox.put([ControlReply(command.call_id)])

    def recv(self, timeout: float) -> list[Event] | None:
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def client(self) -> EngineClient:
        """An ``EngineClient`` on this loop (no tokenizer, no limits: requests go straight through)."""
        return EngineClient(send=self.send, recv=self.recv, info=None, limits=None, tokenizer=None)
