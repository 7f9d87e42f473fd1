"""Chats and decoded text deltas over gRPC agree with the in-process engine."""

from __future__ import annotations

import grpc
import pytest

from protos import rollout_pb2 as pb
from protos import rollout_pb2_grpc
from rollout.errors import InvalidArgumentError
from rollout.types import SamplingParams

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "1+2? 🙂"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "3"},
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)


def test_messages_are_rendered_with_the_chat_template(client, engine):
    [ref] = engine.generate(messages=CHAT, tools=TOOLS, sampling_params=GREEDY)
    [out] = client.generate(messages=CHAT, tools=TOOLS, sampling_params=GREEDY)
    assert out.output_ids == ref.output_ids and out.prompt_tokens == ref.prompt_tokens
    assert out.text == ref.text  # a chat returns text, like a text prompt
    rendered = engine.tokenizer.apply_chat_template(CHAT, tools=TOOLS)
    assert out.prompt_tokens == len(engine.tokenizer.encode(rendered, add_special_tokens=False))
    # A list of message dicts as the prompt is a chat too; without tools the prompt differs.
    [plain] = client.generate(CHAT, GREEDY)
    assert plain.prompt_tokens < out.prompt_tokens


def test_stream_chunks_carry_the_text_they_add(client, engine):
    sp = SamplingParams(temperature=1.0, seed=7, max_new_tokens=24, ignore_eos=True, n=2)
    chunks = list(client.stream(messages=CHAT[:2], sampling_params=sp))
    outs = engine.generate(messages=CHAT[:2], sampling_params=sp)
    for ref in outs:
        mine = [c for c in chunks if c.index == ref.index]
        assert [t for c in mine for t in c.token_ids] == ref.output_ids
        assert all(c.text is not None for c in mine)
        assert "".join(c.text for c in mine) == ref.text
    # Token-id prompts stream without text unless asked.
    ids = engine.tokenizer.encode("The quick brown fox")
    assert all(c.text is None for c in client.stream(ids, GREEDY))


def test_bad_chats_are_invalid_arguments(server, token, client):
    stub = rollout_pb2_grpc.RolloutStub(grpc.insecure_channel(server.address))
    meta = (("authorization", f"Bearer {token}"),)
    for request, field in [
        (pb.GenerateRequest(messages_json="[{"), "messages_json"),
        (pb.GenerateRequest(messages_json='{"role": "user"}'), "messages_json"),
        (pb.GenerateRequest(messages_json='[{"content": "no role"}]'), "messages"),
        (pb.GenerateRequest(messages_json='[{"role": "user", "content": "x"}]', text="also text"), "input_ids"),
        (pb.GenerateRequest(text="x", tools_json="[]"), "messages_json"),
        (pb.GenerateRequest(messages_json='[{"role": "robot", "content": "x"}]'), "messages"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, metadata=meta, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert info.value.details().startswith(f"{field}:"), info.value.details()
    assert "unknown role robot" in info.value.details()
    with pytest.raises(InvalidArgumentError, match="tools go with messages"):
        client.generate("text", tools=TOOLS)
