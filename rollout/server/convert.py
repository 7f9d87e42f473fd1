"""Conversion between ``rollout.v1`` protos and ``rollout.types``: the only place the two meet.

Incoming protos are checked here (unset optional fields mean engine defaults, unknown enum values
are rejected by name); outgoing values are packed here. Errors map to gRPC status codes both ways.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import grpc
import numpy as np

from protos import rollout_pb2 as pb
from rollout.engine.messages import AddRequest
from rollout.errors import InvalidArgumentError, RolloutError, error_from_code, quoted
from rollout.server.convert_chat import chat_from_proto, chat_to_proto

# Re-exported: callers find every conversion here; these live in convert_info.py.
from rollout.server.convert_info import info_from_proto as info_from_proto
from rollout.server.convert_info import info_to_proto as info_to_proto
from rollout.server.convert_info import memory_from_proto as memory_from_proto
from rollout.server.convert_info import memory_to_proto as memory_to_proto
from rollout.server.convert_info import pause_mode_from_proto as pause_mode_from_proto
from rollout.server.convert_info import pause_mode_to_proto as pause_mode_to_proto
from rollout.server.convert_info import rebalance_from_proto as rebalance_from_proto
from rollout.server.convert_info import rebalance_to_proto as rebalance_to_proto
from rollout.types import (
    ChatPrompt,
    FinishReason,
    SamplingParams,
    StreamChunk,
    TopLogprobs,
    as_sampling_params,
)

if TYPE_CHECKING:
    from rollout.engine.request_validation import RequestLimits
    from rollout.tokenizer import Tokenizer

# Optional scalar fields of the SamplingParams proto, by name; they equal the dataclass field names.
_SCALAR_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_new_tokens",
    "min_new_tokens",
    "ignore_eos",
    "seed",
    "n",
)
_SAMPLING_DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}

_FINISH_TO_PROTO = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


# ---------------------------------------------------------------------------------------------
# Sampling parameters and requests


def sampling_from_proto(msg: pb.SamplingParams | None) -> SamplingParams:
    """Build validated ``SamplingParams``; fields the sender left unset take the engine defaults."""
    if msg is None:
        return SamplingParams()
    kwargs: dict[str, Any] = {
        name: getattr(msg, name) for name in _SCALAR_SAMPLING_FIELDS if msg.HasField(name)
    }
    if msg.stop:
        kwargs["stop"] = tuple(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    return SamplingParams(**kwargs)


def sampling_to_proto(params: SamplingParams | Mapping[str, Any] | None) -> pb.SamplingParams:
    """Pack sampling parameters, setting only the fields that differ from the defaults.

    A dict is validated through ``SamplingParams.from_dict`` first, so a typo fails on the client.
    """
    if params is None:
        return pb.SamplingParams()
    params = as_sampling_params(params)
    msg = pb.SamplingParams()
    for name in _SCALAR_SAMPLING_FIELDS:
        value = getattr(params, name)
        if value is not None and value != _SAMPLING_DEFAULTS[name]:
            setattr(msg, name, value)
    msg.stop.extend(params.stop)
    msg.stop_token_ids.extend(params.stop_token_ids)
    return msg


def add_request_from_proto(
    msg: pb.GenerateRequest, request_id: str, limits: RequestLimits, tokenizer: Tokenizer | None
) -> AddRequest:
    """Turn a ``GenerateRequest`` into a validated engine ``AddRequest``."""
    from rollout.engine.request_validation import check_prompt_size, make_add_request

    check_prompt_size(len(msg.input_ids), len(msg.text), limits)  # before any per-token work
    sampling = sampling_from_proto(msg.sampling_params if msg.HasField("sampling_params") else None)
    return make_add_request(
        request_id,
        input_ids=list(msg.input_ids) or None,
        text=msg.text or None,
        chat=chat_from_proto(msg),
        sampling=sampling,
        limits=limits,
        tokenizer=tokenizer,
        return_logprob=msg.return_logprob,
        return_raw_logprob=msg.return_raw_logprob,
        top_logprobs_num=msg.top_logprobs_num,
        stream=msg.stream if msg.HasField("stream") else True,
        return_routed_experts=msg.return_routed_experts,
    )


def generate_request_to_proto(
    prompt: Sequence[int] | str | ChatPrompt,
    sampling_params: SamplingParams | Mapping[str, Any] | None = None,
    *,
    request_id: str = "",
    return_logprob: bool = False,
    return_raw_logprob: bool = False,
    top_logprobs_num: int = 0,
    stream: bool = True,
    return_text: bool = False,
    return_routed_experts: bool = False,
) -> pb.GenerateRequest:
    """Build a ``GenerateRequest`` from token ids, a text prompt or a chat."""
    msg = pb.GenerateRequest(
        return_routed_experts=return_routed_experts,
        request_id=request_id,
        sampling_params=sampling_to_proto(sampling_params),
        return_logprob=return_logprob,
        return_raw_logprob=return_raw_logprob,
        top_logprobs_num=top_logprobs_num,
        stream=stream,
        return_text=return_text,
    )
    if isinstance(prompt, str):
        msg.text = prompt
    elif isinstance(prompt, ChatPrompt):
        chat_to_proto(prompt, msg)
    else:
        try:
            msg.input_ids.extend(prompt)
        except (TypeError, ValueError) as e:  # non-integers or ids beyond int32
            raise InvalidArgumentError(
                f"must be a string or a list of int32 token ids ({e})", field="prompt"
            ) from None
    return msg


# ---------------------------------------------------------------------------------------------
# Stream chunks

# The wire dtypes of IntArray, little-endian whatever the machine.
_WIRE_DTYPES = {"int16": np.dtype("<i2"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8")}


def int_array_to_proto(arr: np.ndarray) -> pb.IntArray:
    """Pack an integer array (routed expert ids: int16) as little-endian bytes plus its shape."""
    wire = _WIRE_DTYPES[np.dtype(arr.dtype).name]
    return pb.IntArray(data=np.ascontiguousarray(arr, dtype=wire).tobytes(), shape=arr.shape, dtype=wire.name)


def int_array_from_proto(msg: pb.IntArray, field: str) -> np.ndarray:
    """Unpack an ``IntArray``; a dtype or byte count that does not fit its shape is refused by ``field``."""
    wire = _WIRE_DTYPES.get(msg.dtype)
    if wire is None:
        raise InvalidArgumentError(f"unknown dtype {quoted(msg.dtype)}; known: {sorted(_WIRE_DTYPES)}", field=field)
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape) or len(msg.data) != int(np.prod(shape, dtype=np.int64)) * wire.itemsize:
        raise InvalidArgumentError(f"{len(msg.data)} bytes do not hold a {msg.dtype} array of shape {shape}",
                                   field=field)
    return np.frombuffer(msg.data, dtype=wire).astype(wire.newbyteorder("=")).reshape(shape)  # writable, native


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    """``FinishReason`` (or None) to the proto enum value."""
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_TO_PROTO[FinishReason(reason)]


def finish_reason_from_proto(value: int) -> FinishReason | None:
    """Proto enum value to ``FinishReason``; UNSPECIFIED is None; unknown values are rejected."""
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    try:
        return _FINISH_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgumentError(f"unknown value {value}", field="finish_reason") from None


def chunk_to_proto(chunk: StreamChunk, text: str | None = None) -> pb.GenerateResponse:
    """Pack one ``StreamChunk`` (``text``: the sample's decoded output, on its last chunk; the chunk's
    own ``text``, when set, goes out as ``text_delta``)."""
    msg = pb.GenerateResponse(
        request_id=chunk.request_id,
        index=chunk.index,
        token_ids=chunk.token_ids,
        logprobs=chunk.logprobs or (),
        raw_logprobs=chunk.raw_logprobs or (),
        top_logprobs=[
            pb.TopLogprobs(token_ids=t.token_ids, logprobs=t.logprobs) for t in chunk.top_logprobs or ()
        ],
        weight_versions=chunk.weight_versions,
        finished=chunk.finished,
        finish_reason=finish_reason_to_proto(chunk.finish_reason),
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        cached_tokens=chunk.cached_tokens,
    )
    # bool is an int subclass; a stop "token" is never a bool, but guard the oneof choice anyway.
    if isinstance(chunk.matched_stop, str):
        msg.matched_stop_str = chunk.matched_stop
    elif isinstance(chunk.matched_stop, int) and not isinstance(chunk.matched_stop, bool):
        msg.matched_stop_token_id = chunk.matched_stop
    if text is not None:
        msg.text = text
    if chunk.routed_experts is not None:
        msg.routed_experts.CopyFrom(int_array_to_proto(chunk.routed_experts))
    if chunk.prompt_routed_experts is not None:
        msg.prompt_routed_experts.CopyFrom(int_array_to_proto(chunk.prompt_routed_experts))
    if chunk.text:
        msg.text_delta = chunk.text
    return msg


def chunk_from_proto(
    msg: pb.GenerateResponse,
    *,
    logprobs: bool = False,
    raw_logprobs: bool = False,
    top_logprobs: bool = False,
    routed_experts: bool = False,
    text: bool = False,
) -> StreamChunk:
    """Unpack one response; the flags say which optional values the request asked for (else None)."""
    kind = msg.WhichOneof("matched_stop")
    matched: int | str | None = None if kind is None else getattr(msg, kind)
    return StreamChunk(
        request_id=msg.request_id,
        index=msg.index,
        token_ids=list(msg.token_ids),
        logprobs=list(msg.logprobs) if logprobs else None,
        raw_logprobs=list(msg.raw_logprobs) if raw_logprobs else None,
        top_logprobs=[TopLogprobs(list(t.token_ids), list(t.logprobs)) for t in msg.top_logprobs]
        if top_logprobs
        else None,
        weight_versions=list(msg.weight_versions),
        finished=msg.finished,
        finish_reason=finish_reason_from_proto(msg.finish_reason),
        matched_stop=matched,
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
        cached_tokens=msg.cached_tokens,
        routed_experts=int_array_from_proto(msg.routed_experts, "routed_experts")
        if routed_experts and msg.HasField("routed_experts") else None,
        prompt_routed_experts=int_array_from_proto(msg.prompt_routed_experts, "prompt_routed_experts")
        if routed_experts and msg.HasField("prompt_routed_experts") else None,
        text=msg.text_delta if text else None,
    )


# ---------------------------------------------------------------------------------------------
# Control


def abort_ids_from_proto(msg: pb.AbortRequest) -> list[str] | None:
    """The ids to abort, or None for all; exactly one of ``request_ids`` and ``all`` must be given."""
    if msg.all and msg.request_ids:
        raise InvalidArgumentError("give request_ids or all, not both", field="all")
    if msg.all:
        return None
    if not msg.request_ids:
        raise InvalidArgumentError("give request ids to abort, or set all", field="request_ids")
    return list(msg.request_ids)


# ---------------------------------------------------------------------------------------------
# Errors


def status_code(err: RolloutError) -> grpc.StatusCode:
    """The gRPC status a typed error maps to (INTERNAL when its code is not a status name)."""
    return getattr(grpc.StatusCode, str(err.code), grpc.StatusCode.INTERNAL)


def error_from_status(code: grpc.StatusCode | None, details: str | None) -> RolloutError:
    """Rebuild a typed error from a gRPC status; ``code`` keeps the status name even without a subclass."""
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # grpc's own words name neither the cause nor a remedy
        details = f"the call ran past the timeout its caller gave ({details or name}); give a longer timeout"
    return error_from_code(name, details or name)
