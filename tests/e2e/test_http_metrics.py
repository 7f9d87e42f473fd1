"""``/metrics`` after real traffic (parsed as Prometheus text), and clients that leave mid-request."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import SERVED_MODEL, TOKEN

AUTH = {"authorization": f"Bearer {TOKEN}"}
CHAT = [{"role": "user", "content": "The engine keeps the keys and values of past tokens in a cache."}]


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.http_url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics`` by (name, sorted labels), through the Prometheus text parser."""
    reply = http.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(reply.text))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_the_traffic_sent(http, oai, client, idle, engine):
    idle()
    before = scrape(http)
    usage = []
    for _ in range(2):  # the same chat twice: the second finds its prompt in the prefix cache
        events = list(oai.chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_tokens=5, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True}))
        usage.append(events[-1].usage)
    out = oai.completions.create(model=SERVED_MODEL, prompt="A rollout", max_tokens=3, extra_body={"ignore_eos": True})
    usage.append(out.usage)
    idle()
    after = scrape(http)
    assert usage[1].prompt_tokens_details.cached_tokens > 0
    assert delta(after, before, "rollout_time_to_first_token_seconds_count") == 3
    assert delta(after, before, "rollout_inter_token_latency_seconds_count") == 4 + 4 + 2
    assert delta(after, before, "rollout_e2e_request_latency_seconds_count") == 3
    assert delta(after, before, "rollout_generation_tokens_total") == 13
    assert delta(after, before, "rollout_request_success_total", finish_reason="length") == 3
    assert delta(after, before, "rollout_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert delta(after, before, "rollout_prefix_cache_hit_tokens_total") == sum(
        u.prompt_tokens_details.cached_tokens for u in usage)
    assert 0 < after[("rollout_prefix_cache_hit_ratio", ())] < 1
    info = client.get_info()
    assert after[("rollout_engine_ready", ())] == 1
    assert after[("rollout_num_requests_running", ())] == after[("rollout_num_requests_waiting", ())] == 0
    assert after[("rollout_kv_cache_total_tokens", ())] == info.kv_total_tokens
    assert after[("rollout_kv_cache_usage_ratio", ())] == 0
    assert after[("rollout_weight_version", ())] == info.weight_version
    for tag, state in info.memory.items():
        assert after[("rollout_memory_state", (("state", state["state"]), ("tag", tag)))] == 1
        assert after[("rollout_memory_bytes", (("tag", tag),))] == state["bytes"]
    assert after[("rollout_model_info", (("model_name", SERVED_MODEL), ("model_path", info.model_path)))] == 1


def test_pauses_and_weight_updates_are_timed(http, client, tiny_model, idle):
    idle()
    before = scrape(http)
    client.pause("in_place")
    paused = scrape(http)
    assert paused[("rollout_paused", ())] == 1
    client.continue_()
    version = client.get_info().weight_version
    client.update_weights_from_disk(tiny_model, version=version)  # same weights, same version
    after = scrape(http)
    assert after[("rollout_paused", ())] == 0
    assert delta(after, before, "rollout_paused_seconds_total") > 0
    for command in ("Pause", "Continue", "UpdateWeightsFromDisk"):
        assert delta(after, before, "rollout_control_duration_seconds_count", command=command, outcome="ok") == 1
    assert delta(after, before, "rollout_weight_update_seconds_total") > 0


def _wait_for_abort(http: httpx.Client, before: dict) -> None:
    deadline = time.monotonic() + 15
    while delta(scrape(http), before, "rollout_request_success_total", finish_reason="abort") < 1:
        assert time.monotonic() < deadline, "the request of a client that left was not aborted within 15 s"
        time.sleep(0.05)


def test_a_client_that_leaves_a_stream_aborts_its_request(http, client, idle):
    idle()
    before = scrape(http)
    body = {"model": SERVED_MODEL, "prompt": "hi", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
        client.pause("in_place")  # from here on the request cannot end by itself
    try:
        _wait_for_abort(http, before)
    finally:
        client.continue_()
    idle()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream-before-its-first-token"])
def test_a_client_that_leaves_a_waiting_request_aborts_it(http, client, idle, stream):
    idle()
    before = scrape(http)
    client.pause("in_place")  # the request waits, so only the client's leaving can end it
    try:
        body = {"model": SERVED_MODEL, "prompt": "hi", "max_tokens": 8, "stream": stream}
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        _wait_for_abort(http, before)
    finally:
        client.continue_()
    idle()
