"""A KV pool too small for all requests at once: retraction, eviction, and no slot leaks."""

from __future__ import annotations

import random
import threading
import time

from rollout import Engine, SamplingParams
from rollout.types import FinishReason
from tests.waiting import StreamReader, join_all

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 300) for _ in range(6)]
    return [(shared if i % 2 else []) + [rng.randrange(3, 300) for _ in range(rng.randrange(4, 20))]
            for i in range(n)]


def test_small_pool_finishes_everything_correctly(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    prompts = make_prompts(12)
    with Engine(path) as engine:
        ref = [engine.generate(p, GREEDY, return_logprob=True)[0] for p in prompts]
    # Every request needs up to ~50 tokens; 12 of them at once would need ~500.
    for page_size in (1, 4):
        with Engine(path, max_total_tokens=96, page_size=page_size) as engine:
            outs = engine.generate(prompts, GREEDY, return_logprob=True)
            for o, r in zip(outs, ref):
                assert o.output_ids == r.output_ids
                assert o.finish_reason is FinishReason.LENGTH
                assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-4
            engine.check_integrity()
            info = engine.info()
            assert info.num_retractions > 0  # the pool really was too small
            assert info.kv_used_tokens == 0 and info.num_running == 0 and info.num_waiting == 0


def test_aborts_under_memory_pressure_leak_nothing(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    prompts = make_prompts(10, seed=5)
    long = SamplingParams(temperature=0.8, max_new_tokens=60, ignore_eos=True, seed=1)
    with Engine(path, max_total_tokens=128, page_size=2) as engine:
        results = {}

        def run(i: int) -> None:
            results[i] = engine.generate(prompts[i], long, request_id=f"r{i}")[0]

        threads = [threading.Thread(target=run, args=(i,), name=f"r{i}", daemon=True) for i in range(len(prompts))]
        for t in threads:
            t.start()
        time.sleep(0.3)
        engine.abort(["r0", "r3", "r7"])
        time.sleep(0.2)
        engine.abort("r9")
        join_all(threads, "under memory pressure with aborts the engine did not finish every request (leaked KV?)")
        assert len(results) == len(prompts)
        for i, out in results.items():
            if out.finish_reason is FinishReason.ABORT:
                assert i in (0, 3, 7, 9)
                assert len(out.output_ids) < 60
            else:
                assert len(out.output_ids) == 60
        engine.check_integrity()
        assert engine.info().kv_used_tokens == 0
        # Still serving.
        assert len(engine.generate(prompts[0], GREEDY)[0].output_ids) == 24


def test_abort_mid_stream_frees_every_kv_slot_at_once(tiny_model_dir) -> None:
    """Two streamed prompts with a shared prefix, n = 3 samples each, aborted while they generate: by the
    engine's next command none of their KV is held any more (the prefix cache may keep the prompts)."""
    path = tiny_model_dir("qwen3")
    shared = list(range(40, 64))  # whole pages of the prefix both prompts start with
    prompts = {"a": shared + [5, 6, 7], "b": shared + [9]}
    sp = SamplingParams(temperature=0.8, max_new_tokens=400, ignore_eos=True, seed=2, n=3)
    with Engine(path, page_size=4, max_total_tokens=1024) as engine:
        after = engine.generate(prompts["b"], GREEDY)[0].output_ids
        engine.flush_cache()
        readers = {rid: StreamReader(engine.stream(p, sp, request_id=rid), name=f"stream {rid}")
                   for rid, p in prompts.items()}
        for r in readers.values():
            r.wait_tokens(count=3, samples=sp.n)  # every sample is past its prefill, mid-generation
        engine.abort(list(prompts))
        info = engine.info()  # the loop applies the abort before it answers this
        assert info.num_running == 0 and info.num_waiting == 0, (
            f"right after the abort the engine still runs {info.num_running} and queues {info.num_waiting} samples")
        assert info.kv_used_tokens == 0, (
            f"right after aborting every sample the engine still holds {info.kv_used_tokens} KV tokens: "
            "the aborted samples' KV was not released")
        engine.check_integrity()
        for rid, r in readers.items():
            r.join()
            assert sorted(r.final) == list(range(sp.n)), f"{rid}: finished samples {sorted(r.final)}"
            for i, ch in r.final.items():
                assert ch.finish_reason is FinishReason.ABORT, f"{rid} sample {i} ended with {ch.finish_reason}"
                assert 3 <= len(r.tokens[i]) < sp.max_new_tokens
        # The shared prefix left in the cache by the aborted samples serves a new request correctly.
        assert engine.generate(prompts["b"], GREEDY)[0].output_ids == after
        engine.flush_cache()
        info = engine.info()
        assert info.kv_used_tokens == 0 and info.kv_cached_tokens == 0
        engine.check_integrity()
