"""The same greedy output whatever the batch composition, chunk size, page size and cache state."""

from __future__ import annotations

import pytest

from rollout import Engine, SamplingParams
from tests.unit.test_engine_vs_hf import prompts_with_shared_prefix

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    prompts = prompts_with_shared_prefix(1)
    with Engine(path, enable_prefix_cache=False) as engine:
        # One prompt at a time: no batching, no cache.
        outs = [engine.generate(p, GREEDY, return_logprob=True)[0] for p in prompts]
    return path, prompts, outs


def assert_same(outs, ref, tol: float = 1e-4) -> None:
    for o, r in zip(outs, ref):
        assert o.output_ids == r.output_ids
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < tol


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"chunked_prefill_size": 3},
        {"page_size": 4},
        {"page_size": 16, "chunked_prefill_size": 5},
        {"max_running_requests": 2},
        {"max_num_batched_tokens": 7, "chunked_prefill_size": 7, "max_running_requests": 3},
    ],
)
def test_batch_chunk_page_invariance(reference, options) -> None:
    path, prompts, ref = reference
    with Engine(path, **options) as engine:
        assert_same(engine.generate(prompts, GREEDY, return_logprob=True), ref)
        # Second pass: the prefixes are now cached and must give the same result.
        again = engine.generate(prompts, GREEDY, return_logprob=True)
        assert_same(again, ref)
        engine.check_integrity()


def test_prefix_hit_equals_miss(reference) -> None:
    path, prompts, ref = reference
    with Engine(path) as engine:
        first = engine.generate(prompts[2], GREEDY, return_logprob=True)[0]
        second = engine.generate(prompts[2], GREEDY, return_logprob=True)[0]
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(prompts[2]) - 1
    assert second.output_ids == first.output_ids
    assert max(abs(a - b) for a, b in zip(first.output_logprobs, second.output_logprobs)) < 1e-5


def test_n_samples_share_prompt(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    prompt = list(range(10, 40))
    with Engine(path) as engine:
        outs = engine.generate(prompt, SamplingParams(temperature=1.0, n=8, max_new_tokens=6, seed=3))
        engine.check_integrity()
    assert [o.index for o in outs] == list(range(8))
    cached = sorted(o.cached_tokens for o in outs)
    assert cached == [0] + [len(prompt) - 1] * 7
    assert len({tuple(o.output_ids) for o in outs}) > 1  # different samples
