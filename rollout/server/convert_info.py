"""EngineInfo, pause modes, memory states and rebalance reports <-> protos (GetInfo, pauses,
ReleaseMemory / ResumeMemory, RebalanceExperts)."""

from __future__ import annotations

from typing import Any

from protos import rollout_pb2 as pb
from rollout.errors import InvalidArgumentError, quoted
from rollout.types import EngineInfo, PauseMode

__all__ = ["info_to_proto", "info_from_proto", "memory_to_proto", "memory_from_proto", "pause_mode_from_proto",
           "pause_mode_to_proto", "rebalance_to_proto", "rebalance_from_proto"]

_PAUSE_TO_PROTO = {
    PauseMode.ABORT: pb.PAUSE_MODE_ABORT,
    PauseMode.RETRACT: pb.PAUSE_MODE_RETRACT,
    PauseMode.IN_PLACE: pb.PAUSE_MODE_IN_PLACE,
}
_PAUSE_FROM_PROTO = {v: k for k, v in _PAUSE_TO_PROTO.items()}


def pause_mode_from_proto(value: int) -> PauseMode:
    """Proto enum value to ``PauseMode``; UNSPECIFIED (a request that left ``mode`` unset) is ABORT,
    as in SGLang's pause; unknown values are rejected."""
    if value == pb.PAUSE_MODE_UNSPECIFIED:
        return PauseMode.ABORT
    try:
        return _PAUSE_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgumentError(
            f"must be ABORT, RETRACT or IN_PLACE (got {value})", field="mode"
        ) from None


def pause_mode_to_proto(mode: PauseMode | str | None) -> int:
    """``PauseMode`` (or its string value; None = UNSPECIFIED) to the proto enum value."""
    if mode is None:
        return pb.PAUSE_MODE_UNSPECIFIED
    try:
        return _PAUSE_TO_PROTO[PauseMode(mode)]
    except ValueError:
        raise InvalidArgumentError(
            f"must be abort, retract or in_place (got {quoted(mode)})", field="mode"
        ) from None


def info_to_proto(info: EngineInfo) -> pb.GetInfoResponse:
    """Pack an ``EngineInfo`` snapshot."""
    msg = pb.GetInfoResponse(
        model_path=info.model_path,
        architecture=info.architecture,
        context_length=info.context_length,
        vocab_size=info.vocab_size,
        weight_version=info.weight_version,
        weights_valid=info.weights_valid,
        paused=info.paused,
        pause_mode=pause_mode_to_proto(info.pause_mode),
        num_waiting=info.num_waiting,
        num_running=info.num_running,
        num_paused=info.num_paused,
        kv_total_tokens=info.kv_total_tokens,
        kv_used_tokens=info.kv_used_tokens,
        kv_cached_tokens=info.kv_cached_tokens,
        page_size=info.page_size,
        num_retractions=info.num_retractions,
        device=info.device,
        dtype=info.dtype,
        version=info.version,
        tp_size=info.tp_size,
        deterministic=info.deterministic,
        spec_drafted=info.spec_drafted,
        spec_accepted=info.spec_accepted,
        spec_verified=info.spec_verified,
    )
    _memory_into(msg.memory, info.memory)
    for rank, states in enumerate(info.rank_memory):
        entry = msg.rank_memory.add(rank=rank)
        _memory_into(entry.memory, states)
    return msg


def _memory_into(field: Any, states: dict[str, dict[str, Any]]) -> None:
    for tag, state in states.items():
        field[tag].state = str(state.get("state", ""))
        field[tag].bytes = int(state.get("bytes", 0))
        field[tag].backup = bool(state.get("backup", False))


def _memory_from(field: Any) -> dict[str, dict[str, Any]]:
    return {tag: {"state": m.state, "bytes": m.bytes, "backup": m.backup} for tag, m in field.items()}


def info_from_proto(msg: pb.GetInfoResponse) -> EngineInfo:
    """Unpack a ``GetInfoResponse``."""
    mode = (
        None if msg.pause_mode == pb.PAUSE_MODE_UNSPECIFIED else pause_mode_from_proto(msg.pause_mode).value
    )
    return EngineInfo(
        model_path=msg.model_path,
        architecture=msg.architecture,
        context_length=msg.context_length,
        vocab_size=msg.vocab_size,
        weight_version=msg.weight_version,
        weights_valid=msg.weights_valid,
        paused=msg.paused,
        pause_mode=mode,
        num_waiting=msg.num_waiting,
        num_running=msg.num_running,
        num_paused=msg.num_paused,
        kv_total_tokens=msg.kv_total_tokens,
        kv_used_tokens=msg.kv_used_tokens,
        kv_cached_tokens=msg.kv_cached_tokens,
        page_size=msg.page_size,
        num_retractions=msg.num_retractions,
        device=msg.device,
        dtype=msg.dtype,
        memory=_memory_from(msg.memory),
        version=msg.version,
        tp_size=msg.tp_size or 1,
        rank_memory=[_memory_from(r.memory) for r in sorted(msg.rank_memory, key=lambda r: r.rank)],
        deterministic=msg.deterministic,
        spec_drafted=msg.spec_drafted,
        spec_accepted=msg.spec_accepted,
        spec_verified=msg.spec_verified,
    )


def memory_to_proto(states: dict[str, dict[str, Any]]) -> pb.MemoryResponse:
    """``{tag: {"state", "bytes", "backup"}}`` -> MemoryResponse."""
    msg = pb.MemoryResponse()
    _memory_into(msg.memory, states)
    return msg


def memory_from_proto(msg: pb.MemoryResponse) -> dict[str, dict[str, Any]]:
    return _memory_from(msg.memory)


def rebalance_to_proto(report: dict[str, float | int]) -> pb.RebalanceExpertsResponse:
    """``Engine.rebalance_experts``'s dict (the fields of ``RebalanceReport``) -> RebalanceExpertsResponse."""
    return pb.RebalanceExpertsResponse(**report)


def rebalance_from_proto(msg: pb.RebalanceExpertsResponse) -> dict[str, float | int]:
    """The dict ``Engine.rebalance_experts`` returns: balancedness_before / _after, moved, tokens."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}
