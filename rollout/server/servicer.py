"""The ``rollout.v1.Rollout`` servicer (grpc.aio) over an ``EngineClient``.

Every handler converts its request at the edge (``convert``), talks to the engine loop through the
client, and maps errors to statuses: a ``RolloutError`` to its own code, anything unexpected to
INTERNAL with its message; the server keeps serving either way.
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import grpc

from protos import rollout_pb2 as pb
from protos import rollout_pb2_grpc
from rollout.detokenize import TextDeltas
from rollout.engine.messages import (
    Continue,
    ControlCommand,
    FlushCache,
    GetInfo,
    Pause,
    RebalanceExperts,
    ReleaseMemory,
    ResumeMemory,
)
from rollout.errors import (
    EngineDeadError,
    InvalidArgumentError,
    OutOfRangeError,
    PermissionDeniedError,
    RolloutError,
    clip_message,
)
from rollout.server import convert, convert_weights

if TYPE_CHECKING:
    from rollout.engine.client import EngineClient

logger = logging.getLogger(__name__)

GENERATE_OVERHEAD_BYTES = 64 * 1024  # sampling options, stop strings, ids: everything but the prompt
MAX_TEXT_BYTES_PER_TOKEN = 64  # a text prompt longer than this per token of context cannot fit it


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT
    (gRPC itself would report a parse failure as UNKNOWN)."""

    __slots__ = ("type_name", "error")

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error

    def raise_error(self) -> None:
        raise InvalidArgumentError(f"the request is not a valid {self.type_name} message ({self.error})")


class OversizedRequest(MalformedRequest):
    """Stands in for a request too large to be a valid one: refused before any parsing."""

    __slots__ = ("nbytes", "limit")

    def __init__(self, type_name: str, nbytes: int, limit: int) -> None:
        super().__init__(type_name, ValueError("too large"))
        self.nbytes = nbytes
        self.limit = limit

    def raise_error(self) -> None:
        raise OutOfRangeError(
            f"the {self.type_name} message is {self.nbytes} bytes; requests of this server are at most "
            f"{self.limit} bytes (a prompt longer than the context length cannot be served)")


def _lenient_parser(message_type: Any, max_bytes: Callable[[], int | None] = lambda: None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        limit = max_bytes()
        if limit is not None and len(data) > limit:
            # Checked on the raw bytes: parsing millions of ids would hold the event loop for seconds.
            return OversizedRequest(message_type.DESCRIPTOR.full_name, len(data), limit)
        try:
            return message_type.FromString(data)
        except Exception as e:  # noqa: BLE001 - any parse failure is the client's
            return MalformedRequest(message_type.DESCRIPTOR.full_name, e)

    return parse


def add_to_server(servicer: RolloutServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_RolloutServicer_to_server``, but with request
    parsers that turn undecodable bytes into INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["Rollout"]
    handlers = {}
    for method in service.methods:
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(
                getattr(pb, method.input_type.name),
                servicer.max_generate_bytes if method.name == "Generate" else lambda: None),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _status_of(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, RolloutError):
        return convert.status_code(err), clip_message(err.message)
    logger.exception("%s failed", method)
    return grpc.StatusCode.INTERNAL, clip_message(f"{type(err).__name__}: {err}")


def _unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Map errors of a unary handler to statuses."""

    @functools.wraps(fn)
    async def handler(self: RolloutServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, MalformedRequest):
                request.raise_error()
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, the server lives on
            code, message = _status_of(e, fn.__name__)
        await context.abort(code, message)

    return handler


def _streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Map errors of a server-streaming handler to statuses."""

    @functools.wraps(fn)
    async def handler(
        self: RolloutServicer, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        responses = fn(self, request, context)
        try:
            if isinstance(request, MalformedRequest):
                request.raise_error()
            async for response in responses:
                yield response
            return
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            code, message = _status_of(e, fn.__name__)
        finally:
            # Runs on cancellation too: closing the inner generator aborts its engine request.
            await responses.aclose()
        await context.abort(code, message)

    return handler


class RolloutServicer(rollout_pb2_grpc.RolloutServicer):
    """Serves ``rollout.v1.Rollout`` once ``attach`` gives it a loaded engine.

    Before that (model still loading) and after ``begin_shutdown`` the RPCs answer UNAVAILABLE.
    With ``enable_control=False`` pause/continue/flush, the weight and memory RPCs and RebalanceExperts
    answer PERMISSION_DENIED; Generate, Abort and GetInfo stay available.
    """

    def __init__(self, *, enable_control: bool = True) -> None:
        self._engine: EngineClient | None = None
        self._enable_control = enable_control
        self._shutting_down = False

    def max_generate_bytes(self) -> int | None:
        """The largest GenerateRequest that can hold a servable prompt (None until a model is loaded):
        ids of at most the context length, or text of at most ``MAX_TEXT_BYTES_PER_TOKEN`` a token."""
        if self._engine is None:
            return None
        return GENERATE_OVERHEAD_BYTES + self._engine.limits.context_length * MAX_TEXT_BYTES_PER_TOKEN

    def attach(self, engine: EngineClient) -> None:
        """Start serving with this engine."""
        self._engine = engine

    def begin_shutdown(self) -> None:
        """Refuse new generations from now on (running ones continue until aborted)."""
        self._shutting_down = True

    def _engine_or_raise(self) -> EngineClient:
        if self._engine is None:
            raise EngineDeadError("the engine is still loading; retry when health is SERVING")
        return self._engine

    def _control_engine(self, rpc: str) -> EngineClient:
        if not self._enable_control:
            raise PermissionDeniedError(f"{rpc} is disabled on this server (started with --disable-control)")
        return self._engine_or_raise()

    # ------------------------------------------------------------------ generation
    @_streaming
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = self._engine_or_raise()
        if self._shutting_down:
            raise EngineDeadError("the server is shutting down")
        rid = request.request_id or uuid.uuid4().hex
        add = convert.add_request_from_proto(request, rid, engine.limits, engine.tokenizer)
        want_text = request.return_text or bool(request.text) or bool(request.messages_json)
        if want_text and engine.tokenizer is None:
            raise InvalidArgumentError("the model has no tokenizer.json to decode with", field="return_text")
        # Streamed chunks carry the text they add; each sample's last chunk also its whole text.
        deltas = TextDeltas(engine.tokenizer) if want_text else None
        async for chunk in engine.astream(add):
            text = None
            if deltas is not None:
                sample = deltas.add(chunk)
                if chunk.finished:
                    text = sample.text
                if not add.stream:  # one chunk per sample: its delta would repeat the text
                    chunk.text = None
            yield convert.chunk_to_proto(chunk, text)

    @_unary
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        engine = self._engine_or_raise()
        engine.abort(convert.abort_ids_from_proto(request))
        return pb.AbortResponse()

    # ------------------------------------------------------------------ control
    @_unary
    async def PauseGeneration(
        self, request: pb.PauseGenerationRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseGenerationResponse:
        engine = self._control_engine("PauseGeneration")
        mode = convert.pause_mode_from_proto(request.mode)
        await engine.acall(Pause(mode))
        # Chunks the pause flushed (the step in flight) are written before this reply, so no token
        # reaches a client after its pause returned.
        await engine.quiesce()
        return pb.PauseGenerationResponse()

    @_unary
    async def ContinueGeneration(
        self, request: pb.ContinueGenerationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContinueGenerationResponse:
        await self._control_engine("ContinueGeneration").acall(Continue())
        return pb.ContinueGenerationResponse()

    @_unary
    async def FlushCache(
        self, request: pb.FlushCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.FlushCacheResponse:
        await self._control_engine("FlushCache").acall(FlushCache())
        return pb.FlushCacheResponse()

    @_unary
    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetInfoResponse:
        info = await self._engine_or_raise().acall(GetInfo())
        return convert.info_to_proto(info)

    # ------------------------------------------------------------------ weights and memory
    async def _weights_call(self, rpc: str, command: ControlCommand) -> pb.UpdateWeightsResponse:
        return convert_weights.update_result_to_proto(await self._control_engine(rpc).acall(command))

    @_unary
    async def InitWeightUpdateGroup(
        self, request: pb.InitWeightUpdateGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.WeightGroupResponse:
        command = convert_weights.init_group_from_proto(request)
        name = await self._control_engine("InitWeightUpdateGroup").acall(command)
        return pb.WeightGroupResponse(group_name=str(name))

    @_unary
    async def DestroyWeightUpdateGroup(
        self, request: pb.DestroyWeightUpdateGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.WeightGroupResponse:
        name = await self._control_engine("DestroyWeightUpdateGroup").acall(
            convert_weights.destroy_group_from_proto(request))
        return pb.WeightGroupResponse(group_name=str(name))

    @_unary
    async def UpdateWeightsFromDistributed(
        self, request: pb.UpdateWeightsFromDistributedRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        return await self._weights_call("UpdateWeightsFromDistributed", convert_weights.distributed_from_proto(request))

    @_unary
    async def UpdateWeightsFromTensor(
        self, request: pb.UpdateWeightsFromTensorRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        return await self._weights_call("UpdateWeightsFromTensor", convert_weights.tensor_from_proto(request))

    @_unary
    async def UpdateWeightsFromDisk(
        self, request: pb.UpdateWeightsFromDiskRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateWeightsResponse:
        return await self._weights_call("UpdateWeightsFromDisk", convert_weights.disk_from_proto(request))

    @_unary
    async def ReleaseMemory(
        self, request: pb.ReleaseMemoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemoryResponse:
        states = await self._control_engine("ReleaseMemory").acall(ReleaseMemory(tuple(request.tags)))
        return convert.memory_to_proto(states)

    @_unary
    async def ResumeMemory(
        self, request: pb.ResumeMemoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.MemoryResponse:
        states = await self._control_engine("ResumeMemory").acall(ResumeMemory(tuple(request.tags)))
        return convert.memory_to_proto(states)

    # ------------------------------------------------------------------ experts
    @_unary
    async def RebalanceExperts(
        self, request: pb.RebalanceExpertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RebalanceExpertsResponse:
        report = await self._control_engine("RebalanceExperts").acall(RebalanceExperts())
        return convert.rebalance_to_proto(report)
