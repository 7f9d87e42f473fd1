"""Bad requests get the right status and a clear message, and never hurt the server."""

from __future__ import annotations

import asyncio
import math
import socket

import grpc
import pytest

from protos import rollout_pb2 as pb
from protos import rollout_pb2_grpc
from rollout.client import AsyncRolloutClient, RolloutClient
from rollout.errors import EngineDeadError, RolloutError, UnavailableError
from rollout.types import SamplingParams

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _gen(ids=(1, 2, 3), **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(input_ids=list(ids), sampling_params=pb.SamplingParams(**sampling))


# (name, rpc, request, status, words the message must contain)
BAD_REQUESTS = [
    ("empty prompt", "Generate", pb.GenerateRequest(), INVALID, ["input_ids", "empty"]),
    ("id beyond vocab", "Generate", _gen((1, 384)), INVALID, ["input_ids", "384", "vocabulary"]),
    ("negative id", "Generate", _gen((-5,)), INVALID, ["input_ids", "-5"]),
    (
        "ids and text",
        "Generate",
        pb.GenerateRequest(input_ids=[1], text="hi"),
        INVALID,
        ["input_ids", "text"],
    ),
    ("nan temperature", "Generate", _gen(temperature=math.nan), INVALID, ["temperature", "finite"]),
    ("negative temperature", "Generate", _gen(temperature=-1.0), INVALID, ["temperature", ">= 0"]),
    ("top_p zero", "Generate", _gen(top_p=0.0), INVALID, ["top_p"]),
    ("top_p above one", "Generate", _gen(top_p=1.5), INVALID, ["top_p"]),
    ("n zero", "Generate", _gen(n=0), INVALID, ["n:"]),
    ("top_k below -1", "Generate", _gen(top_k=-7), INVALID, ["top_k"]),
    ("stop id beyond vocab", "Generate", _gen(stop_token_ids=[999]), INVALID, ["stop_token_ids"]),
    (
        "too many top logprobs",
        "Generate",
        pb.GenerateRequest(input_ids=[1], top_logprobs_num=1000),
        INVALID,
        ["top_logprobs_num"],
    ),
    (
        "over context",
        "Generate",
        _gen(range(10), max_new_tokens=2045),
        grpc.StatusCode.OUT_OF_RANGE,
        ["max_new_tokens", "2055", "context length 2048"],
    ),
    ("unknown pause mode", "PauseGeneration", pb.PauseGenerationRequest(mode=42), INVALID, ["mode", "42"]),
    ("abort of nothing", "Abort", pb.AbortRequest(), INVALID, ["request_ids"]),
    (
        "weights from a missing directory",
        "UpdateWeightsFromDisk",
        pb.UpdateWeightsFromDiskRequest(model_path="/nonexistent/ckpt"),
        INVALID,
        ["model_path", "/nonexistent/ckpt"],
    ),
    ("weights from no path", "UpdateWeightsFromDisk", pb.UpdateWeightsFromDiskRequest(), INVALID, ["model_path"]),
    ("unknown memory tag", "ReleaseMemory", pb.ReleaseMemoryRequest(tags=["optimizer"]), INVALID, ["optimizer"]),
    (
        "update over a group never formed",
        "UpdateWeightsFromDistributed",
        pb.UpdateWeightsFromDistributedRequest(group_name="nope", names=["model.norm.weight"], dtypes=["float32"],
                                               shapes=[pb.TensorShape(dims=[64])]),
        grpc.StatusCode.NOT_FOUND,
        ["nope"],
    ),
]


def _call(stub, rpc: str, request, metadata):
    result = getattr(stub, rpc)(request, metadata=metadata, timeout=30)
    return list(result) if rpc == "Generate" else result


@pytest.fixture(scope="module")
def raw(server, token):
    """A bare stub (no client-side checks) and the auth metadata."""
    channel = grpc.insecure_channel(server.address)
    yield rollout_pb2_grpc.RolloutStub(channel), (("authorization", f"Bearer {token}"),), channel
    channel.close()


@pytest.mark.parametrize(
    "name, rpc, request_msg, status, words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_status_and_message(raw, name, rpc, request_msg, status, words):
    stub, metadata, _ = raw
    with pytest.raises(grpc.RpcError) as info:
        _call(stub, rpc, request_msg, metadata)
    assert info.value.code() == status, info.value.details()
    for word in words:
        assert word in info.value.details(), info.value.details()


def test_unauthenticated_without_or_with_wrong_token(server, raw):
    stub, _, _ = raw
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "e2e-secret-token"),)):
        for rpc, req in (
            ("Generate", _gen()),
            ("GetInfo", pb.GetInfoRequest()),
            ("Abort", pb.AbortRequest(all=True)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                _call(stub, rpc, req, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "auth token" in info.value.details()
    with RolloutClient(server.address) as anonymous, pytest.raises(RolloutError) as err:
        anonymous.get_info()
    assert err.value.code == "UNAUTHENTICATED"


def test_undecodable_bytes_are_invalid_argument(raw):
    _, metadata, channel = raw
    for rpc, streaming in (("Generate", True), ("GetInfo", False), ("PauseGeneration", False)):
        method = (channel.unary_stream if streaming else channel.unary_unary)(f"/rollout.v1.Rollout/{rpc}")
        with pytest.raises(grpc.RpcError) as info:
            result = method(b"\xff\xff\xff\x0f", metadata=metadata, timeout=30)
            if streaming:
                list(result)
        assert info.value.code() == INVALID
        assert "not a valid rollout.v1." in info.value.details()


def test_client_surfaces_typed_errors(client):
    with pytest.raises(RolloutError) as info:
        client.generate([1, 2], {"max_new_tokens": 4000})
    assert info.value.code == "OUT_OF_RANGE" and "context length" in str(info.value)
    with pytest.raises(RolloutError) as info:
        client.generate([], {})
    assert info.value.code == "INVALID_ARGUMENT" and "input_ids" in str(info.value)


def test_server_survives_1000_malformed_requests(server, raw, client, engine, idle):
    stub, metadata, channel = raw
    # Bytes that are not a GenerateRequest at all, sent on the Generate method.
    garbage = channel.unary_stream(
        "/rollout.v1.Rollout/Generate", request_serializer=None, response_deserializer=None
    )
    codes: dict[grpc.StatusCode, int] = {}
    for i in range(1000):
        with pytest.raises(grpc.RpcError) as info:
            if i % 10 == 9:
                list(garbage(b"\xff\xff\xff\x0f" + bytes([i % 256]) * 5, metadata=metadata, timeout=30))
            else:
                _, rpc, req, _, _ = BAD_REQUESTS[i % len(BAD_REQUESTS)]
                _call(stub, rpc, req, metadata)
        codes[info.value.code()] = codes.get(info.value.code(), 0) + 1
    assert INVALID in codes and set(codes) <= {INVALID, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND}, codes
    assert client.health()
    idle()
    sp = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    [expected] = engine.generate(input_ids=[4, 5, 6, 7], sampling_params=sp)
    [got] = client.generate([4, 5, 6, 7], sp)
    assert got.output_ids == expected.output_ids


HUGE = "x" * 100_000
# (name, rpc, request, status): each request carries a 100 KB value that the error message quotes.
HUGE_VALUES = [
    ("memory tag", "ReleaseMemory", pb.ReleaseMemoryRequest(tags=[HUGE]), INVALID),
    ("resume tag", "ResumeMemory", pb.ResumeMemoryRequest(tags=["weights", HUGE]), INVALID),
    ("group name", "DestroyWeightUpdateGroup", pb.DestroyWeightUpdateGroupRequest(group_name=HUGE),
     grpc.StatusCode.NOT_FOUND),
    ("checkpoint path", "UpdateWeightsFromDisk", pb.UpdateWeightsFromDiskRequest(model_path="/" + HUGE), INVALID),
]


@pytest.mark.parametrize("name, rpc, request_msg, status", HUGE_VALUES, ids=[h[0] for h in HUGE_VALUES])
def test_huge_values_are_echoed_short(raw, name, rpc, request_msg, status):
    stub, metadata, _ = raw
    with pytest.raises(grpc.RpcError) as info:
        _call(stub, rpc, request_msg, metadata)
    details = info.value.details()
    assert info.value.code() == status, details[:300]
    assert len(details) < 400 and "xxxx" in details and "more chars]" in details, details[:300]


def _dead_address() -> str:
    """An address where nothing listens: a port the OS just handed out, closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _assert_cannot_connect(err: RolloutError, address: str) -> None:
    assert isinstance(err, UnavailableError) and not isinstance(err, EngineDeadError), repr(err)
    assert err.code == "UNAVAILABLE"
    assert f"UNAVAILABLE: cannot connect to {address}" in str(err), str(err)


def test_clients_of_an_address_where_nothing_listens():
    address = _dead_address()
    with RolloutClient(address, timeout=10) as c:
        for call in (c.get_info, lambda: list(c.stream([1, 2, 3])), lambda: c.wait_ready(timeout=0.5)):
            with pytest.raises(RolloutError) as info:
                call()
            _assert_cannot_connect(info.value, address)

    async def run_async() -> None:
        async with AsyncRolloutClient(address, timeout=10) as c:
            for call in (lambda: c.generate([1, 2, 3]), lambda: c.wait_ready(timeout=0.5)):
                with pytest.raises(RolloutError) as info:
                    await call()
                _assert_cannot_connect(info.value, address)
            with pytest.raises(RolloutError) as info:
                async for _ in c.stream([1, 2, 3]):
                    pass
            _assert_cannot_connect(info.value, address)

    asyncio.run(run_async())

