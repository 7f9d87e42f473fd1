"""Starting an engine loop in a thread (in-process ``Engine``) or a child process (the server)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable

import torch

from rollout.engine.client import EngineClient, EngineObserver
from rollout.engine.messages import Command, Control, ControlReply, Event
from rollout.engine.parent_watch import exit_with_parent
from rollout.engine.rank_launch import RankLinks, build_rank0, rank_options, spawn_followers
from rollout.errors import EngineDeadError, InvalidArgumentError, error_from_code

logger = logging.getLogger(__name__)

class Heartbeat:
    """When the engine loop was last ready for commands (``time.monotonic()``, which every process
    of the machine reads from one clock). Shared memory when the loop runs in another process."""

    def __init__(self, ctx: Any = None) -> None:
        self._value = ctx.Value("d", time.monotonic(), lock=False) if ctx is not None else None
        self._t = time.monotonic()

    def beat(self) -> None:
        if self._value is not None:
            self._value.value = time.monotonic()
        else:
            self._t = time.monotonic()

    def last(self) -> float:
        return self._value.value if self._value is not None else self._t


def _recv_from(q: Any) -> Callable[[float], list[Event] | None]:
    def recv(timeout: float) -> list[Event] | None:
        try:
            return q.get(timeout=timeout)
        except queue.Empty:
            return None

    return recv


def _checked_put(q: Any) -> Callable[[Command], None]:
    """``q.put`` for the queue to an engine process, which pickles in a background thread: there a
    control argument that cannot be pickled (a generator, a lambda) would be logged and dropped, and
    its caller would wait forever. Control commands are pickled here first, so it raises instead."""

    def put(msg: Command) -> None:
        if isinstance(msg, Control):
            try:
                ForkingPickler.dumps(msg)
            except Exception as e:
                raise InvalidArgumentError(
                    f"an argument of {type(msg.command).__name__} cannot be sent to the engine process "
                    f"({type(e).__name__}: {e}); pass lists, strings and numbers", field="command") from None
        q.put(msg)

    return put


def _build_core(model_path: str, options: dict[str, Any], ranks: RankLinks | None = None):
    from rollout.config import EngineConfig
    from rollout.engine.core import EngineCore

    if ranks is not None:
        return build_rank0(model_path, options, ranks)
    config = EngineConfig.build(model_path, **options)
    device = torch.device(config.device)
    if device.type != "cuda":
        return EngineCore(config)
    # Kernels (Triton's above all) launch on the current device: make it the engine's while it is
    # built, without changing the caller's current device.
    with torch.cuda.device(device):
        return EngineCore(config)


def start_engine_thread(model_path: str, **options: Any) -> EngineClient:
    """Build the engine here (errors raise in the caller) and run its loop in a daemon thread."""
    from rollout.engine.loop import EngineLoop

    core = _build_core(model_path, options)
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue()
    heart = Heartbeat()
    loop = EngineLoop(core, inbox, outbox.put, heart.beat)
    thread = threading.Thread(target=loop.run, name="engine-loop", daemon=True)
    thread.start()
    return EngineClient(inbox.put, _recv_from(outbox), core.info(), core.limits, core.tokenizer,
                        alive=thread.is_alive, on_close=lambda: thread.join(timeout=30), last_beat=heart.last)


def _process_main(model_path: str, options: dict[str, Any], inbox: Any, outbox: Any, heart: Heartbeat,
                  ranks: RankLinks | None, parent: int) -> None:
    """Entry point of the engine process (rank 0): build, report readiness (call id 0), loop; it
    exits if process ``parent`` (the front end) is gone."""
    from rollout.engine.loop import EngineLoop
    from rollout.errors import RolloutError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    exit_with_parent(parent)
    try:
        core = _build_core(model_path, options, ranks)
    except RolloutError as e:
        outbox.put([ControlReply(0, error_code=e.code, error_message=e.message)])
        return
    except Exception as e:
        logger.exception("engine start failed")
        outbox.put([ControlReply(0, error_code="INTERNAL", error_message=f"{type(e).__name__}: {e}")])
        return
    outbox.put([ControlReply(0, result=(core.info(), core.limits))])
    EngineLoop(core, inbox, outbox.put, heart.beat).run()


def start_engine_process(model_path: str, *, observer: EngineObserver | None = None, **options: Any) -> EngineClient:
    """Run the engine loop in a child process (spawned, so it owns its CUDA context); with
    ``tp_size`` > 1 one process per rank, rank 0 running the loop.

    Returns once the model is loaded; raises the loader's typed error otherwise. ``observer`` goes to
    the ``EngineClient`` (the server's metrics).
    """
    from rollout.config import EngineConfig

    EngineConfig.build(model_path, **options)  # a bad option fails here, before any process starts
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    heart = Heartbeat(ctx)
    procs, links = spawn_followers(ctx, model_path, options)
    proc = ctx.Process(target=_process_main, args=(model_path, rank_options(options, links), inbox, outbox, heart,
                                                   links, os.getpid()), name="rollout-engine", daemon=True)
    proc.start()
    procs.insert(0, proc)

    def kill() -> None:
        for p in procs:
            if p.is_alive():
                p.kill()

    def alive() -> bool:
        return all(p.is_alive() for p in procs)

    while True:
        try:
            first = outbox.get(timeout=1.0)
            break
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if not p.is_alive()]
            if dead:
                kill()
                raise EngineDeadError(
                    f"engine rank {dead[0]} exited during start (exit code {procs[dead[0]].exitcode})"
                    if len(procs) > 1 else f"the engine process exited during start (exit code {proc.exitcode})"
                ) from None
    reply = first[0]
    if reply.error_code:
        proc.join(timeout=10)
        kill()
        raise error_from_code(reply.error_code, reply.error_message or "")
    info, limits = reply.result
    from rollout.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_model_dir(model_path)

    def close() -> None:
        if alive():  # a normal stop: rank 0 tells the others to stop when its loop ends
            proc.join(timeout=30)
            for p in procs[1:]:
                p.join(timeout=10)
        # A rank that died leaves the others waiting on it in a collective: they are stopped by force.
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    heart.beat()  # the loop starts beating once it runs; loading the model is not a stall
    return EngineClient(_checked_put(inbox), _recv_from(outbox), info, limits, tokenizer, alive=alive, on_close=close,
                        last_beat=heart.last, kill=kill, pids=tuple(p.pid for p in procs), observer=observer)
