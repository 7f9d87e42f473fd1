"""Zero-pause weight updates: receive version v+1 into shadow weights while v keeps generating.

::

    loop thread   step step step step step | switch | step step ...      (tokens: v ... v | v+1 ...)
    beside it     allocate shadow, receive, load into it --^ (ready)

``start`` checks the command and returns a ``Background``: off the loop thread it allocates the
shadow (``EngineMemory.shadow_weights_arena``), copies into it the parameters the update does not
rewrite completely, and streams the update into it through the model's own loaders (on a side CUDA
stream, so decode kernels keep running). When that is done the loop, between two steps, calls
``switch``: the live weights arena adopts the shadow's memory (same addresses: CUDA graphs stay
valid), then the version and the KV epoch change. No forward pass sees two versions.

- No room for the shadow: the work returns ``NoRoom`` and the caller runs the pausing path instead
  (its reply says so). Over a group, the status vote carries it (``VOTE_FALLBACK``): every member
  then takes the push on its pausing path after a second vote.
- A failed transfer frees the shadow: the live weights were never touched, version v keeps serving
  and the weights stay valid.
- One swap at a time; while one runs, other updates, memory release/resume and expert moves are
  refused (``check_idle``).
- The draft model's tensors (``draft.`` names, ``control/draft_weights.py``) are copied aside on the
  draft's device while the shadow fills (the draft keeps drafting meanwhile) and written into the
  draft model at the switch: the draft's size in memory for the swap window, and a copy that small.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch

from memory_saver import CudaDriverError
from rollout.control.draft_weights import iter_update_checkpoint, route
from rollout.control.shadow import ShadowWeights
from rollout.control.weight_sources import OpenedSources
from rollout.control.weights import rejected_elsewhere
from rollout.engine.jobs import Background
from rollout.engine.messages import UpdateWeightsFromDisk, UpdateWeightsFromDistributed, UpdateWeightsFromTensor
from rollout.errors import FailedPreconditionError, RolloutError, quoted
from rollout.types import SwapResult
from weight_sync.buckets import bucket_views
from weight_sync.group import VOTE_FALLBACK, VOTE_GO, VOTE_REJECT, CommGroup, GroupFailedError
from weight_sync.receiver import receive_buckets

if TYPE_CHECKING:
    from rollout.control.weights import VersionOwner, WeightUpdater
    from rollout.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# While a shadow fills, the receiving thread's Python (a loader call per tensor) and the loop thread
# take turns on the GIL. At Python's default 5 ms turns, a step could wait up to 5 ms for it, several
# times per update (the 8B swap bench saw gaps of 12 ms over a step); shorter turns bound that wait.
SWAP_GIL_TURN_S = 0.0005


_gil_lock = threading.Lock()
_gil_users = 0  # receives running with short turns (engines of one process may swap at once)
_gil_saved = 0.0  # the interval before the first of them


def _with_short_gil_turns(work: Any) -> Any:
    """``work()`` with the interpreter's thread switch interval at most ``SWAP_GIL_TURN_S``; the
    interval in force before the first of overlapping receives comes back after the last."""
    global _gil_users, _gil_saved
    with _gil_lock:
        if _gil_users == 0:
            _gil_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_gil_saved, SWAP_GIL_TURN_S))
        _gil_users += 1
    try:
        return work()
    finally:
        with _gil_lock:
            _gil_users -= 1
            if _gil_users == 0:
                sys.setswitchinterval(_gil_saved)


UpdateCommand = Union[UpdateWeightsFromDistributed, UpdateWeightsFromTensor, UpdateWeightsFromDisk]


@dataclass
class ShadowReady:
    """A shadow holding the complete new weights, waiting for the switch."""

    shadow: ShadowWeights
    version: int
    written: set[str]  # our parameters the update wrote completely
    what: str
    total: int  # tensors in the update
    draft: list[tuple[str, torch.Tensor]]  # the draft model's tensors (names without ``draft.``), copied aside


@dataclass(frozen=True, slots=True)
class NoRoom:
    """The shadow could not be allocated: the update goes by the pausing path (``reason`` says why)."""

    reason: str


class WeightSwap:
    """Swap-mode updates of one engine rank (the shadow, and which swap is in flight)."""

    def __init__(self, updater: WeightUpdater, runner: ModelRunner, versions: VersionOwner) -> None:
        self._updater = updater
        self._runner = runner
        self._versions = versions
        self.busy = False  # a swap was started and has not been switched, dropped or failed yet
        self.pending: ShadowReady | None = None  # received, waiting for the switch
        self._stream: Any = None  # the side CUDA stream the shadow is written on

    def check_idle(self, what: str = "another weight or memory operation") -> None:
        """Refuse ``what`` while a swap update runs (it would race with the shadow or the switch)."""
        if self.busy:
            raise FailedPreconditionError(f"a swap weight update is in progress; {what} must wait for its reply")

    # ------------------------------------------------------------------ receive (beside the loop)
    def start(self, cmd: UpdateCommand) -> Background:
        """Check ``cmd`` and return the receive to run beside the loop. Its result is ``ShadowReady``
        or ``NoRoom``; its ``finish`` keeps a ready shadow as ``pending``."""
        self.check_idle("a second update")
        u = self._updater
        if isinstance(cmd, UpdateWeightsFromDistributed):
            group = u.group(cmd.group_name)
            work = lambda: self._from_group(cmd, group)  # noqa: E731 - validated beside the loop, after the vote
        elif isinstance(cmd, UpdateWeightsFromTensor):
            layouts, sources, version, covered = u.tensor_sources(cmd)
            work = lambda: self._from_sources(layouts, sources, version, covered)  # noqa: E731
        else:
            path, version, total, covered = u.disk_specs(cmd)
            work = lambda: self._from_disk(path, version, total, covered)  # noqa: E731
        self.busy = True
        return Background(work=lambda: _with_short_gil_turns(work), finish=self._arrived,
                          fail=lambda e: self.failed(cmd, e), abandon=self._abandoned)

    def _from_group(self, cmd: UpdateWeightsFromDistributed, group: CommGroup) -> ShadowReady | NoRoom:
        problem: RolloutError | None = None
        shadow, no_room = None, None
        try:
            layouts, version, covered = self._updater.distributed_layouts(cmd)
        except RolloutError as e:
            problem = e
        if problem is None:
            shadow, no_room = self._allocate()
        flag = VOTE_REJECT if problem else VOTE_FALLBACK if shadow is None else VOTE_GO
        try:
            verdict = group.vote(flag)
            if problem is not None:
                raise problem
            if verdict == VOTE_REJECT:
                raise rejected_elsewhere(cmd.group_name)
        except GroupFailedError as e:
            self._drop(shadow)
            raise FailedPreconditionError(f"{e.message}; the group was destroyed, form a new one") from None
        except BaseException:
            self._drop(shadow)
            raise
        if verdict == VOTE_FALLBACK:
            self._drop(shadow)
            return NoRoom(no_room or f"another member of group {quoted(cmd.group_name)} had no room for a shadow "
                                     "copy of its weights")
        assert shadow is not None
        total = sum(len(lay.tensors) for lay in layouts)
        try:
            return self._fill(shadow, covered, f"receiving over group {quoted(cmd.group_name)}",
                              receive_buckets(group, layouts), version, total)
        except BaseException as e:
            # This member's collectives are out of step with the others' now.
            group.abort(f"an engine failed to take the update: {type(e).__name__}: {e}")
            raise

    def _from_sources(self, layouts: list, sources: list, version: int,
                      covered: frozenset[str]) -> ShadowReady | NoRoom:
        shadow, no_room = self._allocate()
        if shadow is None:
            return NoRoom(no_room or "")
        total = sum(len(lay.tensors) for lay in layouts)
        try:
            with OpenedSources(sources, layouts, self._runner.device) as buffers:
                named = itertools.chain.from_iterable(bucket_views(lay, buf) for lay, buf in zip(layouts, buffers))
                return self._fill(shadow, covered, "reading shared tensors", named, version, total)
        except BaseException:
            self._drop(shadow)
            raise

    def _from_disk(self, path: str, version: int, total: int, covered: frozenset[str]) -> ShadowReady | NoRoom:
        shadow, no_room = self._allocate()
        if shadow is None:
            return NoRoom(no_room or "")
        return self._fill(shadow, covered, f"loading {path}", iter_update_checkpoint(path), version, total)

    def _allocate(self) -> tuple[ShadowWeights | None, str | None]:
        """The shadow, or None and why there is no room for it."""
        memory = self._runner.memory
        try:
            try:
                arena = memory.shadow_weights_arena()
            except CudaDriverError:
                if memory.device.type != "cuda":
                    raise
                torch.cuda.empty_cache()  # blocks torch's allocator keeps cached but unused count as room
                arena = memory.shadow_weights_arena()
        except (CudaDriverError, torch.OutOfMemoryError, MemoryError) as e:
            live = memory.weights_arena.nbytes if memory.weights_arena is not None else 0
            reason = (f"no room for a shadow copy of the weights ({live / 2**30:.2f} GiB) on engine rank "
                      f"{self._runner.tp.rank}: {e}; the update took the pausing path")
            logger.warning("%s", reason)
            return None, reason
        try:
            return ShadowWeights(self._runner.model, memory.weights_arena, arena), None
        except BaseException:
            arena.close()
            raise

    def _fill(self, shadow: ShadowWeights, covered: frozenset[str], what: str,
              named: Iterable[tuple[str, torch.Tensor]], version: int, total: int) -> ShadowReady:
        """The parameters the update leaves alone copied from the live ones, then the update loaded
        (its draft tensors copied aside for the switch)."""
        draft = self._updater.draft
        staged: list[tuple[str, torch.Tensor]] = []
        put = None if draft is None else lambda name, t: staged.append((name, draft.copy(t)))
        try:
            with self._side_stream() as stream:
                shadow.fill_from_live(skip=covered)
                written = shadow.load(route(named, put))
                if stream is not None:
                    stream.synchronize()  # device-side failures surface here, and the shadow is complete
        except BaseException as e:
            self._drop(shadow)
            if isinstance(e, RolloutError) and not isinstance(e, GroupFailedError):
                raise
            cause = e.message if isinstance(e, RolloutError) else f"{type(e).__name__}: {e}"
            raise FailedPreconditionError(
                f"{what} failed: {cause}; nothing was switched: version {self._versions.weight_version} keeps "
                "serving") from e
        return ShadowReady(shadow, version, written, what, total, staged)

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[Any]:
        device = self._runner.device
        if device.type != "cuda":
            yield None
            return
        with torch.cuda.device(device):
            if self._stream is None:
                self._stream = torch.cuda.Stream(device)
            with torch.cuda.stream(self._stream):
                yield self._stream

    @staticmethod
    def _drop(shadow: ShadowWeights | None) -> None:
        if shadow is not None:
            shadow.drop()

    # ------------------------------------------------------------------ on the loop thread
    def _arrived(self, result: ShadowReady | NoRoom) -> ShadowReady | NoRoom:
        if isinstance(result, ShadowReady):
            self.pending = result
        return result

    def failed(self, cmd: UpdateCommand, error: BaseException) -> None:
        """The receive failed (its shadow is freed already): nothing changed but a broken group."""
        del error
        self.busy = False
        if isinstance(cmd, UpdateWeightsFromDistributed):
            self._updater.drop_group_if_broken(cmd.group_name)

    def _abandoned(self, fut: Any) -> None:
        """The engine stops while the receive runs: free its shadow once it ends."""
        def free(f: Any) -> None:
            if f.exception() is None and isinstance(f.result(), ShadowReady):
                f.result().shadow.drop()
        fut.add_done_callback(free)

    def switch(self) -> SwapResult:
        """Make the pending shadow the live weights and its version current. Call between steps, with
        no step in flight. If the switch itself fails, the old weights keep serving."""
        ready, self.pending = self.pending, None
        self.busy = False
        if ready is None:
            raise FailedPreconditionError("no shadow weights are ready to switch to")
        t0 = time.perf_counter()
        try:
            ready.shadow.switch()
        except BaseException as e:
            ready.shadow.drop()
            raise FailedPreconditionError(
                f"switching to the new weights failed ({type(e).__name__}: {e}); version "
                f"{self._versions.weight_version} keeps serving") from e
        switched_ms = (time.perf_counter() - t0) * 1e3
        drafted = bool(ready.draft) and self._write_draft(ready.draft)
        self._updater.mark_loaded(ready.written, ready.version, f"swap in {switched_ms:.1f} ms, {ready.what}",
                                  ready.total, draft=drafted)
        return SwapResult(ready.version, swapped=True)

    def _write_draft(self, tensors: list[tuple[str, torch.Tensor]]) -> bool:
        """Write the staged draft tensors into the draft model (checked before: this does not fail but
        for a device fault, which leaves the draft stale and the target switched)."""
        draft = self._updater.draft
        assert draft is not None
        try:
            writer = draft.writer()
            for name, tensor in tensors:
                writer.write(name, tensor)
                if tensor.is_cuda:  # made on the side stream, read on this one: not reused before that
                    tensor.record_stream(torch.cuda.current_stream(tensor.device))
            writer.finish()
        except Exception:
            logger.exception("writing the draft model's tensors at the switch failed; the draft is stale")
            draft.spoiled()
            return False
        return True

    def drop(self) -> None:
        """Free the pending shadow (if any) and end the swap without switching."""
        ready, self.pending = self.pending, None
        self.busy = False
        if ready is not None:
            ready.shadow.drop()

    def fallback(self, cmd: UpdateCommand, reason: str) -> SwapResult:
        """The pausing path for an update that found no room for a shadow (between steps)."""
        self.drop()
        return SwapResult(self._updater.apply(cmd), swapped=False, note=reason)
