"""Speculative decoding with a draft model (and the adaptive policy): greedy and sampled outputs
follow the target, logprobs are the target's, stale drafts are turned off after a weight update."""

from __future__ import annotations

import pytest

from rollout import Engine, SamplingParams
from rollout.config import SpecConfig
from rollout.sampling import rejection
from rollout.spec.policy import PROBE_EVERY, AdaptivePolicy
from tests.unit.test_spec_engine import SAMPLED, _prefixes, _two_sample_pvalue

PROMPTS = [[3, 4] * 5 + [3], [5, 17, 42, 99, 100, 7, 5, 17, 42]]
N_SAMPLES = 200


@pytest.fixture(scope="module")
def models(tiny_model_dir) -> tuple[str, str]:
    """A peaky target and a draft from the same random tensors at a smaller scale: q is close to p
    but not equal, so drafts are accepted often and rejected often."""
    return (tiny_model_dir("qwen3", num_hidden_layers=1, init_std=1.0),
            tiny_model_dir("qwen3", num_hidden_layers=1, init_std=0.7))


def _policy(cores) -> AdaptivePolicy:
    return cores[-1].spec.policy


@pytest.mark.parametrize("same", [True, False], ids=["draft=target", "draft=smaller"])
def test_greedy_and_logprobs_equal_plain(models, engine_cores, same) -> None:
    target, draft = models
    sp = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True, n=2)
    with Engine(target) as engine:
        plain = engine.generate(PROMPTS, sp, return_logprob=True, return_raw_logprob=True)
    with Engine(target, speculative_method="draft", draft_model_path=target if same else draft,
                num_draft_tokens=3) as engine:
        spec = engine.generate(PROMPTS, sp, return_logprob=True, return_raw_logprob=True)
        engine.check_integrity()
        assert engine.info().kv_used_tokens == 0
    policy = _policy(engine_cores)
    if same:
        assert policy.accepted == policy.drafted > 0  # q == p: every draft is taken
    else:
        assert 0 < policy.accepted < policy.drafted
    for a, b in zip(plain, spec):
        assert a.output_ids == b.output_ids
        assert a.output_logprobs == pytest.approx(b.output_logprobs, abs=1e-4)
        assert a.output_raw_logprobs == pytest.approx(b.output_raw_logprobs, abs=1e-4)


def _samples(path: str, sp: SamplingParams, **options) -> list:
    params = SamplingParams(**{**sp.__dict__, "n": N_SAMPLES, "seed": 7, "max_new_tokens": 6, "ignore_eos": True})
    with Engine(path, **options) as engine:
        out = engine.generate(PROMPTS[0], params, return_logprob=True)
        engine.check_integrity()
    return out


@pytest.mark.parametrize("name", ["t1", "topp_topk"])
def test_sampled_distribution_equals_plain(models, engine_cores, name) -> None:
    target, draft = models
    plain = _samples(target, SAMPLED[name])
    spec = _samples(target, SAMPLED[name], speculative_method="draft", draft_model_path=draft,
                    num_draft_tokens=3, speculative_max_batch_size=1024)
    policy = _policy(engine_cores)
    assert 0.2 * policy.drafted < policy.accepted < 0.95 * policy.drafted
    for n in (2, 4, 6):
        assert _two_sample_pvalue(_prefixes(plain, n), _prefixes(spec, n)) > 1e-3


def test_a_biased_acceptance_fails_the_distribution_test(models, monkeypatch) -> None:
    """Accepting with p(d) instead of min(1, p(d) / q(d)) is caught by the test above (the biased
    residual is caught by the isolated tests of test_spec_rejection.py, where it is stronger)."""
    target, draft = models
    plain = _samples(target, SAMPLED["t1"])
    monkeypatch.setattr(rejection, "_accept", lambda p_d, q_d, u: u < p_d)
    biased = _samples(target, SAMPLED["t1"], speculative_method="draft", draft_model_path=draft,
                      num_draft_tokens=3, speculative_max_batch_size=1024)
    assert min(_two_sample_pvalue(_prefixes(plain, n), _prefixes(biased, n)) for n in (2, 4, 6)) < 1e-6


@pytest.mark.parametrize("mode", ["disable", "keep"])
def test_stale_draft_after_a_target_update(models, engine_cores, mode) -> None:
    target, draft = models
    sp = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    with Engine(target, speculative_method="draft", draft_model_path=draft, draft_on_stale_weights=mode) as engine:
        before = engine.generate(PROMPTS, sp)
        drafted = _policy(engine_cores).drafted
        assert drafted > 0
        engine.update_weights_from_disk(target, version=3)
        after = engine.generate(PROMPTS, sp)
        engine.check_integrity()
    assert [o.output_ids for o in after] == [o.output_ids for o in before]
    assert all(set(o.weight_versions) == {3} for o in after)
    more = _policy(engine_cores).drafted - drafted
    assert (more == 0) if mode == "disable" else (more > 0)


def test_adaptive_policy_shrinks_and_stops() -> None:
    policy = AdaptivePolicy(SpecConfig(method="ngram", num_draft_tokens=5, max_batch_size=32, min_acceptance=0.3))
    assert policy.num_drafts(1) == 5 and policy.num_drafts(16) == 5
    assert policy.num_drafts(17) == 2 and policy.num_drafts(32) == 2
    assert policy.num_drafts(33) == 0 and policy.num_drafts(0) == 0
    for _ in range(30):
        policy.record(drafted=10, accepted=0)
    # Keeps probing with one draft, one step in PROBE_EVERY; the other steps do not speculate.
    probes = []
    for _ in range(2 * PROBE_EVERY):
        probes.append(policy.num_drafts(1))
        policy.advance()
    assert probes == ([1] + [0] * (PROBE_EVERY - 1)) * 2
    for _ in range(30):
        policy.record(drafted=10, accepted=10)
    policy.advance()
    assert policy.num_drafts(1) == 5 and policy.num_drafts(1) == 5
    # Acceptance 0.5 per draft (5 sequences of k = 2, accepting 1 each): worth it for 16 sequences,
    # not for 17 (more than half of max_batch_size), which only probe.
    for _ in range(60):
        policy.record(drafted=10, accepted=5, sequences=5, rejected=5)
    assert policy.acceptance == pytest.approx(0.5, abs=0.01)
    assert policy.num_drafts(16) == 5
    probes = []
    for _ in range(PROBE_EVERY):
        probes.append(policy.num_drafts(17))
        policy.advance()
    assert probes == [1] + [0] * (PROBE_EVERY - 1)


def test_large_batches_do_not_speculate(tiny_model_dir, engine_cores) -> None:
    path = tiny_model_dir("qwen3")
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, n=8)
    with Engine(path, speculative_method="ngram", speculative_max_batch_size=4) as engine:
        engine.generate([[1, 2, 3, 1, 2, 3]], sp)
    assert _policy(engine_cores).drafted == 0
