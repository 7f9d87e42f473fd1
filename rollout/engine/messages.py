"""Typed messages between a front end (in-process ``Engine`` or the gRPC server) and the engine loop.

The loop runs in a thread (in-process) or in its own process (server); either way it reads
``Command`` objects from an inbox and writes lists of ``Event`` objects to an outbox. Only these
dataclasses cross that boundary, never client-supplied bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from rollout.types import PauseMode, SamplingParams, StreamChunk


@dataclass(slots=True)
class AddRequest:
    """Start generating ``sampling.n`` samples of one prompt (already validated by the sender)."""

    request_id: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    return_raw_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = False  # False: one chunk per sample, when it finishes, with all its tokens


@dataclass(slots=True)
class Abort:
    """Abort these requests (every sample of each), or every request when ``request_ids`` is None."""

    request_ids: list[str] | None = None


@dataclass(slots=True)
class Control:
    """A control call that gets a ``ControlReply`` with the same ``call_id``.

    ``op`` is one of: "pause" (args: mode), "continue", "flush_cache", "info", "shutdown", and the
    operations later subsystems register with the loop (weights, memory).
    """

    call_id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


Command = Union[AddRequest, Abort, Control]


@dataclass(slots=True)
class ControlReply:
    """The answer to a ``Control``: ``result`` on success, else an error code and message."""

    call_id: int
    result: Any = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(slots=True)
class RequestFailed:
    """A request the loop refused or could not finish (it is gone; nothing else will arrive)."""

    request_id: str
    error_code: str
    error_message: str


Event = Union[StreamChunk, ControlReply, RequestFailed]


def pause_args(mode: PauseMode) -> dict[str, Any]:
    """Arguments of a pause control call."""
    return {"mode": PauseMode(mode).value}
