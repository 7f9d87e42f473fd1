"""EngineClient: the front end's handle on an engine loop running in a thread or a child process.

A router thread reads the loop's event lists and hands each event to whoever waits for it: the
sink of its request (a callback) or the future of a control call. Everything a front end needs
(sync, streaming, asyncio) is built on ``submit`` and ``call``.

Events are handed over in the order the loop produced them: the stream chunks a control command
produced (e.g. a pause draining the step in flight) reach their consumers before the command's
reply. A caller that stops waiting (cancelled, timed out) never disturbs the router, and the loop's
heartbeat tells a front end whether the engine can answer at all (``stalled_for``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

from rollout.engine.messages import (
    Abort,
    AddRequest,
    Command,
    Control,
    ControlCommand,
    ControlReply,
    Event,
    RequestFailed,
    Shutdown,
)
from rollout.engine.request_validation import RequestLimits
from rollout.errors import EngineDeadError, RolloutError, error_from_code, quoted
from rollout.types import EngineInfo, StreamChunk

logger = logging.getLogger(__name__)

Sink = Callable[[StreamChunk | RequestFailed], None]
_DONE = object()


class EngineObserver(Protocol):
    """Sees what passes through an ``EngineClient`` (the server's metrics): requests as they are
    submitted, each batch of their events as the router hands it over (router thread), and each
    control call's duration once its reply arrives. Implementations must be thread-safe and quick."""

    def on_submit(self, req: AddRequest) -> None: ...

    def on_events(self, events: list[StreamChunk | RequestFailed]) -> None: ...

    def on_control(self, command: ControlCommand, seconds: float, error_code: str | None) -> None: ...


class _AsyncSink:
    """A sink that feeds a consumer on another thread's event loop: a deque of events and, while the
    consumer waits on an empty one, a future to wake it.

    The router hands all of one step's events for one loop over in a single
    ``call_soon_threadsafe`` (each such call wakes the loop through its self-pipe: with 256
    streams that was 256 wake-ups per step, Python work that competes with the engine for the GIL).
    A bare deque and one future per wait cost less per token than an ``asyncio.Queue`` (whose
    ``put``/``get`` also keep counters, an unfinished-task event and waiter lists), and the
    consumer takes every event queued when it wakes without waiting again.
    ``pending`` counts the events handed over whose consumer has not come back for the next one
    yet. Everything here but ``__call__`` runs on the consumer's loop.
    """

    __slots__ = ("loop", "events", "waiter", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: collections.deque[StreamChunk | RequestFailed] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.pending = 0

    def __call__(self, ev: StreamChunk | RequestFailed) -> None:
        self.loop.call_soon_threadsafe(_deliver, [(self, ev)])

    async def get(self) -> StreamChunk | RequestFailed:
        """The next event, waiting for one if there is none yet."""
        while not self.events:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.events.popleft()


def _deliver(items: list[tuple[_AsyncSink, StreamChunk | RequestFailed]]) -> None:
    for sink, ev in items:
        sink.pending += 1
        sink.events.append(ev)
        waiter = sink.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _resolve(fut: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Complete a control call's future unless its caller gave up on it (cancelled it) already."""
    if fut.done():
        return
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile: nobody waits for it
        pass


class EngineClient:
    """Routes commands to an engine loop and its events back to the callers."""

    def __init__(
        self,
        send: Callable[[Command], None],
        recv: Callable[[float], list[Event] | None],
        info: EngineInfo,
        limits: RequestLimits,
        tokenizer: Any,
        alive: Callable[[], bool] = lambda: True,
        on_close: Callable[[], None] = lambda: None,
        last_beat: Callable[[], float] = time.monotonic,
        kill: Callable[[], None] = lambda: None,
        pids: tuple[int, ...] = (),
        observer: EngineObserver | None = None,
    ) -> None:
        """``send`` / ``recv`` talk to the loop; ``alive`` says whether it still runs; ``last_beat``
        gives the ``time.monotonic()`` of its last heartbeat; ``kill`` stops it by force; ``pids``:
        the engine's processes, rank 0 first (empty when the loop is a thread of this process);
        ``observer`` (optional) is told about requests, events and control calls."""
        self.pids = pids
        self._send = send
        self._recv = recv
        self._alive = alive
        self._on_close = on_close
        self.info = info
        self.limits = limits
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._observer = observer
        self._sinks: dict[str, tuple[Sink, int]] = {}  # request id -> (sink, samples left)
        # call id -> (future, command, time.monotonic() when sent)
        self._calls: dict[int, tuple[concurrent.futures.Future, ControlCommand, float]] = {}
        self._call_ids = itertools.count(1)
        self._dead: str | None = None
        self._closed = False
        self._last_beat = last_beat
        self._kill = kill
        self._open_streams: set[_AsyncSink] = set()  # asyncio streams not yet consumed to the end
        self._router = threading.Thread(target=self._route, name="engine-router", daemon=True)
        self._router.start()

    # ------------------------------------------------------------------ requests
    def submit(self, req: AddRequest, sink: Sink) -> None:
        """Send a request; ``sink`` gets its chunks (and a ``RequestFailed`` if it fails)."""
        with self._lock:
            if self._dead:
                raise EngineDeadError(self._dead)
            if req.request_id in self._sinks:
                from rollout.errors import InvalidArgumentError

                raise InvalidArgumentError(f"request id {quoted(req.request_id)} is already in use", field="request_id")
            self._sinks[req.request_id] = (sink, req.sampling.n)
        if self._observer is not None:
            self._observer.on_submit(req)
        self._send(req)

    def abort(self, request_ids: list[str] | None) -> None:
        """Abort requests by id (None: all). Their samples end with reason abort."""
        if not self._dead:
            self._send(Abort(None if request_ids is None else list(request_ids)))

    def stream(self, req: AddRequest) -> Iterator[StreamChunk]:
        """Chunks of all samples of ``req`` as they come; aborts the request if not consumed to the end."""
        q: queue.Queue = queue.Queue()
        self.submit(req, q.put)
        done = False
        try:
            yield from self._drain_sink(q.get, req)
            done = True
        finally:
            if not done:
                self.abort([req.request_id])

    async def astream(self, req: AddRequest) -> AsyncIterator[StreamChunk]:
        """asyncio version of ``stream``; cancelling the consumer aborts the request."""
        loop = asyncio.get_running_loop()
        sink = _AsyncSink(loop)
        self.submit(req, sink)
        with self._lock:
            self._open_streams.add(sink)
        done = False
        left = req.sampling.n
        try:
            while left:
                # An event already queued is taken without the coroutine call (one per token).
                ev = sink.events.popleft() if sink.events else await sink.get()
                if isinstance(ev, RequestFailed):
                    raise error_from_code(ev.error_code, ev.error_message)
                if ev.finished:
                    left -= 1
                yield ev
                sink.pending -= 1  # the consumer is done with it (a server: the message is written)
            done = True
        finally:
            with self._lock:
                self._open_streams.discard(sink)
            if not done:
                self.abort([req.request_id])

    async def quiesce(self, timeout: float = 2.0) -> bool:
        """Wait until every asyncio stream of this loop has consumed the events handed to it so far
        (at most ``timeout`` s, so a consumer that stopped reading cannot hold the caller); returns
        whether they all did. A server calls it before answering a pause, so that no token reaches a
        client after the pause's reply."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._lock:
                busy = any(s.pending > 0 for s in self._open_streams if s.loop is loop)
            if not busy:
                return True
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.001)

    @staticmethod
    def _drain_sink(get: Callable[[], Any], req: AddRequest) -> Iterator[StreamChunk]:
        left = req.sampling.n
        while left:
            ev = get()
            if isinstance(ev, RequestFailed):
                raise error_from_code(ev.error_code, ev.error_message)
            if ev.finished:
                left -= 1
            yield ev

    # ------------------------------------------------------------------ control
    def _start_call(self, command: ControlCommand) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._dead:
                raise EngineDeadError(self._dead)
            call_id = next(self._call_ids)
            self._calls[call_id] = (fut, command, time.monotonic())
        try:
            self._send(Control(call_id, command))
        except BaseException:
            with self._lock:
                self._calls.pop(call_id, None)
            raise
        return fut

    def call(self, command: ControlCommand, timeout: float | None = None) -> Any:
        """Run a control command in the engine loop and return its result (raises its error)."""
        return self._start_call(command).result(timeout)

    async def acall(self, command: ControlCommand) -> Any:
        """``call`` for asyncio callers; cancelling the caller leaves the engine unaffected."""
        return await asyncio.wrap_future(self._start_call(command))

    # ------------------------------------------------------------------ routing
    def _route(self) -> None:
        while not self._closed:
            try:
                events = self._recv(0.1)
            except (EOFError, OSError) as e:
                self._die(f"the engine loop stopped ({type(e).__name__})")
                return
            if events is None:
                if not self._alive():
                    self._die("the engine process exited")
                    return
                continue
            try:
                self._route_events(events)
            except Exception:  # a bug here must not leave every caller waiting forever
                logger.exception("routing engine events failed")

    def _route_events(self, events: list[Event]) -> None:
        """Hand one list of events over, in order; asyncio sinks get one hand-over per loop."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        if self._observer is not None:
            self._observe(events)
        for ev in events:
            if isinstance(ev, ControlReply):
                # Chunks produced before the reply (a pause drains the step in flight) go first.
                self._flush(batches)
                self._reply(ev)
            else:
                self._dispatch(ev, batches)
        self._flush(batches)

    @staticmethod
    def _flush(batches: dict[asyncio.AbstractEventLoop, list]) -> None:
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
                logger.warning("dropped %d events for a closed event loop", len(items))
        batches.clear()

    def _observe(self, events: list[Event]) -> None:
        try:
            self._observer.on_events([ev for ev in events if not isinstance(ev, ControlReply)])
        except Exception:  # metrics must never stop the router
            logger.exception("the engine observer failed")

    def _reply(self, ev: ControlReply) -> None:
        with self._lock:
            call = self._calls.pop(ev.call_id, None)
        if call is None:
            return
        fut, command, sent = call
        if self._observer is not None:
            try:
                self._observer.on_control(command, time.monotonic() - sent, ev.error_code)
            except Exception:
                logger.exception("the engine observer failed")
        if ev.error_code:
            _resolve(fut, error=error_from_code(ev.error_code, ev.error_message or ""))
        else:
            _resolve(fut, ev.result)

    def _dispatch(self, ev: StreamChunk | RequestFailed, batches: dict | None = None) -> None:
        """Hand ``ev`` to its request's sink; events for asyncio sinks are added to ``batches``
        (per loop) when given, for one hand-over per loop."""
        with self._lock:
            entry = self._sinks.get(ev.request_id)
            if entry is None:
                return
            sink, left = entry
            if isinstance(ev, RequestFailed) or (ev.finished and left == 1):
                del self._sinks[ev.request_id]
            elif ev.finished:
                self._sinks[ev.request_id] = (sink, left - 1)
        if batches is not None and isinstance(sink, _AsyncSink):
            batches.setdefault(sink.loop, []).append((sink, ev))
            return
        try:
            sink(ev)
        except Exception:  # a broken consumer must not stop the router
            logger.exception("request sink failed")

    def _die(self, why: str) -> None:
        with self._lock:
            self._dead = self._dead or why
            why = self._dead
            sinks, self._sinks = self._sinks, {}
            calls, self._calls = self._calls, {}
        for rid, (sink, _) in sinks.items():
            try:
                sink(RequestFailed(rid, EngineDeadError.code, why))
            except Exception:
                logger.exception("request sink failed")
        for fut, _, _ in calls.values():
            _resolve(fut, error=EngineDeadError(why))

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed

    def stalled_for(self) -> float:
        """Seconds since the engine loop last showed it can take commands (0 while it keeps up)."""
        return max(0.0, time.monotonic() - self._last_beat())

    def kill(self, why: str) -> None:
        """Stop an engine loop that does not answer: by force, failing every waiting caller."""
        logger.error("stopping the engine by force: %s", why)
        self._kill()
        self._die(why)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine loop (running requests end with reason abort) and the router.

        An engine that does not answer within ``timeout`` s is stopped by force."""
        if self._closed:
            return
        if self._dead is None:
            try:
                self.call(Shutdown(), timeout=timeout)
            except concurrent.futures.TimeoutError:
                self.kill(f"the engine did not acknowledge shutdown within {timeout:g} s")
            except RolloutError:
                pass
        self._closed = True
        self._router.join(timeout=5)
        # Later calls (and any caller the loop did not answer) fail at once instead of waiting on a
        # router that is gone.
        self._die("the engine was shut down")
        self._on_close()
