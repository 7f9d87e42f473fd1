"""Engine side of memory release / resume: registers the memory control operations on an EngineCore."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.engine_core import EngineCore


def attach_memory_control(core: EngineCore) -> None:
    """Register the memory operations (none yet: release / resume are added separately)."""
