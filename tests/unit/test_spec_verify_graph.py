"""The verify graphs' static-buffer path (rollout/runner/verify_graph.py) gives what the eager
verify step gives: run here without capture (CPU), with the Triton backend in its interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from rollout import Engine, SamplingParams
from rollout.batch import BatchPlan, SpecPlan
from rollout.runner.verify_graph import VerifyGraphRunner, verify_width

PROMPTS = [[5, 17, 42, 99, 100, 7, 5, 17, 42], [1, 2, 3, 1, 2, 3], [9, 8, 7, 6, 5, 9, 8]]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_and_logprobs_through_the_verify_buffers_equal_eager(tiny_model_dir, engine_cores, method) -> None:
    path = tiny_model_dir("qwen3", num_hidden_layers=1, init_std=1.0)
    spec = dict(speculative_method=method, num_draft_tokens=2)
    if method == "draft":  # drafts made on the device, written into the graph's inputs
        spec["draft_model_path"] = tiny_model_dir("qwen3", num_hidden_layers=1, init_std=0.7)
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, n=2)
    with Engine(path) as engine:
        plain = engine.generate(PROMPTS, sp, return_logprob=True)
    with Engine(path, **spec) as engine:
        core = engine_cores[-1]
        runner = core.runner
        # Sizes 1, 2, 4, 8: steps of 3, 5 or 6 verifying sequences are padded to the next size.
        graphs = VerifyGraphRunner(runner.model, runner.kv_pool, core.cache.req_table, [1, 2], 8, runner.device,
                                    core.config.context_length)
        runner.verify_graphs = graphs
        out = engine.generate(PROMPTS, sp, return_logprob=True)
        engine.check_integrity()
        info = engine.info()
        assert info.kv_used_tokens == 0
        # Speculation counters: every verifying sequence-step drafted at least one token.
        assert 0 < info.spec_accepted <= info.spec_drafted and 0 < info.spec_verified <= info.spec_drafted
    assert graphs.replays > 0, "no verify step went through the static buffers"
    for a, b in zip(plain, out):
        assert a.output_ids == b.output_ids
        np.testing.assert_allclose(a.output_logprobs, b.output_logprobs, atol=1e-4)


def _plan(num_drafts: list[int], extend: list[int], sample: list[bool]) -> BatchPlan:
    n = len(extend)
    return BatchPlan(rows=list(range(n)), prefix_lens=[4] * n, extend_lens=extend, input_ids=[1] * sum(extend),
                     out_slots=list(range(sum(extend))), sample=sample, sampling=[], seeds=[], steps=[], banned=[],
                     return_logprob=False, return_raw_logprob=False, top_logprobs_num=0,
                     spec=SpecPlan(num_drafts, []))


def test_steps_of_verify_and_decode_entries_are_graphable_prompt_chunks_not() -> None:
    assert verify_width(_plan([2, 2], [3, 3], [True, True])) == 2
    assert verify_width(_plan([2, 0], [3, 1], [True, True])) == 2  # a plain decode rides along
    assert verify_width(_plan([2], [3, 5], [True, False])) is None  # a prompt chunk rides along
    assert verify_width(_plan([0, 1], [4, 2], [True, True])) is None  # the last prompt chunk too
