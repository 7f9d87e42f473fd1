"""A KV pool too small for all requests at once: retraction, eviction, and no slot leaks."""

from __future__ import annotations

import random
import threading
import time

from rollout import Engine, SamplingParams
from rollout.types import FinishReason

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

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        time.sleep(0.3)
        engine.abort(["r0", "r3", "r7"])
        time.sleep(0.2)
        engine.abort("r9")
        for t in threads:
            t.join(timeout=120)
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
