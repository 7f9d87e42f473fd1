"""Engine side of memory release / resume: the ``release_memory`` / ``resume_memory`` control operations.

Rules (see ``docs/architecture.md``, "Releasable memory"):

- allowed while paused or idle (no running requests), else FAILED_PRECONDITION saying to pause first;
- releasing ``kv_cache`` retracts the running (paused in place) requests back to the queue, so they are
  recomputed after resume, and drops the prefix cache;
- releasing ``weights`` without a host backup leaves them invalid: the gate's ``WEIGHTS_INVALID``
  stays set until a weight update completes (the weight updater clears it);
- while any tag is released, the gate's ``MEMORY_RELEASED`` names the released tags, so new
  requests fail with FAILED_PRECONDITION instead of waiting;
- weight updates are refused while the weights' memory is released (they would write to unmapped
  memory); release and resume of a tag already in that state do nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from memory_saver import MemoryState, UnknownTagError
from rollout.control.draft_memory import DraftMemory
from rollout.control.gate import Blocker, GenerationGate
from rollout.errors import FailedPreconditionError, InvalidArgumentError, quoted
from rollout.types import parse_memory_tags

if TYPE_CHECKING:
    from rollout.control.memory_placement import EngineMemory
    from rollout.runner.model_runner import ModelRunner
    from rollout.scheduler.scheduler import Scheduler

WEIGHTS_INVALID_MESSAGE = (
    "the weights were released without a host backup; load new weights (update_weights_*) before generating"
)


class MemoryControl:
    """``release`` / ``resume`` of the engine's tagged memory, and the memory part of ``GetInfo``."""

    def __init__(self, memory: EngineMemory, scheduler: Scheduler | None, runner: ModelRunner,
                 gate: GenerationGate, drafter: Any = None) -> None:
        # scheduler: None on tensor-parallel ranks other than 0 (rank 0 checks the preconditions
        # and retracts requests; the others only map and unmap their own memory). drafter: the draft
        # model (``rollout.spec``), whose memory goes and comes back with the engine's.
        self.memory = memory
        self._scheduler = scheduler
        self._runner = runner
        self._gate = gate
        self._draft = DraftMemory(drafter) if drafter is not None else None
        # Told when a release drops the weights (no backup): the weight updater forgets an update in
        # calls still open, whose earlier calls' tensors are gone (on every rank).
        self.on_weights_lost: Callable[[], None] = lambda: None

    def release(self, tags: Any) -> dict[str, dict[str, object]]:
        """Release ``tags`` (None or empty: all); returns the state of every tag."""
        wanted = self.check_release(tags)
        saver = self.memory.saver
        if "kv_cache" in wanted and saver.region("kv_cache").state is MemoryState.ACTIVE \
                and self._scheduler is not None:
            self._drop_kv()
        weights = saver.region("weights")
        drop_weights = "weights" in wanted and weights.state is MemoryState.ACTIVE and not weights.backup
        if "cuda_graph" in wanted:
            self._runner.drop_cuda_graphs()
        try:
            saver.release(wanted)
            if self._draft is not None:
                self._draft.release(wanted)
        finally:
            if drop_weights and weights.state is MemoryState.RELEASED:
                self._gate.block(Blocker.WEIGHTS_INVALID, WEIGHTS_INVALID_MESSAGE)
                self.on_weights_lost()
            self._update_blocker()
        if self.memory.device.type == "cuda":
            torch.cuda.empty_cache()  # cached activation blocks go back to the driver too
        return self.states()

    def check_release(self, tags: Any) -> tuple[str, ...]:
        """The tags a release of ``tags`` covers; raises if they are unknown or requests are generating."""
        wanted = self._tags(tags)
        sched = self._scheduler
        if sched is not None and sched.paused is None and sched.running:
            raise FailedPreconditionError(
                f"cannot release memory while {len(sched.running)} requests are generating; pause first "
                "(pause mode abort, retract or in_place), then release"
            )
        return wanted

    def check_resume(self, tags: Any) -> tuple[str, ...]:
        """The tags a resume of ``tags`` covers; raises if they are unknown."""
        return self._tags(tags)

    def resume(self, tags: Any) -> dict[str, dict[str, object]]:
        """Resume ``tags`` (None or empty: all); returns the state of every tag."""
        wanted = self._tags(tags)
        try:
            self.memory.saver.resume(wanted)
            if self._draft is not None:
                self._draft.resume(wanted)
        finally:
            self._update_blocker()
        if not self.memory.saver.released_tags():
            # Capturing runs the model over the weights and the KV pool: only once both are mapped.
            self._runner.restore_cuda_graphs()
        return self.states()

    def states(self) -> dict[str, dict[str, object]]:
        """The saver's tag states; ``cuda_graph`` counts the decode graphs' memory (torch-allocated)."""
        states = self.memory.saver.states()
        if "cuda_graph" in states:
            runner = self._runner
            states["cuda_graph"]["bytes"] = int(states["cuda_graph"]["bytes"]) + (
                runner.graph_bytes if runner.graphs is not None else 0)
        if self._draft is not None:
            self._draft.add_states(states)
        return states

    @property
    def weights_mapped(self) -> bool:
        """Whether the weights' memory is there to read and write (not released)."""
        return self.memory.saver.region("weights").state is MemoryState.ACTIVE

    def check_weights_writable(self, doing: str = "updating weights") -> None:
        """Refuse a weight update or an expert move while the weights' memory is released (it would
        touch unmapped memory); ``doing`` names the refused action in the message."""
        if not self.weights_mapped:
            raise FailedPreconditionError(
                f"the weights' memory is released; call resume_memory(['weights']) before {doing}"
            )

    def _drop_kv(self) -> None:
        """Retract every running request (KV freed, recomputed later) and drop the prefix cache."""
        assert self._scheduler is not None
        self._scheduler.retract_running()  # back to the queue, first in line; the pause mode is kept
        self._scheduler.flush_prefix_cache()

    def _update_blocker(self) -> None:
        released = self.memory.saver.released_tags()
        if released:
            self._gate.block(Blocker.MEMORY_RELEASED,
                             f"memory of {', '.join(released)} is released; call resume_memory first")
        else:
            self._gate.clear(Blocker.MEMORY_RELEASED)

    def _tags(self, tags: Any) -> tuple[str, ...]:
        """Validated tags; None or empty means every tag (as in the protocol)."""
        tags = parse_memory_tags(tags)
        if not tags:
            return self.memory.saver.tags
        try:
            return self.memory.saver.check_tags(tags)
        except UnknownTagError as e:
            raise InvalidArgumentError(
                f"unknown memory tag {quoted(e.tag)}; use one of {list(self.memory.saver.tags)}", field="tags"
            ) from None
