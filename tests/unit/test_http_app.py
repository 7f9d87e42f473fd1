"""The HTTP front end without an engine: loading state, auth, body limit, metrics bookkeeping."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from rollout.engine.messages import AddRequest, Continue, Pause, RequestFailed, UpdateWeightsFromDisk
from rollout.server.http.app import HttpState, build_app
from rollout.server.metrics import ServerMetrics
from rollout.types import FinishReason, SamplingParams, StreamChunk

LIMIT = 1000


@pytest.fixture
def http() -> TestClient:
    state = HttpState("m", "secret", ServerMetrics("m"))
    with TestClient(build_app(state, LIMIT), headers={"authorization": "Bearer secret"}) as c:
        yield c


def test_while_loading_health_and_requests_answer_unavailable(http) -> None:
    reply = http.get("/health", headers={"authorization": ""})
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "UNAVAILABLE"
    reply = http.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert reply.status_code == 503 and "still loading" in reply.json()["error"]["message"]
    samples = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples}
    assert samples["rollout_engine_ready"] == 0


def test_every_route_but_health_needs_the_token(http) -> None:
    for method, path in (("get", "/v1/models"), ("get", "/metrics"), ("post", "/v1/chat/completions")):
        for header in ("", "Bearer wrong", "secret"):
            reply = getattr(http, method)(path, headers={"authorization": header})
            assert reply.status_code == 401 and reply.json()["error"]["code"] == "UNAUTHENTICATED", (path, header)


def test_bodies_over_the_limit_are_refused_with_or_without_a_length(http) -> None:
    big = {"model": "m", "prompt": "x" * (2 * LIMIT)}
    reply = http.post("/v1/completions", json=big)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "RESOURCE_EXHAUSTED"

    def chunked():  # no Content-Length: counted while read
        yield b'{"model": "m", "prompt": "'
        for _ in range(4):
            yield b"x" * (LIMIT // 2)
        yield b'"}'

    reply = http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert reply.status_code == 413 and "at most 1000" in reply.json()["error"]["message"]
    reply = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "INVALID_ARGUMENT"


def _chunk(rid: str, index: int, n: int, finished: bool = False) -> StreamChunk:
    return StreamChunk(rid, index, list(range(n)), finished=finished,
                       finish_reason=FinishReason.LENGTH if finished else None, prompt_tokens=10, cached_tokens=4)


def test_metrics_time_streamed_requests_only_and_count_pauses() -> None:
    m = ServerMetrics("m")
    m.on_submit(AddRequest("s", [1, 2], SamplingParams(n=2), stream=True))
    m.on_submit(AddRequest("w", [1, 2], SamplingParams(), stream=False))
    m.on_submit(AddRequest("f", [1, 2], SamplingParams(), stream=True))
    m.on_events([_chunk("s", 0, 1), _chunk("s", 1, 1), _chunk("w", 0, 5, finished=True)])
    m.on_events([_chunk("s", 0, 2), _chunk("s", 1, 1, finished=True), RequestFailed("f", "INTERNAL", "x")])
    m.on_events([_chunk("s", 0, 0, finished=True), _chunk("unknown", 0, 3)])
    m.on_control(Pause(), 0.01, None)
    m.on_control(UpdateWeightsFromDisk("/x"), 0.5, None)
    m.on_control(Continue(), 0.01, None)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert samples[("rollout_time_to_first_token_seconds_count", ())] == 1  # one streamed request
    assert samples[("rollout_inter_token_latency_seconds_count", ())] == 3  # 2 tokens of sample 0, 1 of sample 1
    assert samples[("rollout_e2e_request_latency_seconds_count", ())] == 2
    assert samples[("rollout_generation_tokens_total", ())] == 10
    assert samples[("rollout_request_success_total", (("finish_reason", "length"),))] == 3
    assert samples[("rollout_request_failure_total", (("code", "INTERNAL"),))] == 1
    assert samples[("rollout_prefix_cache_hit_ratio", ())] == pytest.approx(0.4)
    assert samples[("rollout_weight_update_seconds_total", ())] == pytest.approx(0.5)
    assert samples[("rollout_paused_seconds_total", ())] > 0
    assert samples[("rollout_control_duration_seconds_count", (("command", "Pause"), ("outcome", "ok")))] == 1


def test_metrics_report_speculation_counters() -> None:
    from rollout.types import EngineInfo

    m = ServerMetrics("m")
    m.set_info(EngineInfo(model_path="/m", architecture="a", context_length=8, vocab_size=8, weight_version=0,
                          weights_valid=True, paused=False, pause_mode=None, num_waiting=0, num_running=0,
                          num_paused=0, kv_total_tokens=8, kv_used_tokens=0, kv_cached_tokens=0, page_size=1,
                          num_retractions=0, device="cpu", dtype="float32", spec_drafted=40, spec_accepted=31,
                          spec_verified=11))
    samples = {s.name: s.value for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert samples["rollout_spec_draft_tokens_total"] == 40
    assert samples["rollout_spec_accepted_tokens_total"] == 31
    assert samples["rollout_spec_verify_sequence_steps_total"] == 11


def test_a_body_that_is_not_json_names_no_field(http) -> None:
    reply = http.post("/v1/completions", content="{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] is None  # not a character offset


def test_booleans_are_not_token_ids(http) -> None:
    for body in ({"prompt": [True, False]}, {"prompt": "hi", "stop_token_ids": [True]}):
        reply = http.post("/v1/completions", json={"model": "m", **body})
        assert reply.status_code == 400, body


def test_a_completion_asks_for_at_most_max_choices() -> None:
    """Every choice is built on the event loop the gRPC service shares: a small body must not ask
    for hundreds of thousands of them."""
    from rollout.errors import InvalidArgumentError
    from rollout.server.http.schemas import CompletionRequest
    from rollout.server.http.to_engine import MAX_CHOICES, completion_call

    body = CompletionRequest(model="m", prompt=[[1, 2]] * 100, n=1024)
    assert 100 * 1024 > MAX_CHOICES
    with pytest.raises(InvalidArgumentError, match="choices .prompts x n. per request"):
        completion_call(body, None, set())  # refused before the engine is asked anything


def test_the_text_is_cut_at_the_stop_the_engine_matched(tiny_model_dir) -> None:
    """The engine ends a sample on the token that completes a stop string: the text is cut at that
    occurrence, even when the token's text holds the stop twice ("ll", stop "l")."""
    from rollout.server.http.responses import Choice
    from rollout.tokenizer import Tokenizer

    tok = Tokenizer.from_model_dir(tiny_model_dir("qwen3"))
    ids = tok.encode("he") + [370]
    assert tok.decode(ids[-1:]) == "ll"
    choice = Choice(0, tok, ("l",))
    choice.add(StreamChunk("r", 0, ids, finished=True, finish_reason=FinishReason.STOP, matched_stop="l"))
    assert choice.text == "he"
    # An occurrence before the last token's text (output before min_new_tokens) stays in the text.
    ids = tok.encode("hello wor") + [370]
    choice = Choice(0, tok, ("l",))
    choice.add(StreamChunk("r", 0, ids, finished=True, finish_reason=FinishReason.STOP, matched_stop="l"))
    assert choice.text == "hello wor"
