"""The OpenAI-compatible HTTP front end, driven by the real ``openai`` client, agrees with the engine."""

from __future__ import annotations

import httpx
import openai
import pytest

from rollout.types import SamplingParams
from tests.e2e.conftest import SERVED_MODEL, TOKEN

STOP_PROMPT = "Write a short story about a robot"
CHAT = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 1+2? 🙂"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add a and b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    # No retries: an error status must reach the test as it came.
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c


def _greedy(n: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, **kw)


def test_models_lists_the_served_model(oai, engine):
    [card] = oai.models.list().data
    assert card.id == SERVED_MODEL and card.model_extra["max_model_len"] == engine.limits.context_length


def test_completion_matches_the_engine_with_token_ids_logprobs_and_versions(oai, engine):
    [ref] = engine.generate(text="The quick brown fox", sampling_params=_greedy(), return_logprob=True,
                            top_logprobs_num=2)
    out = oai.completions.create(model=SERVED_MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0,
                                 logprobs=2, extra_body={"ignore_eos": True})
    [choice] = out.choices
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert choice.model_extra["token_ids"] == ref.output_ids
    assert choice.model_extra["weight_versions"] == ref.weight_versions
    assert choice.model_extra["prompt_token_ids"] == engine.tokenizer.encode("The quick brown fox")
    assert choice.logprobs.token_logprobs == pytest.approx(ref.output_logprobs, abs=1e-5)
    # The legacy format keys the alternatives by their text (ids of equal text collapse into one).
    tops = [{engine.tokenizer.decode([t], skip_special_tokens=False): lp for t, lp in zip(k.token_ids, k.logprobs)}
            for k in ref.output_top_logprobs]
    assert [d.keys() for d in choice.logprobs.top_logprobs] == [d.keys() for d in tops]
    assert "".join(choice.logprobs.tokens) == engine.tokenizer.decode(ref.output_ids, skip_special_tokens=False)
    assert out.usage.prompt_tokens == ref.prompt_tokens and out.usage.completion_tokens == 8
    # A batch of prompts (text and token ids) with n samples each: choices prompt-major.
    ids = engine.tokenizer.encode("A rollout")
    batch = oai.completions.create(model=SERVED_MODEL, prompt=[ids, ids], max_tokens=4, n=2, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    [one] = engine.generate(input_ids=ids, sampling_params=_greedy(4))
    assert all(c.model_extra["token_ids"] == one.output_ids for c in batch.choices)


def test_streamed_completion_joins_to_the_whole_one(oai, engine):
    kw = dict(model=SERVED_MODEL, prompt="Each request has a prompt", max_tokens=24, temperature=1.0, seed=3,
              logprobs=0, extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kw).choices[0]
    events = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    deltas = [e.choices[0] for e in events if e.choices]
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.model_extra["token_ids"]] == whole.model_extra["token_ids"]
    assert [lp for d in deltas for lp in d.logprobs.token_logprobs] == whole.logprobs.token_logprobs
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    assert events[-1].usage.completion_tokens == 24 and not events[-1].choices
    assert [o for d in deltas for o in d.logprobs.text_offset] == whole.logprobs.text_offset


def test_streamed_text_offsets_follow_the_tokens_also_with_stop_strings(oai):
    """With stop strings the stream holds back text that could start one; the offsets still count the
    tokens' own text, as the whole response does (they counted the text let out: mostly 0)."""
    kw = dict(model=SERVED_MODEL, prompt="The quick brown fox", max_tokens=12, temperature=0.0, logprobs=0,
              stop=["QQQQQQQQQQ"], extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kw).choices[0]
    deltas = [e.choices[0] for e in oai.completions.create(stream=True, **kw) if e.choices]
    assert [o for d in deltas if d.logprobs for o in d.logprobs.text_offset] == whole.logprobs.text_offset


def test_chat_renders_the_template_and_streams_the_same_text(oai, engine):
    sp = SamplingParams(temperature=1.0, seed=11, max_new_tokens=16, ignore_eos=True)
    [ref] = engine.generate(messages=CHAT, tools=TOOLS, sampling_params=sp, return_logprob=True)
    kw = dict(model=SERVED_MODEL, messages=CHAT, tools=TOOLS, max_tokens=16, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    out = oai.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    [choice] = out.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.model_extra["token_ids"] == ref.output_ids
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(ref.output_logprobs, abs=1e-5)
    assert all(len(e.top_logprobs) == 3 for e in choice.logprobs.content)
    rendered = engine.tokenizer.apply_chat_template(CHAT, tools=TOOLS)
    assert out.model_extra["prompt_token_ids"] == engine.tokenizer.encode(rendered, add_special_tokens=False)
    events = list(oai.chat.completions.create(stream=True, **kw))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == ref.text
    assert events[-1].choices[0].finish_reason == "length"
    # Without max_tokens a chat may use the rest of the context (here it stops at the length asked).
    assert oai.chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_completion_tokens=3).usage.\
        completion_tokens <= 3


def _stop_case(engine) -> tuple[int, str, str]:
    """A seed whose sampled output holds a 4-character stop string across a token boundary, first seen
    there: (seed, stop, the text before it)."""
    for seed in range(20):
        [out] = engine.generate(text=STOP_PROMPT, sampling_params=SamplingParams(
            temperature=1.0, seed=seed, max_new_tokens=24, ignore_eos=True))
        text, ids = out.text, out.output_ids
        for k in range(2, len(ids) - 2):
            start = len(engine.tokenizer.decode(ids[:k])) - 2
            stop = text[start:start + 4]
            if start > 0 and len(stop) == 4 and "\ufffd" not in stop and text.find(stop) == start:
                return seed, stop, text[:start]
    raise AssertionError("no usable stop string in the sampled outputs")


def test_stop_strings_are_cut_from_text_whole_and_streamed(oai, engine):
    seed, stop, before = _stop_case(engine)
    kw = dict(model=SERVED_MODEL, prompt=STOP_PROMPT, max_tokens=24, temperature=1.0, seed=seed, stop=[stop],
              extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kw).choices[0]
    assert whole.text == before and whole.finish_reason == "stop" and whole.model_extra["matched_stop"] == stop
    streamed = list(oai.completions.create(stream=True, **kw))
    assert "".join(e.choices[0].text for e in streamed) == before  # no piece of the stop string leaked


def test_errors_are_openai_errors_with_the_grpc_status(oai, server):
    cases = [
        (openai.NotFoundError, "NOT_FOUND", "model", dict(model="other-model")),
        (openai.BadRequestError, "INVALID_ARGUMENT", "temperature", dict(temperature=-1)),
        (openai.BadRequestError, "OUT_OF_RANGE", "max_tokens", dict(max_tokens=10**6)),
        (openai.BadRequestError, "INVALID_ARGUMENT", "presence_penalty", dict(presence_penalty=0.5)),
        (openai.BadRequestError, "INVALID_ARGUMENT", "prompt", dict(prompt=[10**6])),
    ]
    for error, code, param, kw in cases:
        with pytest.raises(error) as info:
            oai.completions.create(**{"model": SERVED_MODEL, "prompt": "hi", "max_tokens": 4, **kw})
        body = info.value.body
        assert (body["code"], body["param"]) == (code, param), body
        assert body["message"].startswith(f"{param}: ")
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "robot", "content": "x"}])
    assert info.value.body["param"] == "messages" and "unknown role robot" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:  # a schema error, before any engine work
        oai.chat.completions.create(model=SERVED_MODEL, messages=[])
    assert info.value.body["param"] == "messages"


def test_auth_guards_everything_but_health(server, oai):
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
    assert info.value.body["code"] == "UNAUTHENTICATED"
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/metrics").status_code == 401
        no_token = http.post("/v1/completions", json={"model": SERVED_MODEL, "prompt": "hi"})
        assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/nothing", headers={"authorization": f"Bearer {TOKEN}"}).json()["error"]["code"] == \
            "NOT_FOUND"


def test_openai_shaped_messages_reach_the_template_as_transformers_takes_them(oai, engine):
    # The API sends tool-call arguments as JSON text and content as parts; templates get objects and text.
    sent = [
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "1+2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    rendered = [
        {"role": "user", "content": "What is\n1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    out = oai.chat.completions.create(model=SERVED_MODEL, messages=sent, tools=TOOLS, max_tokens=2)
    text = engine.tokenizer.apply_chat_template(rendered, tools=TOOLS)
    assert out.model_extra["prompt_token_ids"] == engine.tokenizer.encode(text, add_special_tokens=False)
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=SERVED_MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "only text content parts" in info.value.body["message"]


def test_a_null_max_tokens_fills_the_context_and_chat_errors_name_chat_fields(server, oai, engine):
    with httpx.Client(base_url=server.http_url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
        ids = engine.tokenizer.encode("The quick brown fox")
        long_prompt = ids * ((engine.limits.context_length - 20) // len(ids))  # leaves 20 tokens or fewer
        room = engine.limits.context_length - len(long_prompt)
        reply = http.post("/v1/completions", json={"model": SERVED_MODEL, "prompt": long_prompt, "max_tokens": None,
                                                   "ignore_eos": True, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == room
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=SERVED_MODEL, messages=CHAT, logprobs=True, top_logprobs=100)
    assert info.value.body["param"] == "top_logprobs"
