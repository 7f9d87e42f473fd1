"""rollout: an inference engine and gRPC service for on-policy RL rollouts.

``from rollout import Engine, SamplingParams`` is the in-process API; ``rollout serve`` the service.
Heavy modules (torch, the model code) load only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Engine", "SamplingParams", "GenerateOutput", "StreamChunk", "FinishReason", "PauseMode", "__version__"]

if TYPE_CHECKING:
    from rollout.engine.api import Engine
    from rollout.types import FinishReason, GenerateOutput, PauseMode, SamplingParams, StreamChunk


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from rollout.engine.api import Engine

        return Engine
    if name in ("SamplingParams", "GenerateOutput", "StreamChunk", "FinishReason", "PauseMode"):
        import rollout.types as t

        return getattr(t, name)
    raise AttributeError(name)
