"""Speculative decoding through the whole engine (n-gram drafts): same outputs and logprobs as
without it, the same token distribution, and the engine's other promises kept (stops, aborts,
retraction, pauses, weight versions, n samples)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from rollout import Engine, SamplingParams
from rollout.errors import InvalidArgumentError
from rollout.spec.verify import Verifier
from rollout.types import FinishReason, PauseMode
from tests.waiting import join_all

# Repeats inside the prompt give the n-gram drafter something to find from the first step.
PROMPTS = [[5, 17, 42, 99, 100, 7, 5, 17, 42], [1, 2, 3, 1, 2, 3], [9, 8, 7, 6, 5, 9, 8]]
SPEC = dict(speculative_method="ngram", num_draft_tokens=3)
# The distribution tests decode N_SAMPLES sequences at once: speculate at that batch size too.
SPEC_WIDE = dict(SPEC, speculative_max_batch_size=1024)


@pytest.fixture(scope="module")
def peaky_model(tiny_model_dir) -> str:
    """One layer, large weights: peaked next-token distributions, so sampled drafts often match."""
    return tiny_model_dir("qwen3", num_hidden_layers=1, init_std=1.0)


def _policy(cores):
    return cores[-1].spec.policy


@pytest.mark.parametrize("arch_kw", [{}, {"num_hidden_layers": 1, "init_std": 1.0}], ids=["default", "peaky"])
def test_greedy_and_logprobs_equal_plain_decoding(tiny_model_dir, engine_cores, arch_kw) -> None:
    path = tiny_model_dir("qwen3", **arch_kw)
    sp = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True, n=2)
    kw = dict(return_logprob=True, return_raw_logprob=True, top_logprobs_num=3)
    with Engine(path) as engine:
        plain = engine.generate(PROMPTS, sp, **kw)
    with Engine(path, **SPEC) as engine:
        spec = engine.generate(PROMPTS, sp, **kw)
        engine.check_integrity()
        assert engine.info().kv_used_tokens == 0
    policy = _policy(engine_cores)
    assert policy.accepted > 0, "no draft was accepted: the test would not exercise verification"
    for a, b in zip(plain, spec):
        assert a.output_ids == b.output_ids
        assert a.weight_versions == b.weight_versions
        np.testing.assert_allclose(a.output_logprobs, b.output_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.output_raw_logprobs, b.output_raw_logprobs, atol=1e-4)
        for ta, tb in zip(a.output_top_logprobs, b.output_top_logprobs):
            assert ta.token_ids == tb.token_ids
            np.testing.assert_allclose(ta.logprobs, tb.logprobs, atol=1e-4)


SAMPLED = {
    "t1": SamplingParams(temperature=1.0),
    "topp_topk": SamplingParams(temperature=1.0, top_p=0.8, top_k=20),
    "t0.7_minp": SamplingParams(temperature=0.7, min_p=0.05),
}
N_SAMPLES = 200
LENGTH = 6
# On the peaky model this prompt's samples repeat themselves about half the time: drafts are accepted
# and rejected in similar numbers.
SAMPLED_PROMPT = [3, 4] * 5 + [3]


def _samples(path: str, sp: SamplingParams, **options) -> list:
    params = SamplingParams(**{**sp.__dict__, "n": N_SAMPLES, "seed": 100, "max_new_tokens": LENGTH,
                               "ignore_eos": True})
    with Engine(path, **options) as engine:
        out = engine.generate(SAMPLED_PROMPT, params, return_logprob=True)
        engine.check_integrity()
    return out


def _two_sample_pvalue(a: list[tuple], b: list[tuple]) -> float:
    """Chi-square test that two samples of token tuples come from one distribution (rare outcomes pooled)."""
    keys = sorted(set(a) | set(b))
    ca = np.array([a.count(k) for k in keys])
    cb = np.array([b.count(k) for k in keys])
    common = (ca + cb) >= 10
    table = np.stack([np.append(ca[common], ca[~common].sum()), np.append(cb[common], cb[~common].sum())])
    table = table[:, table.sum(0) > 0]
    return float(chi2_contingency(table).pvalue)


def _prefixes(outs: list, n: int) -> list[tuple]:
    return [tuple(o.output_ids[:n]) for o in outs]


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_distribution_equals_plain(peaky_model, engine_cores, name) -> None:
    plain = _samples(peaky_model, SAMPLED[name])
    spec = _samples(peaky_model, SAMPLED[name], **SPEC_WIDE)
    policy = _policy(engine_cores)
    # Drafts both accepted and rejected in numbers (n-gram lookups that miss back off, so fewer are made).
    assert policy.accepted >= 0.15 * policy.drafted and policy.drafted - policy.accepted >= 0.15 * policy.drafted
    for n in (2, 4, 6):
        assert _two_sample_pvalue(_prefixes(plain, n), _prefixes(spec, n)) > 1e-3
    # The n-gram verify draws each row with the row's own (seed, step): the same seed gives the same
    # tokens (up to float rounding at a bin edge) and the target's logprobs for them.
    same = [(a, b) for a, b in zip(plain, spec) if a.output_ids == b.output_ids]
    assert len(same) >= 0.95 * N_SAMPLES
    for a, b in same:
        np.testing.assert_allclose(a.output_logprobs, b.output_logprobs, atol=1e-4)


def test_accepting_every_draft_fails_the_distribution_test(peaky_model, monkeypatch) -> None:
    """The test above has teeth: a biased rule (drafts taken without checking) fails it."""
    sp = SAMPLED["t1"]
    plain = _samples(peaky_model, sp)
    monkeypatch.setattr(Verifier, "accept", lambda self, sampled, drafts, seeds, steps: drafts >= 0)
    biased = _samples(peaky_model, sp, **SPEC_WIDE)
    assert min(_two_sample_pvalue(_prefixes(plain, n), _prefixes(biased, n)) for n in (2, 4, 6)) < 1e-6


def test_stops_inside_accepted_runs_match_plain(tiny_model_dir, engine_cores) -> None:
    path = tiny_model_dir("qwen3")  # greedy outputs settle into repeats: long accepted runs
    base = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    with Engine(path) as engine:
        ref = engine.generate(PROMPTS, base)
    stop_tok = ref[0].output_ids[25]
    text = ref[1].text
    cases = [
        SamplingParams(temperature=0.0, max_new_tokens=40, stop_token_ids=[stop_tok]),
        SamplingParams(temperature=0.0, max_new_tokens=23, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=40, stop=[text[-6:-3]], ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=40, min_new_tokens=30, stop_token_ids=[stop_tok]),
    ]
    with Engine(path) as engine:
        want = [engine.generate(PROMPTS, sp) for sp in cases]
    with Engine(path, **SPEC) as engine:
        got = [engine.generate(PROMPTS, sp) for sp in cases]
        engine.check_integrity()
    assert _policy(engine_cores).accepted > 10
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert (a.output_ids, a.finish_reason, a.matched_stop) == (b.output_ids, b.finish_reason, b.matched_stop)


@pytest.mark.parametrize("method", ["ngram", "draft", "eagle"])
def test_abort_mid_run_leaks_no_kv(tiny_model_dir, tmp_path, method) -> None:
    path = tiny_model_dir("qwen3")
    sp = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True, n=3)
    opts = dict(speculative_method=method, num_draft_tokens=3)
    if method == "draft":
        opts["draft_model_path"] = path
    if method == "eagle":
        from rollout.testing.eagle_head import write_eagle_head

        opts["draft_model_path"] = write_eagle_head(str(tmp_path), path)
    with Engine(path, **opts) as engine:
        streams = [engine.stream(p, sp, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
        for s in streams:
            next(s)
        engine.abort(["r0", "r2"])
        next(streams[1])
        engine.abort("r1")
        finals = [chunk for s in streams for chunk in s if chunk.finished]
        assert len(finals) == 9 and {c.finish_reason for c in finals} == {FinishReason.ABORT}
        assert all(c.completion_tokens < 400 for c in finals)
        engine.check_integrity()
        info = engine.info()
        assert info.kv_used_tokens == 0 and info.num_running == 0


def test_retraction_pauses_and_weight_versions(tiny_model_dir) -> None:
    """Small KV pool (retraction), RETRACT / IN_PLACE pauses and a weight update mid-run, with drafts:
    greedy tokens as an undisturbed run, each token stamped with the weights that made it."""
    path = tiny_model_dir("qwen3")
    sp = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True, n=2)
    with Engine(path) as engine:
        ref = [engine.generate(p, sp)[0].output_ids for p in PROMPTS]
    opts = dict(max_total_tokens=150, page_size=2, chunked_prefill_size=8, max_running_requests=4, **SPEC)
    with Engine(path, **opts) as engine:
        results: dict[int, list] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.generate(PROMPTS[i], sp)),
                                    daemon=True) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        engine.pause(PauseMode.RETRACT)
        engine.continue_()
        engine.pause(PauseMode.IN_PLACE)
        engine.update_weights_from_disk(path, version=7)  # same weights, new version label
        engine.continue_()
        join_all(threads, "with drafts, a small pool and pauses the engine did not finish every request")
        engine.check_integrity()
        assert engine.info().kv_used_tokens == 0
        assert engine.info().num_retractions > 0
    for i, outs in results.items():
        for o in outs:
            assert o.output_ids == ref[i]
            assert o.weight_versions == sorted(o.weight_versions)
            assert set(o.weight_versions) <= {0, 7}


def test_bad_options_are_refused(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with pytest.raises(InvalidArgumentError, match="speculative_method"):
        Engine(path, speculative_method="medusa")
    with pytest.raises(InvalidArgumentError, match="num_draft_tokens"):
        Engine(path, speculative_method="ngram", num_draft_tokens=0)
    with pytest.raises(InvalidArgumentError, match="draft_model_path"):
        Engine(path, speculative_method="draft")


def test_oracle_accepts_at_its_rate(tiny_model_dir, engine_cores) -> None:
    """Benchmark-only drafter: drafts taken with the given probability (its output is not exact)."""
    path = tiny_model_dir("qwen3")
    sp = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True, n=4)
    with Engine(path, speculative_method="oracle", num_draft_tokens=4, oracle_acceptance=0.7) as engine:
        outs = engine.generate(PROMPTS, sp)
        engine.check_integrity()
    assert all(len(o.output_ids) == 60 for o in outs)
    policy = _policy(engine_cores)
    # Each draft is taken with probability 0.7 given the ones before it were: of 4 drafts, the
    # expected share accepted is (0.7 + 0.7^2 + 0.7^3 + 0.7^4) / 4 = 0.443.
    assert 0.38 < policy.accepted / policy.drafted < 0.51


def test_requests_waiting_count_toward_the_batch_that_stops_speculation(tiny_model_dir, engine_cores) -> None:
    """A batch larger than speculative_max_batch_size does not speculate in the steps where only a
    few of it run yet: the requests still waiting count. Only the last ones (nothing waiting) do."""
    path = tiny_model_dir("qwen3")
    sp = SamplingParams(temperature=0.0, max_new_tokens=7, ignore_eos=True)
    opts = dict(speculative_method="oracle", num_draft_tokens=2, oracle_acceptance=1.0,
                speculative_max_batch_size=2, max_running_requests=2)
    with Engine(path, **opts) as engine:
        outs = engine.generate([[3 + i, 4, 5] for i in range(8)], sp)
        engine.check_integrity()
    assert all(len(o.output_ids) == 7 for o in outs)
    # Two steps of (1 + 2 drafts) tokens after the prompt's first token finish a request. Counting
    # only the running requests, every request would speculate (16 sequence-steps); the last two
    # requests are the only ones that run with nothing waiting.
    assert 0 < _policy(engine_cores).verified <= 4
