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


def _mixed_requests(vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Greedy and sampled rows, filters, stop ids, min/max lengths, n > 1: every way a step's
    samples are used or dropped."""
    import random

    rng = random.Random(7)
    prompts, params = [], []
    for i in range(14):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(2, 30))])
        kind = i % 5
        if kind == 0:
            sp = SamplingParams(temperature=0.0, max_new_tokens=rng.randint(1, 14), ignore_eos=True)
        elif kind == 1:
            sp = SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=12, seed=i, ignore_eos=True)
        elif kind == 2:  # stops on frequent ids: ends at unpredictable steps
            sp = SamplingParams(temperature=1.0, max_new_tokens=16, seed=i,
                                stop_token_ids=list(range(3, vocab, 3)), min_new_tokens=2)
        elif kind == 3:
            sp = SamplingParams(temperature=0.7, top_k=5, n=3, max_new_tokens=9, seed=i, ignore_eos=True)
        else:
            sp = SamplingParams(temperature=1.2, min_p=0.05, max_new_tokens=11, seed=i)
        params.append(sp)
    return prompts, params


@pytest.mark.parametrize("options", [{}, {"max_total_tokens": 96, "chunked_prefill_size": 8}])
def test_overlap_schedule_gives_the_same_outputs(tiny_model_dir, options) -> None:
    """Overlap scheduling (inputs from the previous step's samples on the device, one step queued
    ahead) produces what synchronous stepping does, under KV pressure with retractions too."""
    path = tiny_model_dir("qwen3")
    results = {}
    for overlap in (False, True):
        with Engine(path, overlap_schedule=overlap, **options) as engine:
            prompts, params = _mixed_requests(engine.limits.vocab_size)
            results[overlap] = engine.generate(prompts, params, return_logprob=True, top_logprobs_num=2)
            info = engine.info()
            engine.check_integrity()
            assert info.kv_used_tokens == 0
            if options:
                assert info.num_retractions > 0  # the small pool really forced retractions
    sync, overlapped = results[False], results[True]
    assert len(sync) == len(overlapped)
    for a, b in zip(sync, overlapped):
        assert a.output_ids == b.output_ids
        assert a.finish_reason == b.finish_reason and a.matched_stop == b.matched_stop
        assert max((abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)), default=0.0) < 1e-4
        assert [t.token_ids for t in a.output_top_logprobs] == [t.token_ids for t in b.output_top_logprobs]
