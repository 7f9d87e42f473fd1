"""Generation through a real server agrees with the in-process engine, alone and under load."""

from __future__ import annotations

import random
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rollout.errors import RolloutError
from rollout.types import FinishReason, SamplingParams
from tests.waiting import join_all


def _prompt(seed: int, length: int, vocab: int = 384) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab - 3) for _ in range(length)]


def _collect(chunks) -> dict[int, dict]:
    """Per sample index: tokens, logprobs and the final chunk."""
    out: dict[int, dict] = {}
    for ch in chunks:
        s = out.setdefault(ch.index, {"ids": [], "logprobs": [], "versions": [], "last": None})
        s["ids"] += ch.token_ids
        s["logprobs"] += ch.logprobs or []
        s["versions"] += ch.weight_versions
        if ch.finished:
            assert s["last"] is None, "two final chunks for one sample"
            s["last"] = ch
    return out


def test_health_serving_without_token_and_reflection_lists_service(server, token):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rollout.v1.Rollout"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(
            reflect.ServerReflectionInfo(
                iter([ask]), metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"rollout.v1.Rollout", "grpc.health.v1.Health"} <= names
        # Reflection is not open: only health checks are.
        with pytest.raises(grpc.RpcError) as info:
            list(reflect.ServerReflectionInfo(iter([ask]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "seed, sp",
    [
        (1, SamplingParams(temperature=1.0, seed=11, max_new_tokens=12, n=2, ignore_eos=True)),
        (2, SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=5, max_new_tokens=10, ignore_eos=True)),
        (3, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)),
    ],
    ids=["sampled-n2", "top-p-top-k", "greedy"],
)
def test_stream_matches_in_process_engine(client, engine, seed, sp):
    prompt = _prompt(seed, 17)
    expected = engine.generate(input_ids=prompt, sampling_params=sp, return_logprob=True)
    got = _collect(client.stream(prompt, sp, return_logprob=True))
    assert sorted(got) == list(range(sp.n))
    for ref in expected:
        s = got[ref.index]
        assert s["ids"] == ref.output_ids
        assert s["logprobs"] == pytest.approx(ref.output_logprobs, abs=1e-5)
        assert s["versions"] == ref.weight_versions and len(s["versions"]) == sp.max_new_tokens
        last = s["last"]
        assert last.finish_reason == ref.finish_reason == FinishReason.LENGTH
        assert last.prompt_tokens == len(prompt) and last.completion_tokens == sp.max_new_tokens
    # The one-shot path (a single chunk per sample) gives the same outputs.
    outs = client.generate(prompt, sp, return_logprob=True)
    assert [o.output_ids for o in outs] == [r.output_ids for r in expected]
    for o, r in zip(outs, expected):
        assert o.output_logprobs == pytest.approx(r.output_logprobs, abs=1e-5)


def test_text_prompt_returns_decoded_text(client, engine):
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    [out] = client.generate("The quick brown fox", sp)
    [ref] = engine.generate(text="The quick brown fox", sampling_params=sp)
    assert out.output_ids == ref.output_ids
    assert out.text == engine.tokenizer.decode(ref.output_ids)
    assert out.prompt_tokens == len(engine.tokenizer.encode("The quick brown fox"))
    # Keyword forms, as in Engine.generate; token-id prompts get text only on request.
    [by_kw] = client.generate(text="The quick brown fox", sampling_params=sp)
    assert by_kw.output_ids == ref.output_ids and by_kw.text == out.text
    ids = engine.tokenizer.encode("The quick brown fox")
    [plain] = client.generate(input_ids=ids, sampling_params=sp)
    [decoded] = client.generate(ids, sp, return_text=True)
    assert plain.text is None and decoded.text == out.text and decoded.output_ids == ref.output_ids


def test_n_samples_share_the_prompt_kv(client):
    prompt = _prompt(20260, 40)  # never sent before: nothing of it is cached yet
    outs = client.generate(
        prompt, {"n": 8, "temperature": 1.0, "seed": 3, "max_new_tokens": 4}, return_logprob=True
    )
    assert [o.index for o in outs] == list(range(8))
    assert all(o.prompt_tokens == 40 and len(o.output_ids) == 4 for o in outs)
    cached = [o.cached_tokens for o in outs]
    assert sum(c > 0 for c in cached) >= 7, cached
    assert max(cached) <= 40
    # Distinct seeds per sample: the group is not 8 copies of one sample.
    assert len({tuple(o.output_ids) for o in outs}) > 1


def test_200_concurrent_streams_from_8_threads(client, engine, idle):
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    prompts = [_prompt(100 + i, 5 + 3 * i) for i in range(10)]
    expected = [engine.generate(input_ids=p, sampling_params=sp)[0].output_ids for p in prompts]
    results: dict[tuple[int, int], tuple] = {}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            # All 25 calls of this thread are in flight before any is read.
            streams = [(i, client.stream(prompts[(t * 25 + i) % 10], sp)) for i in range(25)]
            for i, stream in streams:
                got = _collect(stream)[0]
                results[(t, i)] = (got["ids"], got["last"])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,), name=f"worker {t}", daemon=True) for t in range(8)]
    for th in threads:
        th.start()
    join_all(threads, "the server did not end all of 200 concurrent streams")
    assert not errors, errors
    assert len(results) == 200
    for (t, i), (ids, last) in results.items():
        k = (t * 25 + i) % 10
        assert ids == expected[k]
        assert last.finish_reason == FinishReason.LENGTH and last.prompt_tokens == len(prompts[k])
    idle()


def test_generate_batch_sync_and_async(client, server, engine, token):
    import asyncio

    from rollout.client import AsyncRolloutClient

    sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    prompts = [_prompt(300 + i, 9) for i in range(12)]
    expected = [o.output_ids for o in engine.generate(input_ids=prompts, sampling_params=sp)]
    assert [o.output_ids for o in client.generate_batch(prompts, sp, max_concurrency=4)] == expected

    async def run():
        async with AsyncRolloutClient(server.address, token=token) as ac:
            return await ac.generate_batch(prompts, [sp] * len(prompts))

    assert [o.output_ids for o in asyncio.run(run())] == expected
    with pytest.raises(RolloutError) as info:
        client.generate_batch([prompts[0], [10**6]], sp)
    assert info.value.code == "INVALID_ARGUMENT"
