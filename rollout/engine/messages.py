"""Typed messages between a front end (in-process ``Engine`` or the gRPC server) and the engine loop.

The loop runs in a thread (in-process) or in its own process (server); either way it reads
``Command`` objects from an inbox and writes lists of ``Event`` objects to an outbox. Only these
dataclasses cross that boundary, never client-supplied bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from rollout.types import PauseMode, SamplingParams, StreamChunk
from weight_sync.buckets import WireLayout
from weight_sync.sources import Source


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
    return_routed_experts: bool = False  # the MoE layers' top-k expert ids of every token


@dataclass(slots=True)
class Abort:
    """Abort these requests (every sample of each), or every request when ``request_ids`` is None."""

    request_ids: list[str] | None = None


# ---------------------------------------------------------------------------------------------- control
# One frozen dataclass per control command; the engine core handles them in one ``match``. Values
# are checked where they enter (the in-process API, the proto conversion) and again by their handler.


@dataclass(frozen=True, slots=True)
class Pause:
    """Pause generation: ABORT ends running requests, RETRACT requeues them, IN_PLACE freezes them."""

    mode: PauseMode = PauseMode.ABORT


@dataclass(frozen=True, slots=True)
class Continue:
    """Resume after ``Pause``."""


@dataclass(frozen=True, slots=True)
class FlushCache:
    """Drop the prefix cache."""


@dataclass(frozen=True, slots=True)
class GetInfo:
    """Report the engine's state (``EngineInfo``)."""


@dataclass(frozen=True, slots=True)
class CheckIntegrity:
    """Prove that no KV slot leaked (raises on the first problem)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """End every request with reason abort and stop the loop."""


@dataclass(frozen=True, slots=True)
class InitWeightGroup:
    """Join a trainer's weight-update group as rank ``rank_offset`` (the trainer is rank 0)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "default"
    backend: str = "nccl"
    timeout_s: float | None = None  # None: the default join and collective timeout


@dataclass(frozen=True, slots=True)
class DestroyWeightGroup:
    """Leave and destroy a weight-update group."""

    group_name: str = "default"


@dataclass(frozen=True, slots=True)
class UpdateWeightsFromDistributed:
    """Receive the trainer's broadcast buckets over a formed group and load them in place."""

    layout: WireLayout
    group_name: str = "default"
    version: int | None = None  # None: the current version + 1
    swap: bool = False  # receive into a shadow copy while generating; switch between two steps


@dataclass(frozen=True, slots=True)
class UpdateWeightsFromTensor:
    """Load buckets a colocated trainer shares (one CUDA IPC or shared-memory source per bucket)."""

    layout: WireLayout
    sources: tuple[Source, ...]
    version: int | None = None
    swap: bool = False  # receive into a shadow copy while generating; switch between two steps
    more: bool = False  # more calls of this update follow (``WeightUpdater.from_tensor``)


@dataclass(frozen=True, slots=True)
class UpdateWeightsFromDisk:
    """Reload the weights from a safetensors checkpoint directory."""

    model_path: str
    version: int | None = None
    swap: bool = False  # receive into a shadow copy while generating; switch between two steps


@dataclass(frozen=True, slots=True)
class ReleaseMemory:
    """Give the memory of these tags back (empty: every tag)."""

    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResumeMemory:
    """Map the memory of these tags back (empty: every tag)."""

    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RebalanceExperts:
    """Place the experts by the tokens counted since the last rebalance (expert parallelism).

    ``placements``: per MoE layer, every rank's slots (logical expert ids, -1 empty); None asks rank
    0 to compute them, and it sends the other ranks the command with them filled in."""

    placements: tuple[tuple[tuple[int, ...], ...], ...] | None = None


@dataclass(frozen=True, slots=True)
class SwitchShadow:
    """Engine ranks > 0: switch to the shadow weights of swap update ``op`` now (rank 0 sends it once
    every rank reported its shadow ready, so all ranks switch between the same two steps)."""

    op: int


@dataclass(frozen=True, slots=True)
class DropShadow:
    """Engine ranks > 0: free the shadow weights of swap update ``op`` (it failed on some rank, or
    the update falls back to the pausing path); the weights being served stay as they are."""

    op: int


ControlCommand = Union[
    Pause, Continue, FlushCache, GetInfo, CheckIntegrity, Shutdown, InitWeightGroup, DestroyWeightGroup,
    UpdateWeightsFromDistributed, UpdateWeightsFromTensor, UpdateWeightsFromDisk, ReleaseMemory, ResumeMemory,
    RebalanceExperts, SwitchShadow, DropShadow,
]


@dataclass(slots=True)
class Control:
    """A control command that gets a ``ControlReply`` with the same ``call_id``."""

    call_id: int
    command: ControlCommand


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
