"""Routed experts over gRPC: the int16 bytes and shape decode to Hugging Face's router top-k."""

from __future__ import annotations

import numpy as np
import pytest

from protos import rollout_pb2 as pb
from protos import rollout_pb2_grpc
from rollout.errors import FailedPreconditionError, InvalidArgumentError
from rollout.server import client_calls as calls
from tests.hf_oracle import hf_routed_experts
from tests.waiting import WAIT_S, DeadlineClient

PROMPT = [7, 21, 3, 90, 41, 8, 13, 200, 5]
MOE = dict(num_experts=8, num_experts_per_tok=3)  # Qwen3-MoE, 2 sparse layers


@pytest.fixture(scope="module")
def moe_server(start_server, tiny_model_dir):
    path = tiny_model_dir("qwen3_moe", **MOE)
    return path, start_server("--model", path, "--enable-return-routed-experts")


def test_generate_and_stream_decode_to_the_router_top_k(moe_server) -> None:
    path, server = moe_server
    with DeadlineClient(server.address) as client:
        sp = {"temperature": 0.0, "max_new_tokens": 6}
        out = client.generate(PROMPT, sp, return_routed_experts=True)[0]
        ref = hf_routed_experts(path, PROMPT + out.output_ids[:-1])  # (P + n - 1, 2 layers, 3)
        assert out.prompt_routed_experts.shape == (len(PROMPT) - 1, 2, 3)
        assert out.routed_experts.shape == (len(out.output_ids), 2, 3) and out.routed_experts.dtype == np.int16
        np.testing.assert_array_equal(np.concatenate([out.prompt_routed_experts, out.routed_experts]), ref)
        # Streamed: every chunk carries the rows of its tokens; the prompt's come once.
        chunks = list(client.stream(PROMPT, sp, return_routed_experts=True))
        assert [c.routed_experts.shape[0] for c in chunks] == [len(c.token_ids) for c in chunks]
        prompt_rows = [c.prompt_routed_experts for c in chunks if c.prompt_routed_experts is not None]
        assert len(prompt_rows) == 1
        np.testing.assert_array_equal(np.concatenate([prompt_rows[0], *(c.routed_experts for c in chunks)]), ref)
        assert client.generate(PROMPT, sp)[0].routed_experts is None  # not asked


def test_raw_response_is_little_endian_int16_bytes(moe_server) -> None:
    path, server = moe_server
    call = calls.GenerateCall(PROMPT, {"temperature": 0.0, "max_new_tokens": 3}, stream=False,
                              return_routed_experts=True)
    with calls.open_channel(server.address, None, aio=False) as channel:
        [msg] = list(rollout_pb2_grpc.RolloutStub(channel).Generate(call.request, timeout=WAIT_S))
    assert isinstance(msg, pb.GenerateResponse)
    arr = msg.routed_experts
    assert arr.dtype == "int16" and list(arr.shape) == [len(msg.token_ids), 2, 3]
    rows = np.frombuffer(arr.data, dtype="<i2").reshape(tuple(arr.shape))
    np.testing.assert_array_equal(rows, hf_routed_experts(path, PROMPT + list(msg.token_ids[:-1]))[len(PROMPT) - 1:])


def test_dense_server_refuses(client) -> None:
    with pytest.raises(InvalidArgumentError, match="no MoE layers"):
        client.generate([1, 2, 3], {"max_new_tokens": 2}, return_routed_experts=True)


def test_rebalance_on_one_rank_says_to_serve_with_ep_size(moe_server) -> None:
    _, server = moe_server
    with DeadlineClient(server.address) as client, pytest.raises(FailedPreconditionError, match="--ep-size N"):
        client.rebalance_experts()
