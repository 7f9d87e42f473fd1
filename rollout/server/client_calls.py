"""Wire-level pieces shared by the sync and asyncio clients (``rollout/client.py``): channel
credentials, building requests, reading Generate responses back into ``rollout.types``."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2

from protos import rollout_pb2 as pb
from rollout.engine.output_assembly import OutputAssembler
from rollout.errors import EngineDeadError, InvalidArgumentError, RolloutError, UnavailableError
from rollout.server import convert
from rollout.types import ChatPrompt, GenerateOutput, SamplingParams, StreamChunk, as_sampling_params

Messages = Sequence[Mapping[str, Any]] | None
# Token ids, text, or a chat: a ``ChatPrompt`` or a list of message dicts.
Prompt = Sequence[int] | str | ChatPrompt | Sequence[Mapping[str, Any]]
Sampling = SamplingParams | Mapping[str, Any] | None
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# How long a call that failed with UNAVAILABLE waits for its channel to be connected before the client
# reports the server unreachable. A server that sent the status is connected already, so this only
# delays the report of an address where nothing answers (which gRPC itself would retry for 20 s).
CONNECT_PROBE_S = 0.5
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
# A call whose connection has been silent this long pings the server, and a ping unanswered this long
# fails the call with UNAVAILABLE: a server that froze or vanished without closing the connection (a
# stopped process, a lost host) cannot hang a stream that has no deadline. The server accepts pings
# this often (``rollout/server/app.py``); the floor keeps clients at or above what it accepts.
KEEPALIVE_S = 20.0
MIN_KEEPALIVE_S = 1.0

SERVING = health_pb2.HealthCheckResponse.SERVING
DEFAULT_GROUP = "weight_update"  # the group name the clients use when none is given


class GenerateCall:
    """One prepared Generate call: the request (with a client-chosen id) and how to read it back."""

    def __init__(self, prompt: Prompt, sampling_params: Sampling, *, request_id: str | None = None,
                 return_logprob: bool = False, return_raw_logprob: bool = False, top_logprobs_num: int = 0,
                 return_text: bool = False, stream: bool = True, return_routed_experts: bool = False) -> None:
        sampling_params = as_sampling_params(sampling_params)
        self.request_id = request_id or uuid.uuid4().hex  # known up front, so the caller can abort it
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], Mapping):
            prompt = ChatPrompt(prompt)
        self.want_text = return_text or isinstance(prompt, (str, ChatPrompt))
        self.flags = dict(logprobs=return_logprob, raw_logprobs=return_raw_logprob,
                          top_logprobs=top_logprobs_num > 0, routed_experts=return_routed_experts)
        self.request = convert.generate_request_to_proto(
            prompt, sampling_params, request_id=self.request_id, return_logprob=return_logprob,
            return_raw_logprob=return_raw_logprob, top_logprobs_num=top_logprobs_num, stream=stream,
            return_text=return_text, return_routed_experts=return_routed_experts)
        self.assembler = OutputAssembler(self.request_id, sampling_params.n, **self.flags)

    def chunk(self, msg: pb.GenerateResponse) -> StreamChunk:
        """One response as a ``StreamChunk`` (its ``text``: the text it adds, when text was asked for)."""
        return convert.chunk_from_proto(msg, **self.flags, text=self.want_text)

    def add(self, msg: pb.GenerateResponse) -> None:
        """Fold one response into the final outputs."""
        self.assembler.add(self.chunk(msg))
        if msg.finished and self.want_text:
            self.assembler.outputs[msg.index].text = msg.text

    def outputs(self) -> list[GenerateOutput]:
        """The finished outputs, in sample order (raises if the stream ended early)."""
        if self.assembler.left:
            raise EngineDeadError(f"the stream of {self.request_id} ended before all samples finished")
        return self.assembler.outputs


def resolve_prompt(prompt: Prompt | None, input_ids: Sequence[int] | None, text: str | None,
                   messages: Messages = None, tools: Messages = None) -> Prompt:
    """The one prompt given positionally or as ``input_ids=`` / ``text=`` / ``messages=`` (with
    ``tools``), like ``Engine.generate``."""
    given = [p for p in (prompt, input_ids, text, messages) if p is not None]
    if len(given) != 1:
        raise InvalidArgumentError("give exactly one prompt: token ids, text or messages", field="prompt")
    if tools is not None:
        if messages is None:
            raise InvalidArgumentError("tools go with messages", field="tools")
        return ChatPrompt(messages, tools)
    return ChatPrompt(messages) if messages is not None else given[0]


def rpc_error(e: grpc.RpcError, channel: grpc.Channel | None = None, target: str = "") -> RolloutError:
    """The typed error of a failed call; an UNAVAILABLE on a ``channel`` that cannot connect says so."""
    if channel is not None and e.code() == grpc.StatusCode.UNAVAILABLE and not connects(channel):
        return cannot_connect(target, e.details())
    return convert.error_from_status(e.code(), e.details())


async def async_rpc_error(e: grpc.aio.AioRpcError, channel: grpc.aio.Channel, target: str) -> RolloutError:
    """``rpc_error`` for the asyncio client."""
    if e.code() == grpc.StatusCode.UNAVAILABLE and not await async_connects(channel):
        return cannot_connect(target, e.details())
    return convert.error_from_status(e.code(), e.details())


def connects(channel: grpc.Channel, timeout: float = CONNECT_PROBE_S) -> bool:
    """Whether ``channel`` is connected, or connects within ``timeout`` s."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return False
    return True


async def async_connects(channel: grpc.aio.Channel, timeout: float = CONNECT_PROBE_S) -> bool:
    """``connects`` for an asyncio channel."""
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


def cannot_connect(target: str, details: str | None = None) -> UnavailableError:
    """The error of a call that found no server at ``target``."""
    return UnavailableError(f"UNAVAILABLE: cannot connect to {target}" + (f" ({details})" if details else ""))


def not_ready(target: str, timeout: float, connected: bool) -> UnavailableError:
    """The error of ``wait_ready`` when the server did not report SERVING within ``timeout`` s."""
    if not connected:
        return cannot_connect(target, f"no server answered within {timeout:g} s")
    return EngineDeadError(f"the server at {target} was not SERVING within {timeout:g} s")


def channel_credentials(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting the CA certificate at ``tls_ca`` (None: plaintext)."""
    if tls_ca is None:
        return None
    with open(tls_ca, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def channel_options(keepalive_s: float) -> list[tuple[str, Any]]:
    """The channel arguments of the clients, with pings after ``keepalive_s`` s of silence on a call."""
    if isinstance(keepalive_s, bool) or not isinstance(keepalive_s, (int, float)) or not (
            MIN_KEEPALIVE_S <= keepalive_s <= 3600):
        raise InvalidArgumentError(f"must be a number of seconds in [{MIN_KEEPALIVE_S:g}, 3600], got {keepalive_s!r}",
                                   field="keepalive_s")
    ms = int(keepalive_s * 1000)
    # gRPC waits for a keepalive ping's answer up to the ping timeout (a minute by default), not the
    # keepalive timeout alone: both are set. By default it also stops pinging after two pings without
    # data, which would leave a quiet stream (a paused engine) unguarded.
    return CHANNEL_OPTIONS + [("grpc.keepalive_time_ms", ms), ("grpc.keepalive_timeout_ms", ms),
                              ("grpc.http2.ping_timeout_ms", ms), ("grpc.http2.max_pings_without_data", 0)]


def open_channel(target: str, tls_ca: str | None, *, aio: bool, keepalive_s: float = KEEPALIVE_S) -> Any:
    """A channel to ``target`` (TLS trusting ``tls_ca`` when given), asyncio's when ``aio``."""
    options = channel_options(keepalive_s)
    creds = channel_credentials(tls_ca)
    mod: Any = grpc.aio if aio else grpc
    return (mod.secure_channel(target, creds, options) if creds
            else mod.insecure_channel(target, options))


def per_prompt(prompts: Sequence[Prompt], sampling_params: Sampling | Sequence[Sampling]) -> list[Sampling]:
    """One sampling setting per prompt, from one shared setting or a list."""
    if sampling_params is None or isinstance(sampling_params, (SamplingParams, Mapping)):
        return [sampling_params] * len(prompts)
    params = list(sampling_params)
    if len(params) != len(prompts):
        raise InvalidArgumentError(f"{len(params)} sampling params for {len(prompts)} prompts",
                                   field="sampling_params")
    return params


def abort_request(request_ids: Sequence[str] | str | None) -> pb.AbortRequest:
    """Abort these ids, or all requests when None."""
    if request_ids is None:
        return pb.AbortRequest(all=True)
    return pb.AbortRequest(request_ids=[request_ids] if isinstance(request_ids, str) else list(request_ids))


def _shapes(shapes: Sequence[Sequence[int]]) -> list[pb.TensorShape]:
    return [pb.TensorShape(dims=list(s)) for s in shapes]


def from_disk_request(model_path: str, version: int | None, swap: bool = False) -> pb.UpdateWeightsFromDiskRequest:
    """Reload from a checkpoint directory (version None: the server picks current + 1; ``swap``: without
    a pause, see ``UpdateWeightsFromDistributedRequest.swap``)."""
    if not isinstance(swap, bool):
        raise InvalidArgumentError(f"must be true or false, got {swap!r}", field="swap")
    msg = pb.UpdateWeightsFromDiskRequest(model_path=model_path, swap=swap)
    if version is not None:
        msg.version = version
    return msg


