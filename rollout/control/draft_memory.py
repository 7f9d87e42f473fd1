"""The draft model's memory (a draft model or an EAGLE head, ``rollout.spec``), released and resumed
with the engine's.

A drafter runs in its own ``ModelRunner``, so its weights, KV pool and decode graphs live in a
``MemorySaver`` of their own. A release of the engine's tags releases the drafter's same tags: a
colocated trainer gets all of the GPU memory back, not the target's only.

- ``kv_cache``: every sequence's draft state is dropped first (its draft KV is gone); each sequence
  catches up over its context at its next draft.
- ``weights``: kept on the host when the engine keeps its own (the drafter's saver takes the engine's
  backup tags); otherwise lost, and the draft then has no weight version (stale: under
  ``on_stale_weights="disable"`` it stops drafting until an update carries its ``draft.`` tensors).
- ``cuda_graph``: dropped and captured again once all of the drafter's memory is back.
"""

from __future__ import annotations

from typing import Any

from memory_saver import MemoryState


class DraftMemory:
    """Release / resume of one drafter's memory (``drafter.runner``, ``drafter.kv``)."""

    def __init__(self, drafter: Any) -> None:
        self._drafter = drafter
        self._saver = drafter.runner.memory.saver

    def release(self, tags: tuple[str, ...]) -> None:
        """Release the drafter's ``tags`` that the engine is releasing."""
        drafter, saver = self._drafter, self._saver
        tags = tuple(t for t in tags if t in saver.tags)
        weights = saver.region("weights")
        lost = "weights" in tags and weights.state is MemoryState.ACTIVE and not weights.backup
        if lost or ("kv_cache" in tags and saver.region("kv_cache").state is MemoryState.ACTIVE):
            drafter.kv.forget_all()  # its draft KV goes, or was computed with weights that go
        if "cuda_graph" in tags:
            drafter.runner.drop_cuda_graphs()
        saver.release(tags)
        if lost:
            drafter.weight_version = None

    def resume(self, tags: tuple[str, ...]) -> None:
        """Resume the drafter's ``tags``; its graphs come back once none of its memory is released."""
        self._saver.resume(tuple(t for t in tags if t in self._saver.tags))
        if not self._saver.released_tags():
            self._drafter.runner.restore_cuda_graphs()

    def add_states(self, states: dict[str, dict[str, object]]) -> None:
        """Add the drafter's bytes to the engine's ``states`` of the same tags (its decode graphs,
        allocated by torch, to ``cuda_graph``)."""
        runner = self._drafter.runner
        for tag, state in self._saver.states().items():
            if tag in states:
                states[tag]["bytes"] = int(states[tag]["bytes"]) + int(state["bytes"])
        if "cuda_graph" in states and runner.graphs is not None:
            states["cuda_graph"]["bytes"] = int(states["cuda_graph"]["bytes"]) + runner.graph_bytes
