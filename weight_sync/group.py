"""A process group of its own between a trainer (rank 0) and engine ranks.

It is a TCPStore plus a backend object (``ProcessGroupGloo`` / ``ProcessGroupNCCL``) used directly,
so neither side's default process group is touched or even needed: a trainer inside an FSDP world
and an engine with no distributed state can both join, and several groups can live in one process.
Rank 0 hosts the store; the others connect to it. The store also carries one signal: a member that
gives up on a collective (timeout, dead peer, a failed call) sets the group's abort key, and every
member waiting on a collective of the group fails within ``_STORE_POLL_S`` instead of at its timeout.
An unreachable store (the trainer exited) counts as an abort too.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed import (
    AllreduceOptions,
    BroadcastOptions,
    PrefixStore,
    ReduceOp,
    Store,
    TCPStore,
    Work,
)

from rollout.errors import FailedPreconditionError, InvalidArgumentError, quoted

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")
_POLL_S = 0.0002  # how often a waiting collective looks at its deadline and at the peers' calls
_STORE_POLL_S = 0.01  # how often it asks the store whether a member gave up
_ABORT_KEY = "abort"
_RETIRE_POLL_S = 0.1  # how often a failed group's leftover collectives are looked at
MAX_TIMEOUT_S = 86400.0  # a day: longer is a mistake (e.g. -1 meaning "forever"), not a plan

# A push's status vote (every member's flag, all get the maximum):
VOTE_GO = 0  # take the push
VOTE_FALLBACK = 1  # swap mode, and some engine has no room for a shadow copy: every engine takes this push
#                    on its pausing path, after a second vote (the trainer votes again, then sends)
VOTE_REJECT = 2  # some engine rejected the update: nothing is sent


class GroupFailedError(FailedPreconditionError):
    """A collective of the group failed or timed out; the group cannot be used any more."""


@dataclass(frozen=True, slots=True)
class GroupConfig:
    """Where and how one member joins a weight-update group."""

    master_address: str
    master_port: int
    rank: int
    world_size: int
    group_name: str
    backend: str  # "nccl" or "gloo"
    timeout_s: float

    def __post_init__(self) -> None:
        if not isinstance(self.master_address, str) or not self.master_address:
            raise InvalidArgumentError("must be a host name or address", field="master_address")
        if not isinstance(self.master_port, int) or not 0 < self.master_port < 65536:
            raise InvalidArgumentError(f"must be in 1..65535, got {quoted(self.master_port)}", field="master_port")
        if not isinstance(self.world_size, int) or self.world_size < 2:
            raise InvalidArgumentError(f"must be >= 2, got {quoted(self.world_size)}", field="world_size")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise InvalidArgumentError(f"rank {quoted(self.rank)} is outside [0, {self.world_size})",
                                       field="rank_offset")
        if not isinstance(self.group_name, str) or not self.group_name:
            raise InvalidArgumentError("must be a non-empty string", field="group_name")
        if self.backend not in BACKENDS:
            raise InvalidArgumentError(f"must be one of {BACKENDS}, got {quoted(self.backend)}", field="backend")
        if not isinstance(self.timeout_s, (int, float)) or not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise InvalidArgumentError(f"must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {quoted(self.timeout_s)}",
                                       field="timeout_s")

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=float(self.timeout_s))


def master_store(master_address: str, master_port: int | None, world_size: int, timeout_s: float) -> TCPStore:
    """Rank 0's store server (port None or 0: a free port, read back from ``store.port``)."""
    return TCPStore(master_address, master_port or 0, world_size, is_master=True,
                    timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def _make_backend(cfg: GroupConfig, store: Store, survive_peer_failure: bool):
    prefixed = PrefixStore(f"weight_sync/{cfg.group_name}/", store)
    if cfg.backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        return ProcessGroupGloo(prefixed, cfg.rank, cfg.world_size, cfg.timeout)
    from torch.distributed import ProcessGroupNCCL

    if survive_peer_failure:
        # Read by ProcessGroupNCCL's constructor: on a failed or timed-out collective abort the
        # communicator instead of tearing the process down (a dead trainer must not kill a server).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    opts = ProcessGroupNCCL.Options()
    opts._timeout = cfg.timeout
    # Packing and loading kernels run beside the broadcasts; a high-priority stream lets each next
    # broadcast's blocks start before the rest of a big copy's blocks instead of after them.
    opts.is_high_priority_stream = True
    return ProcessGroupNCCL(prefixed, cfg.rank, cfg.world_size, opts)


class CommGroup:
    """One member's handle on a formed group: broadcasts, a status vote, waiting with a deadline."""

    def __init__(self, cfg: GroupConfig, backend, store: Store, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device  # where this member's collective buffers live
        self._backend = backend
        self._store = store  # kept alive: rank 0's store serves the others until the group closes
        self._signals = PrefixStore(f"weight_sync/{cfg.group_name}/signal/", store)
        self._inflight: list[Work] = []  # posted collectives not yet waited for successfully
        self.broken: str | None = None  # why the group cannot be used, once a collective failed
        self.closed = False

    @classmethod
    def join(
        cls,
        cfg: GroupConfig,
        device: torch.device | str,
        store: Store | None = None,
        survive_peer_failure: bool = False,
    ) -> CommGroup:
        """Join the group; blocks until every rank joined and a first broadcast went through.

        Rank 0 passes its ``master_store``; other ranks connect to ``cfg.master_address``. Raises
        ``GroupFailedError`` when the group does not form within ``cfg.timeout_s``.
        """
        device = torch.device(device)
        if cfg.backend == "nccl" and device.type != "cuda":
            raise InvalidArgumentError("nccl needs a CUDA device; use gloo on CPU", field="backend")
        try:
            if store is None:
                store = TCPStore(cfg.master_address, cfg.master_port, cfg.world_size, is_master=False,
                                 timeout=cfg.timeout)
            with _on_device(device):
                group = cls(cfg, _make_backend(cfg, store, survive_peer_failure), store, device)
        except RuntimeError as e:
            raise GroupFailedError(f"group {quoted(cfg.group_name)} did not form: {e}") from e
        # The first collective creates NCCL's communicator and proves the group works end to end.
        probe = torch.zeros(1, dtype=torch.int32, device=device)
        try:
            group.wait(group.broadcast(probe), "the first broadcast")
        except GroupFailedError:
            group.close()
            raise
        return group

    def _check(self) -> None:
        if self.closed:
            raise GroupFailedError(f"group {quoted(self.cfg.group_name)} is closed")
        if self.broken:
            raise GroupFailedError(
                f"group {quoted(self.cfg.group_name)} failed earlier ({self.broken}); form a new one")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        """Start broadcasting ``tensor`` from rank ``src`` (every rank passes a same-sized tensor)."""
        self._check()
        opts = BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        with _on_device(self.device):
            work = self._backend.broadcast([tensor], opts)
        self._inflight.append(work)
        return work

    def vote(self, flag: int, abort_if: Callable[[], str | None] | None = None) -> int:
        """Every rank gives a flag; all get the maximum (0: everyone agrees to go on)."""
        self._check()
        t = torch.tensor([flag], dtype=torch.int32, device=self.device)
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.MAX
        with _on_device(self.device):
            work = self._backend.allreduce([t], opts)
        self._inflight.append(work)
        self.wait(work, "the status vote", abort_if)
        return int(t.item())

    def wait(self, work: Work, what: str, abort_if: Callable[[], str | None] | None = None) -> None:
        """Wait for ``work`` up to the group's timeout; ``abort_if`` may give up earlier with a reason.

        On failure the group is marked broken and ``GroupFailedError`` names ``what`` and the cause.
        Afterwards the current stream is ordered after the collective (GPU), so its result is usable.
        """
        start = time.monotonic()
        next_store_poll = start + _STORE_POLL_S
        reason = None
        try:
            while not work.is_completed():
                now = time.monotonic()
                if abort_if is not None and (reason := abort_if()) is not None:
                    break
                if now > next_store_poll:
                    next_store_poll = now + _STORE_POLL_S
                    if (reason := self._peer_gave_up()) is not None:
                        break
                if now - start > self.cfg.timeout_s:
                    reason = f"timed out after {self.cfg.timeout_s:g} s"
                    break
                time.sleep(_POLL_S)
            else:
                with _on_device(self.device):
                    work.wait()
                self._inflight.remove(work)
        except RuntimeError as e:
            reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            self.abort(f"{what} failed: {reason}")
            raise GroupFailedError(f"group {quoted(self.cfg.group_name)}: {self.broken}")

    def _peer_gave_up(self) -> str | None:
        if self._signals is None:
            return "the group is closed"
        try:
            if self._signals.check([_ABORT_KEY]):
                return "another member gave up: " + self._signals.get(_ABORT_KEY).decode(errors="replace")
        except RuntimeError as e:  # the store lives in the trainer: it is gone, or unreachable
            return f"the group's store at {self.cfg.master_address}:{self.cfg.master_port} is unreachable ({e})"
        return None

    @property
    def store(self) -> Store | None:
        """The group's store (rank 0 serves it for everyone while a reference to it lives)."""
        return self._store

    def abort(self, reason: str) -> None:
        """Mark the group broken and tell the other members (best effort), so none waits for its timeout."""
        if self.broken is None:
            self.broken = reason
        if self._signals is None:
            return
        try:
            if not self._signals.check([_ABORT_KEY]):  # the first member's reason is the one worth reading
                self._signals.set(_ABORT_KEY, f"rank {self.cfg.rank}: {reason}")
        except RuntimeError:
            pass

    def close(self) -> None:
        """Leave the group. Idempotent; never waits on a collective that a failure left pending."""
        if self.closed:
            return
        self.closed = True
        backend, self._backend = self._backend, None
        self._store = self._signals = None  # rank 0: this stops the store server
        inflight, self._inflight = self._inflight, []
        if self.broken:
            # A collective of ours may still wait on a member that never joined it; tearing the backend
            # down would hold this thread (and the GIL) until that collective times out. Let a
            # background thread outlive it instead.
            threading.Thread(target=_retire_backend, args=(backend, inflight, self.cfg), daemon=True,
                             name=f"retire-{self.cfg.group_name}").start()
            return
        try:
            if hasattr(backend, "shutdown"):
                backend.shutdown()
        except RuntimeError:
            logger.warning("closing group %s raised", self.cfg.group_name, exc_info=True)


def _retire_backend(backend, inflight: list[Work], cfg: GroupConfig) -> None:
    """Dispose of a failed group's backend without blocking anyone (runs in its own thread)."""
    try:
        if cfg.backend == "nccl":
            backend.abort()  # cancels the communicator's kernels in flight
        else:
            # Poll rather than wait(): a thread blocked inside a C++ wait can abort the process at exit.
            while not all(work.is_completed() for work in inflight):
                time.sleep(_RETIRE_POLL_S)
    except RuntimeError:
        logger.warning("retiring group %s raised", cfg.group_name, exc_info=True)
    del backend  # now nothing is pending, so the destructor returns at once


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for CUDA devices (NCCL and IPC calls act on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
