"""A forward step that fails: every request it held ends with an error (none is left waiting for a
token that will never come), no KV it may have left unwritten is reused, and the engine serves on.

The failure is a ``ModelRunner.collect`` that raises, as in ``test_engine_errors``."""

from __future__ import annotations

import pytest

import rollout.runner.model_runner as mr
from rollout import Engine, SamplingParams
from rollout.config import EngineConfig
from rollout.engine.core import EngineCore
from rollout.engine.messages import RequestFailed
from rollout.engine.request_validation import make_add_request
from rollout.errors import InvalidArgumentError, RolloutError

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)


def _add(core: EngineCore, rid: str, ids: list[int]) -> None:
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    core.add(make_add_request(rid, input_ids=ids, text=None, sampling=sampling, limits=core.limits,
                              tokenizer=core.tokenizer))


def test_a_sample_retracted_with_a_token_in_flight_fails_with_the_step(tiny_model_dir, monkeypatch) -> None:
    """With overlap scheduling a sample can be retracted (KV pressure) while the queued step still
    owes it a token. If that step fails, the sample's request fails too, instead of waiting in the
    queue for the token forever."""
    core = EngineCore(EngineConfig.build(tiny_model_dir("qwen3"), max_total_tokens=24, overlap_schedule=True,
                                         chunked_prefill_size=64))
    _add(core, "a", list(range(3, 11)))
    _add(core, "b", list(range(20, 28)))
    original = mr.ModelRunner.collect
    armed = [True]

    def collect(self, step):
        if armed[0] and any(s.pending for s in core.scheduler.waiting):
            armed[0] = False
            raise RuntimeError("device fell over")
        return original(self, step)

    monkeypatch.setattr(mr.ModelRunner, "collect", collect)
    events = []
    for _ in range(300):
        if not core.has_work():
            break
        events += core.step()
    assert not armed[0], "no step ran while a retracted sample was owed a token"
    assert not core.has_work(), f"requests left behind: {[s.request_id for s in core.scheduler.waiting]}"
    failed = {e.request_id for e in events if isinstance(e, RequestFailed)}
    finished = {e.request_id for e in events if getattr(e, "finished", False)}
    assert failed | finished == {"a", "b"} and failed
    core.cache.check_integrity()


def test_a_failed_steps_prompt_kv_is_not_reused(tiny_model_dir, monkeypatch) -> None:
    """Prompt KV goes to the prefix cache when its step is queued; after that step fails the KV is
    unknown, so the same prompt is computed again."""
    prompt = list(range(3, 40))
    with Engine(tiny_model_dir("qwen3"), max_total_tokens=1024, overlap_schedule=True) as eng:
        ref = eng.generate(prompt, GREEDY)[0]
        eng.flush_cache()
        original = mr.ModelRunner.collect
        calls = [0]

        def collect(self, step):
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("device fell over")
            return original(self, step)

        monkeypatch.setattr(mr.ModelRunner, "collect", collect)
        with pytest.raises(RolloutError, match="device fell over"):
            eng.generate(prompt, GREEDY)
        monkeypatch.setattr(mr.ModelRunner, "collect", original)
        out = eng.generate(prompt, GREEDY)[0]
        assert out.cached_tokens == 0
        assert out.output_ids == ref.output_ids
        eng.check_integrity()


def test_abort_with_ids_that_are_not_strings_is_refused_and_the_engine_serves(tiny_model_dir) -> None:
    with Engine(tiny_model_dir("qwen3"), max_total_tokens=256) as eng:
        with pytest.raises(InvalidArgumentError, match="request ids are strings"):
            eng.abort([["r1"]])
        assert len(eng.generate([3, 4, 5], GREEDY)[0].output_ids) == 4
