"""Engine side of weight updates: registers the update control operations on an EngineCore."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.engine_core import EngineCore


def attach_weight_updates(core: EngineCore) -> None:
    """Register the weight-update operations (none yet: the update paths are added separately)."""
