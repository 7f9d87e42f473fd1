"""The engine: the in-process ``Engine`` API, ``EngineCore`` (scheduler + cache + runner, one ``match``
over typed commands), the loop that drives it, the thread or process it runs in, and the front
end's ``EngineClient``. Only the dataclasses of ``messages`` cross between a front end and the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollout.engine.api import Engine

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    if name == "Engine":  # lazily: importing the messages must not load the model code
        from rollout.engine.api import Engine

        return Engine
    raise AttributeError(name)
