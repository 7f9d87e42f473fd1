"""Trainer side of a weight-update group: form it with every engine rank, push buckets, close.

A push is one control call per engine (sent concurrently, in threads) plus collectives:

    trainer (rank 0)                       engine ranks 1..N
    update_weights_from_distributed(...) -> validate names / dtypes / shapes, nothing written yet
    vote(0) ------------------- allreduce MAX ------------------- vote(0 ok / 1 rejected)
    pack bucket 0, broadcast 0 ------------------------------->  receive 0
    pack bucket 1, broadcast 1 (packing overlaps broadcast 0) ->  receive 1, load 0 in place
    ...                                                          load the last; set the version
    <------------------------------- call returns the new version

A rejected push (unknown name, wrong shape or dtype) ends after the vote, with nothing written
anywhere and the group still usable.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from rollout.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError, RolloutError, quoted
from weight_sync.buckets import (
    DEFAULT_BUCKET_BYTES,
    BucketLayout,
    layouts_to_args,
    pack_bucket,
    pipeline_order,
    plan_buckets,
)
from weight_sync.group import VOTE_FALLBACK, VOTE_GO, CommGroup, GroupConfig, GroupFailedError, master_store
from weight_sync.targets import as_target

logger = logging.getLogger(__name__)

PIPELINE_DEPTH = 2  # buckets in flight: one broadcasting while the next is packed
# Size of the first and the last bucket: the first one's packing and the last one's loading on the
# engines are the parts of a push that no broadcast hides.
EDGE_BUCKET_BYTES = 64 << 20
# How long close() waits for the engines of a broken group to destroy it (see close).
BROKEN_CLOSE_WAIT_S = 5.0


def check_version(version: Any) -> None:
    """Refuse, on the trainer's side, a version that is not an integer >= 0 (None: the engines'
    version + 1): over gRPC it would be coerced by ``int()`` or fail after the engines were asked."""
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise InvalidArgumentError(f"must be an integer >= 0 or None, got {quoted(version)}", field="version")


def one_version(results: Sequence[Any]) -> Any:
    """The engines' answer to one push: the first engine's, once every engine is on its version.

    Without an explicit version each engine takes its own version + 1, so engines that started apart
    would tag the same weights differently: that raises, naming the versions (the weights are loaded
    everywhere; an explicit version on the next push brings the engines together)."""
    versions = [getattr(r, "weight_version", r) for r in results]
    if len(set(versions)) > 1:
        raise FailedPreconditionError(
            f"the engines took the weights under different versions {versions} (each its own version + 1): "
            "give the push an explicit version, so that every engine tags its tokens alike", field="version")
    return results[0]


def named_tensor_list(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Materialise ``(name, tensor)`` pairs (references, no copies), checking names are unique."""
    items, seen = [], set()
    for name, tensor in named_tensors:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise InvalidArgumentError("expected (str, torch.Tensor) pairs", field="named_tensors")
        if name in seen:
            raise InvalidArgumentError("a tensor name appears twice", field=name)
        seen.add(name)
        items.append((name, tensor.detach()))
    return items


def first_error(futures: Sequence[concurrent.futures.Future]) -> BaseException | None:
    """The exception of the first finished future that failed, if any."""
    for fut in futures:
        if fut.done() and fut.exception() is not None:
            return fut.exception()
    return None


def root_cause_first(errors: Sequence[BaseException]) -> list[BaseException]:
    """Engine errors ordered so the likely cause comes first.

    A rejection names the tensor; an unknown group or another refusal says why an engine did not
    take part; FAILED_PRECONDITION errors are mostly engines reporting that the group failed
    because of another member, so they come last (in the order given).
    """
    def rank(e: BaseException) -> int:
        if isinstance(e, InvalidArgumentError):
            return 0
        if isinstance(e, NotFoundError):
            return 1
        return 3 if isinstance(e, FailedPreconditionError) else 2

    return sorted(errors, key=rank)


def _as_bucket(layout: BucketLayout, tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The bytes of one bucket: a lone contiguous tensor already on ``device`` is sent as it is
    (no packing copy); otherwise the tensors are packed into a new buffer."""
    if len(tensors) == 1 and layout.tensors[0].offset == 0:
        t = tensors[0]
        if t.device == device and t.is_contiguous() and t.dtype == layout.tensors[0].torch_dtype:
            return t.reshape(-1).view(torch.uint8)
    return pack_bucket(layout, tensors, device=device)


class WeightSyncGroup:
    """A formed group of the trainer (rank 0) and every engine rank behind ``targets``."""

    def __init__(self, comm: CommGroup, targets: list[Any], bucket_bytes: int) -> None:
        self.comm = comm
        self.targets = targets
        self.bucket_bytes = bucket_bytes
        self.group_name = comm.cfg.group_name
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(len(targets), 1),
                                                           thread_name_prefix="weight-sync")
        # The last push's plan: (names, dtypes, shapes) -> (order, layouts, wire form). A trainer pushes
        # the same state dict every step, and planning a few hundred tensors takes milliseconds that
        # would delay the first broadcast.
        self._plan_cache: tuple[tuple, list[int], list[BucketLayout], dict[str, list]] | None = None

    def _plan(self, items: list[tuple[str, torch.Tensor]]) -> tuple[list[int], list[BucketLayout], dict[str, list]]:
        """The push order of ``items``, their bucket layouts and the layouts' wire form."""
        key = tuple((n, t.dtype, tuple(t.shape)) for n, t in items)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1:]
        edge = min(EDGE_BUCKET_BYTES, self.bucket_bytes)
        order = pipeline_order([t.numel() * t.element_size() for _, t in items], edge)
        layouts = plan_buckets(((key[i][0], key[i][1], key[i][2]) for i in order), self.bucket_bytes, edge_bytes=edge)
        wire = layouts_to_args(layouts)
        self._plan_cache = (key, order, layouts, wire)
        return order, layouts, wire

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int | None = None,
             swap: bool = False) -> Any:
        """Send these tensors (Hugging Face names) to every engine; returns the engines' new version.

        The engines switch to the new weights and ``version`` atomically (None: their version + 1).
        ``swap``: the engines receive into a shadow copy while they keep generating, and switch
        between two steps; returns the first engine's ``SwapResult`` (``swapped`` False, with a
        ``note``, when some engine had no room for the shadow and every engine paused for this push).
        Raises ``InvalidArgumentError`` from an engine that rejected a name, shape or dtype (nothing
        was written and the group stays usable), or ``GroupFailedError`` if the transfer broke (the
        group is closed; engines that had written part of the weights refuse to generate until a
        full push over a new group).
        """
        if self.comm.closed:
            raise GroupFailedError(f"group {quoted(self.group_name)} is closed; connect a new one")
        check_version(version)
        items = named_tensor_list(named_tensors)
        order, layouts, wire = self._plan(items)
        items = [items[i] for i in order]
        args = {**wire, "group_name": self.group_name, "version": version}
        if swap:
            args["swap"] = True
        futures = [self._pool.submit(t.update_weights_from_distributed, **args) for t in self.targets]
        failed: list[BaseException] = []  # in the order the engines answered
        for fut in futures:
            fut.add_done_callback(lambda f: failed.append(f.exception()) if f.exception() is not None else None)

        def engine_failed() -> str | None:
            return f"an engine failed: {type(failed[0]).__name__}: {failed[0]}" if failed else None

        try:
            verdict = self.comm.vote(VOTE_GO, engine_failed)
            if verdict == VOTE_FALLBACK:
                # An engine had no room for a shadow copy: every engine votes again from its pausing path.
                logger.warning("group %s: an engine has no room for shadow weights; this push pauses generation",
                               self.group_name)
                verdict = self.comm.vote(VOTE_GO, engine_failed)
        except GroupFailedError:
            # An engine failed before taking part (unknown group, memory released, ...): its error says why.
            self.close()
            concurrent.futures.wait(futures, timeout=5.0)
            err = root_cause_first(failed)
            raise (err[0] if err else GroupFailedError(self.comm.broken or "the status vote failed")) from None
        if verdict != 0:
            concurrent.futures.wait(futures, timeout=self.comm.cfg.timeout_s)
            err = root_cause_first(failed)
            raise err[0] if err else RolloutError("an engine rejected the update")
        try:
            self._broadcast(layouts, [t for _, t in items], engine_failed)
        except BaseException as e:
            if not self.comm.broken:
                self.comm.abort(f"the trainer stopped pushing: {type(e).__name__}: {e}")
            self.close()
            concurrent.futures.wait(futures, timeout=5.0)
            answers = "; ".join(str(x) for x in root_cause_first(failed))
            raise GroupFailedError(
                f"group {quoted(self.group_name)}: {self.comm.broken}" + (f"; engines: {answers}" if answers else "")
            ) from e
        results = [f.result(timeout=self.comm.cfg.timeout_s) for f in futures]
        return one_version(results) if results else version

    def _broadcast(self, layouts: list[BucketLayout], tensors: list[torch.Tensor], engine_failed) -> None:
        """Pack and broadcast every bucket, packing bucket k+1 while bucket k is on the wire."""
        inflight: collections.deque = collections.deque()
        start = 0
        for k, layout in enumerate(layouts):
            if len(inflight) >= PIPELINE_DEPTH:
                self.comm.wait(inflight.popleft()[0], f"broadcast of bucket {k - PIPELINE_DEPTH}", engine_failed)
            chunk = tensors[start:start + len(layout.tensors)]
            start += len(layout.tensors)
            buf = _as_bucket(layout, chunk, self.comm.device)  # (nbytes,) uint8
            inflight.append((self.comm.broadcast(buf), buf, k))
        while inflight:
            work, _, k = inflight.popleft()
            self.comm.wait(work, f"broadcast of bucket {k}", engine_failed)

    def close(self) -> None:
        """Destroy the group on every engine and here. Idempotent; engine errors are logged, and an
        engine that does not answer within the group's timeout is left (logged), never waited on."""
        if self.comm.closed:
            return
        # The engines leave while this side leaves: tearing down an NCCL communicator can wait for
        # every rank to do the same, so closing here first and asking the engines after deadlocks.
        # The trainer's store (rank 0 serves it) stays up until the engines are done. A broken
        # group is destroyed on the engines too: one that refused a push before the status vote
        # never saw the abort, and would keep the group's name.
        store = self.comm.store
        futures = [self._pool.submit(t.destroy_weight_update_group, self.group_name) for t in self.targets]
        self.comm.close()
        # A broken group's engines may sit in a receive until their own timeout: those are not waited
        # for (an engine that refused before the vote answers at once); a push that failed raises now.
        wait_s = BROKEN_CLOSE_WAIT_S if self.comm.broken else self.comm.cfg.timeout_s
        done, late = concurrent.futures.wait(futures, timeout=wait_s)
        for fut in done:
            if fut.exception() is not None and not isinstance(fut.exception(), NotFoundError):
                logger.warning("destroying group %s on an engine failed: %s", self.group_name, fut.exception())
        if late:
            logger.warning("group %s: %d engine(s) did not answer its destroy within %g s", self.group_name,
                           len(late), wait_s)
        del store
        self._pool.shutdown(wait=False)

    def __enter__(self) -> WeightSyncGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(
    clients: Iterable[Any],
    backend: str = "nccl",
    master_address: str = "127.0.0.1",
    master_port: int | None = None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    timeout_s: float = 300.0,
    group_name: str | None = None,
    device: torch.device | str | None = None,
) -> WeightSyncGroup:
    """Form one group of this trainer (rank 0) and every engine rank behind ``clients``.

    Each client's ``init_weight_update_group`` runs concurrently (threads) with this process's own
    join; ``master_port`` None picks a free port. ``device`` holds the trainer's bucket buffers
    (default: the current CUDA device for nccl, CPU for gloo). Neither side's default process
    group is used.
    """
    targets = [as_target(c) for c in clients]
    if not targets:
        raise InvalidArgumentError("at least one engine is needed", field="clients")
    if bucket_bytes <= 0:
        raise InvalidArgumentError("must be > 0", field="bucket_bytes")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    ranks = [int(t.engine_ranks()) for t in targets]
    world_size = 1 + sum(ranks)
    name = group_name or f"weight_sync_{uuid.uuid4().hex[:12]}"
    store = master_store(master_address, master_port, world_size, timeout_s)
    cfg = GroupConfig(master_address, store.port, 0, world_size, name, backend, timeout_s)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(targets) + 1, thread_name_prefix="weight-sync-init")
    offsets = [1 + sum(ranks[:i]) for i in range(len(targets))]
    futures = [
        pool.submit(t.init_weight_update_group, master_address=master_address, master_port=store.port,
                    rank_offset=off, world_size=world_size, group_name=name, backend=backend, timeout_s=timeout_s)
        for t, off in zip(targets, offsets)
    ]
    own = pool.submit(CommGroup.join, cfg, device, store)
    try:
        done, _ = concurrent.futures.wait([own, *futures], timeout=timeout_s + 5,
                                          return_when=concurrent.futures.FIRST_EXCEPTION)
        err = first_error([own, *futures])
        if err is not None:
            raise err
        if len(done) != len(futures) + 1:
            raise GroupFailedError(f"group {quoted(name)} did not form within {timeout_s:g} s")
    finally:
        pool.shutdown(wait=False)
    return WeightSyncGroup(own.result(), targets, bucket_bytes)
