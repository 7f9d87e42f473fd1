"""Proto <-> rollout.types conversion at the gRPC edge."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from protos import rollout_pb2 as pb
from rollout import errors
from rollout.engine.request_validation import RequestLimits
from rollout.server import convert
from rollout.types import EngineInfo, FinishReason, PauseMode, SamplingParams, StreamChunk, TopLogprobs

LIMITS = RequestLimits(vocab_size=100, context_length=256, max_total_tokens=1000)


def test_unset_sampling_fields_take_engine_defaults():
    assert convert.sampling_from_proto(None) == SamplingParams()
    assert convert.sampling_from_proto(pb.SamplingParams()) == SamplingParams()
    # Explicit zeros are kept, not mistaken for "unset".
    sp = convert.sampling_from_proto(pb.SamplingParams(temperature=0.0, top_k=0, seed=0))
    assert sp.temperature == 0.0 and sp.top_k == 0 and sp.seed == 0
    assert sp.top_p == 1.0 and sp.max_new_tokens == SamplingParams().max_new_tokens and sp.n == 1


def test_sampling_round_trip_keeps_every_field():
    sp = SamplingParams(
        temperature=0.6,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        max_new_tokens=7,
        min_new_tokens=2,
        stop=("\n\n", "END"),
        stop_token_ids=(3, 4),
        ignore_eos=True,
        seed=1234,
        n=8,
    )
    msg = convert.sampling_to_proto(sp)
    assert convert.sampling_from_proto(pb.SamplingParams.FromString(msg.SerializeToString())) == sp
    # Doubles on the wire: 0.6 stays exactly 0.6 (a float32 field would give 0.6000000238).
    assert msg.temperature == 0.6


def test_sampling_to_proto_sends_only_non_defaults_and_checks_dicts():
    msg = convert.sampling_to_proto({"max_new_tokens": 5})
    assert msg.HasField("max_new_tokens") and not msg.HasField("temperature") and not msg.HasField("seed")
    with pytest.raises(errors.InvalidArgumentError, match="max_tokens"):
        convert.sampling_to_proto({"max_tokens": 5})


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_sampling_values_name_the_field(fields, name):
    with pytest.raises(errors.InvalidArgumentError) as info:
        convert.sampling_from_proto(pb.SamplingParams(**fields))
    assert info.value.field == name


def test_add_request_from_proto():
    msg = convert.generate_request_to_proto(
        [5, 6, 7],
        SamplingParams(max_new_tokens=3, n=2),
        request_id="r1",
        return_logprob=True,
        top_logprobs_num=2,
        stream=False,
    )
    req = convert.add_request_from_proto(msg, "r1", LIMITS, None)
    assert req.request_id == "r1" and req.input_ids == [5, 6, 7]
    assert req.sampling.n == 2 and req.sampling.max_new_tokens == 3
    assert req.return_logprob and not req.return_raw_logprob and req.top_logprobs_num == 2 and not req.stream
    # Unset `stream` means streaming.
    req = convert.add_request_from_proto(pb.GenerateRequest(input_ids=[1]), "r2", LIMITS, None)
    assert req.stream and req.sampling == SamplingParams()


@pytest.mark.parametrize(
    "msg, error, field",
    [
        (pb.GenerateRequest(), errors.InvalidArgumentError, "input_ids"),
        (pb.GenerateRequest(input_ids=[1, 100]), errors.InvalidArgumentError, "input_ids"),
        (pb.GenerateRequest(input_ids=[-1]), errors.InvalidArgumentError, "input_ids"),
        (
            pb.GenerateRequest(input_ids=[1], sampling_params=pb.SamplingParams(max_new_tokens=256)),
            errors.OutOfRangeError,
            "max_new_tokens",
        ),
        (pb.GenerateRequest(text="hello"), errors.InvalidArgumentError, "text"),  # no tokenizer
    ],
)
def test_bad_generate_requests(msg, error, field):
    with pytest.raises(error) as info:
        convert.add_request_from_proto(msg, "r", LIMITS, None)
    assert info.value.field == field


def test_generate_request_rejects_non_int_prompt():
    with pytest.raises(errors.InvalidArgumentError, match="prompt"):
        convert.generate_request_to_proto([1.5])
    msg = convert.generate_request_to_proto("hi there")
    assert msg.text == "hi there" and not msg.input_ids


def test_chunk_round_trip():
    chunk = StreamChunk(
        request_id="r",
        index=3,
        token_ids=[1, 2],
        logprobs=[-0.5, -1.25],
        raw_logprobs=[-0.75, -2.0],
        top_logprobs=[TopLogprobs([1, 9], [-0.5, -1.0]), TopLogprobs([2, 8], [-0.25, -3.0])],
        weight_versions=[4, 5],
        finished=True,
        finish_reason=FinishReason.STOP,
        matched_stop=2,
        prompt_tokens=10,
        completion_tokens=12,
        cached_tokens=9,
    )
    msg = pb.GenerateResponse.FromString(convert.chunk_to_proto(chunk, "text!").SerializeToString())
    assert msg.text == "text!"
    back = convert.chunk_from_proto(msg, logprobs=True, raw_logprobs=True, top_logprobs=True)
    assert back == chunk
    # Lists the request did not ask for come back as None, not [].
    plain = convert.chunk_from_proto(msg)
    assert plain.logprobs is None and plain.raw_logprobs is None and plain.top_logprobs is None


def test_matched_stop_oneof_and_unfinished_chunks():
    msg = convert.chunk_to_proto(
        StreamChunk("r", 0, [7], finished=True, finish_reason=FinishReason.STOP, matched_stop="END")
    )
    assert msg.WhichOneof("matched_stop") == "matched_stop_str"
    assert convert.chunk_from_proto(msg).matched_stop == "END"
    msg = convert.chunk_to_proto(StreamChunk("r", 0, [7]))
    assert msg.WhichOneof("matched_stop") is None and msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    back = convert.chunk_from_proto(msg)
    assert back.finish_reason is None and back.matched_stop is None and not back.finished


def test_unknown_enum_values_are_invalid_argument():
    for reason in FinishReason:
        assert convert.finish_reason_from_proto(convert.finish_reason_to_proto(reason)) is reason
    with pytest.raises(errors.InvalidArgumentError, match="finish_reason"):
        convert.finish_reason_from_proto(17)
    for mode in PauseMode:
        assert convert.pause_mode_from_proto(convert.pause_mode_to_proto(mode)) is mode
        assert convert.pause_mode_to_proto(mode.value) == convert.pause_mode_to_proto(mode)
    # An unset mode (UNSPECIFIED, the proto default) means ABORT; an unknown number is refused.
    assert convert.pause_mode_from_proto(pb.PAUSE_MODE_UNSPECIFIED) is PauseMode.ABORT
    assert convert.pause_mode_from_proto(pb.PauseGenerationRequest().mode) is PauseMode.ABORT
    with pytest.raises(errors.InvalidArgumentError) as info:
        convert.pause_mode_from_proto(42)
    assert info.value.field == "mode"
    with pytest.raises(errors.InvalidArgumentError):
        convert.pause_mode_to_proto("later")
    # An unknown number survives the wire (open enums) and is rejected by the converter.
    wire = pb.PauseGenerationRequest.FromString(pb.PauseGenerationRequest(mode=42).SerializeToString())
    with pytest.raises(errors.InvalidArgumentError):
        convert.pause_mode_from_proto(wire.mode)


def test_abort_ids():
    assert convert.abort_ids_from_proto(pb.AbortRequest(all=True)) is None
    assert convert.abort_ids_from_proto(pb.AbortRequest(request_ids=["a", "b"])) == ["a", "b"]
    for bad in (pb.AbortRequest(), pb.AbortRequest(request_ids=["a"], all=True)):
        with pytest.raises(errors.InvalidArgumentError):
            convert.abort_ids_from_proto(bad)


def test_info_round_trip():
    info = EngineInfo(
        model_path="/m",
        architecture="Qwen3ForCausalLM",
        context_length=4096,
        vocab_size=512,
        weight_version=3,
        weights_valid=True,
        paused=True,
        pause_mode="in_place",
        num_waiting=1,
        num_running=2,
        num_paused=2,
        kv_total_tokens=10000,
        kv_used_tokens=40,
        kv_cached_tokens=7,
        page_size=1,
        num_retractions=5,
        device="cpu",
        dtype="float32",
        memory={"weights": {"state": "active", "bytes": 123, "backup": True}},
        version="0.1.0",
        deterministic=True,
        spec_drafted=40,
        spec_accepted=31,
        spec_verified=11,
    )
    msg = pb.GetInfoResponse.FromString(convert.info_to_proto(info).SerializeToString())
    assert convert.info_from_proto(msg) == info
    info.paused, info.pause_mode, info.num_paused = False, None, 0
    assert convert.info_from_proto(convert.info_to_proto(info)) == info


def test_error_codes_map_both_ways():
    cases = [
        (errors.InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.OutOfRangeError("x"), grpc.StatusCode.OUT_OF_RANGE),
        (errors.ResourceExhaustedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.FailedPreconditionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (errors.UnimplementedError("x"), grpc.StatusCode.UNIMPLEMENTED),
        (errors.EngineDeadError("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.InternalError("x"), grpc.StatusCode.INTERNAL),
        (errors.UnauthenticatedError("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDeniedError("x"), grpc.StatusCode.PERMISSION_DENIED),
    ]
    for err, status in cases:
        assert convert.status_code(err) is status
        back = convert.error_from_status(status, "the message")
        assert type(back) is type(err) and back.message == "the message" and back.code == status.name
    # Statuses without a subclass keep their name.
    err = convert.error_from_status(grpc.StatusCode.DATA_LOSS, "lost")
    assert type(err) is errors.RolloutError and err.code == "DATA_LOSS"
    assert convert.status_code(err) is grpc.StatusCode.DATA_LOSS


def test_routed_experts_travel_as_little_endian_int16_bytes_and_shape():
    rows = np.array([[[3, 300], [7, 1]], [[32767, 0], [5, 2]]], dtype=np.int16)  # (2 tokens, 2 layers, k=2)
    chunk = StreamChunk(request_id="r", index=0, token_ids=[4, 5], weight_versions=[1, 1], routed_experts=rows,
                        prompt_routed_experts=rows[:0])
    msg = pb.GenerateResponse.FromString(convert.chunk_to_proto(chunk).SerializeToString())
    assert msg.routed_experts.dtype == "int16" and list(msg.routed_experts.shape) == [2, 2, 2]
    assert msg.routed_experts.data == rows.astype("<i2").tobytes()  # little-endian whatever the host
    back = convert.chunk_from_proto(msg, routed_experts=True)
    np.testing.assert_array_equal(back.routed_experts, rows)
    assert back.prompt_routed_experts.shape == (0, 2, 2)
    assert convert.chunk_from_proto(msg).routed_experts is None  # not asked for: not decoded
    plain = pb.GenerateResponse.FromString(convert.chunk_to_proto(StreamChunk("r", 0, [4])).SerializeToString())
    assert not plain.HasField("routed_experts") and not plain.HasField("prompt_routed_experts")
    assert convert.generate_request_to_proto([1, 2], return_routed_experts=True).return_routed_experts


@pytest.mark.parametrize("data, shape, dtype, why", [
    (b"\x00" * 6, [2, 2], "int16", "bytes do not hold"),
    (b"\x00" * 8, [2, 2], "uint7", "unknown dtype"),
    (b"", [-1], "int16", "bytes do not hold"),
])
def test_bad_routed_expert_arrays_are_refused(data, shape, dtype, why):
    msg = pb.GenerateResponse(routed_experts=pb.IntArray(data=data, shape=shape, dtype=dtype))
    with pytest.raises(errors.InvalidArgumentError, match=why) as e:
        convert.chunk_from_proto(msg, routed_experts=True)
    assert e.value.field == "routed_experts"


def test_weight_update_swap_flag_and_result_round_trip():
    from rollout.server import client_calls
    from rollout.server import convert_weights as cw
    from rollout.types import SwapResult

    layout = dict(names=["a"], dtypes=["float32"], shapes=[[2]])
    assert cw.distributed_from_proto(cw.distributed_to_proto(**layout, swap=True)).swap is True
    assert cw.distributed_from_proto(cw.distributed_to_proto(**layout)).swap is False
    src = {"shared_memory": {"name": "seg", "offset": 0, "size": 8}}
    assert cw.tensor_from_proto(cw.tensor_to_proto(**layout, sources=[src], swap=True)).swap is True
    assert cw.disk_from_proto(client_calls.from_disk_request("/ckpt", 3, swap=True)).swap is True
    with pytest.raises(errors.InvalidArgumentError, match="swap"):
        cw.distributed_to_proto(**layout, swap="yes")
    result = SwapResult(4, swapped=False, note="no room")
    assert cw.update_result_from_proto(cw.update_result_to_proto(result), swap=True) == result
    assert cw.update_result_from_proto(cw.update_result_to_proto(7), swap=False) == 7


def test_rebalance_report_round_trip_keeps_every_field():
    from dataclasses import asdict

    from rollout.control.experts import RebalanceReport

    report = asdict(RebalanceReport(balancedness_before=0.625, balancedness_after=0.96875, moved=5, tokens=123))
    assert convert.rebalance_from_proto(convert.rebalance_to_proto(report)) == report
