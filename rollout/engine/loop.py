"""The engine loop: applies commands between steps and runs steps while there is work.

It runs in a thread (in-process ``Engine``) or as the main loop of the engine process (server).
Commands arrive on ``inbox`` (a ``queue.Queue`` or ``multiprocessing.Queue``); every step's
events leave through ``send`` as one list, so the front end is never waited on. ``beat`` is called
whenever the loop is ready for commands, so the front end can tell a busy engine from a stuck one.
Control commands whose slow part runs beside the loop (``engine_jobs.Background``) are replied to
when that part ends; the loop keeps stepping meanwhile.
"""

from __future__ import annotations

import logging
import queue
import traceback
from typing import Any, Callable, Protocol

from rollout.engine.core import EngineCore
from rollout.engine.jobs import Background
from rollout.engine.messages import Abort, AddRequest, Command, Control, ControlReply, Event, RequestFailed, Shutdown
from rollout.errors import RolloutError

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle loop blocks on its inbox before looking again
# Commands applied between two steps at most: a sender that never lets the inbox run empty (a flood
# of aborts) must not keep the engine from stepping.
MAX_COMMANDS_PER_DRAIN = 256
# An iteration of the loop that raised outside the step's own handler fails the running requests
# and the loop goes on; this many in a row means it cannot recover, and it stops (callers then get
# EngineDeadError rather than a loop spinning on the same fault).
MAX_FAULTS_IN_A_ROW = 8


class Inbox(Protocol):
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...


class EngineLoop:
    """Drives an ``EngineCore`` from a command inbox until a shutdown command."""

    def __init__(self, core: EngineCore, inbox: Inbox, send: Callable[[list[Event]], None],
                 beat: Callable[[], None] = lambda: None) -> None:
        self.core = core
        self.inbox = inbox
        self.send = send
        self.beat = beat
        self._stopping = False
        self._jobs: dict[int, Background] = {}  # call id -> control work running beside the loop

    def run(self) -> None:
        device = self.core.runner.device
        if device.type == "cuda":
            # This thread runs every kernel of the engine; Triton launches on the current device.
            import torch

            torch.cuda.set_device(device)
        faults = 0
        try:
            while not self._stopping:
                try:
                    self._iterate()
                    faults = 0
                except Exception as exc:  # a bug outside the step's handler: fail what ran, go on
                    faults += 1
                    logger.error("engine loop iteration failed (%d in a row):\n%s", faults, traceback.format_exc())
                    self.core.fail_step(exc)
                    self.send(self.core.take_events())
                    if faults >= MAX_FAULTS_IN_A_ROW:
                        logger.error("the engine loop failed %d times in a row: it stops", faults)
                        self._stopping = True
                if self.core.broken:
                    logger.error("%s", self.core.broken)
                    self._stopping = True
        finally:
            if self._stopping:
                self._abandon_jobs()
                self.core.close()

    def _iterate(self) -> None:
        """Apply the queued commands, reply to finished background work, run a step if there is work."""
        self.beat()
        self._drain(block=not self.core.has_work())
        if self._stopping:
            return
        self._finish_jobs()
        events = self.core.step() if self.core.has_work() else self.core.take_events()
        if events:
            self.send(events)

    def _finish_jobs(self) -> None:
        """Reply to the control commands whose background work has ended."""
        for call_id in [c for c, job in self._jobs.items() if job.future.done()]:
            job = self._jobs.pop(call_id)
            self.send(self._reply(call_id, job.name, job.complete))

    def _abandon_jobs(self) -> None:
        jobs, self._jobs = self._jobs, {}
        for call_id, job in jobs.items():
            job.abandon(job.future)
            self.send([ControlReply(call_id, error_code="UNAVAILABLE",
                                    error_message=f"the engine stopped before {job.name} completed")])

    def _drain(self, block: bool) -> None:
        """Apply the queued commands (up to ``MAX_COMMANDS_PER_DRAIN``); wait briefly for one when idle."""
        try:
            cmd = self.inbox.get(block=block, timeout=IDLE_WAIT_S if block else None)
        except queue.Empty:
            return
        for applied in range(MAX_COMMANDS_PER_DRAIN):
            if applied:  # a command is taken only when it will be applied in this drain
                try:
                    cmd = self.inbox.get(block=False)
                except queue.Empty:
                    return
            replies = self._apply(cmd)
            if replies:
                self.send(replies)
            if self._stopping:
                return
            self.beat()

    def _apply(self, cmd: Command) -> list[Event]:
        core = self.core
        if not isinstance(cmd, AddRequest):
            core.drain()  # aborts and control operations see no step in flight
        if isinstance(cmd, AddRequest):
            try:
                core.add(cmd)
            except RolloutError as e:
                return [RequestFailed(cmd.request_id, e.code, e.message)]
            except Exception as e:  # a bug while adding it: this request fails, the running ones go on
                logger.error("adding request %s failed:\n%s", cmd.request_id, traceback.format_exc())
                why = f"adding the request failed: {type(e).__name__}: {e}"
                return [RequestFailed(cmd.request_id, "INTERNAL", why)]
            return []
        if isinstance(cmd, Abort):
            try:
                core.abort(cmd.request_ids)
            except Exception:  # noqa: BLE001 - an abort has no reply; the loop must outlive a bad one
                logger.exception("ignoring an abort that failed: %r", cmd.request_ids)
            return core.take_events()
        if isinstance(cmd, Control):
            return self._control(cmd)
        logger.error("ignoring unknown command %r", type(cmd).__name__)
        return []

    def _control(self, cmd: Control) -> list[Event]:
        core = self.core

        name = type(cmd.command).__name__

        def run() -> Any:
            if isinstance(cmd.command, Shutdown):
                core.shutdown()
                self._stopping = True
                return None
            result = core.handle(cmd.command)
            if isinstance(result, Background):
                result.name = name
                result.start()
                self._jobs[cmd.call_id] = result
            return result

        replies = self._reply(cmd.call_id, name, run)
        if cmd.call_id in self._jobs:
            return replies[:-1]  # the reply waits for the background work
        return replies

    def _reply(self, call_id: int, op: str, run: Callable[[], Any]) -> list[Event]:
        """Run ``run`` and turn its result or error into the call's reply, after the events it made."""
        try:
            result = run()
        except RolloutError as e:
            reply = ControlReply(call_id, error_code=e.code, error_message=e.message)
        except Exception as e:  # keep serving; the caller gets the cause
            logger.error("control %s failed:\n%s", op, traceback.format_exc())
            reply = ControlReply(call_id, error_code="INTERNAL", error_message=f"{type(e).__name__}: {e}")
        else:
            reply = ControlReply(call_id, result=result)
        # Events the control produced (aborted requests' final chunks) go before the reply.
        return [*self.core.take_events(), reply]
