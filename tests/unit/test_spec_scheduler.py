"""The scheduler's side of speculative steps, with hand-made results (no model): plans that carry
drafts, accepted runs cut at a stop, rejected drafts' KV slots given back and never cached."""

from __future__ import annotations

import pytest

from rollout.batch import StepResult
from rollout.cache.manager import KVCacheManager
from rollout.config import SchedulerConfig
from rollout.scheduler.scheduler import Scheduler
from rollout.scheduler.sequence import SeqStatus, Sequence
from rollout.scheduler.stop import StopChecker
from rollout.types import FinishReason, SamplingParams

PROMPT = [10, 11, 12, 13]
STOP = 99


def _setup(page_size: int = 1, **sampling) -> tuple[Scheduler, KVCacheManager, Sequence]:
    cache = KVCacheManager(num_slots=64, page_size=page_size, max_requests=4, max_context=64, device="cpu")
    sched = Scheduler(SchedulerConfig(max_running_requests=2), cache, StopChecker((0,), 60, None))
    sp = SamplingParams(temperature=0.0, max_new_tokens=sampling.pop("max_new_tokens", 20),
                        stop_token_ids=[STOP], **sampling)
    seq = Sequence(uid=1, request_id="r", index=0, prompt_ids=list(PROMPT), sampling=sp, seed=0, prompt_key=0,
                   arrival=0)
    sched.add([seq])
    plan, seqs = sched.schedule()  # the prompt, one sample
    sched.launched(plan, seqs)
    sched.collect(plan, seqs, StepResult([20]))
    return sched, cache, seq


def _spec_step(sched: Scheduler, seq: Sequence, drafts: list[int], rows: list[int], accepted: int):
    seq.drafts = drafts
    plan, seqs = sched.schedule()
    assert plan.spec is not None and plan.spec.num_drafts == [len(drafts)]
    sched.launched(plan, seqs)
    sched.collect(plan, seqs, StepResult(rows), [accepted])
    return plan


@pytest.mark.parametrize("page_size", [1, 4])
def test_rejected_drafts_give_their_slots_back(page_size: int) -> None:
    sched, cache, seq = _setup(page_size)
    plan = _spec_step(sched, seq, [21, 22, 23], rows=[21, 30, 31, 32], accepted=1)
    # The last known token then the drafts, at positions 4..7; four rows sampled.
    assert plan.input_ids == [20, 21, 22, 23] and plan.prefix_lens == [4] and plan.extend_lens == [4]
    assert plan.steps == [1] and len(plan.spec.banned) == 4
    assert seq.output_ids == [20, 21, 30]  # d1 accepted, the second row's draw replaces d2
    assert seq.num_computed == 6  # KV of 20 and 21 is the sequence's; 30 has none yet
    assert len(seq.handle.pages) == -(-6 // page_size), "pages of rejected drafts are still held"
    cache.check_integrity()
    # The next plan starts right after the accepted run.
    seq.drafts = []
    plan, seqs = sched.schedule()
    assert plan.prefix_lens == [6] and plan.input_ids == [30] and plan.spec is None


def test_stop_inside_an_accepted_run_ends_there_and_caches_only_computed_kv() -> None:
    sched, cache, seq = _setup()
    _spec_step(sched, seq, [21, STOP, 23], rows=[21, STOP, 23, 40], accepted=3)
    assert seq.status is SeqStatus.FINISHED and seq.finish_reason is FinishReason.STOP
    assert seq.output_ids == [20, 21, STOP] and seq.matched_stop == STOP
    cache.check_integrity()
    assert cache.used_tokens() == 0
    # Cached: the prompt and outputs whose KV was computed by the sequence's own inputs.
    assert cache.cached_tokens() == len(PROMPT) + 3


def test_a_rejection_is_not_cached_with_the_drafts_kv() -> None:
    sched, cache, seq = _setup(max_new_tokens=4)
    _spec_step(sched, seq, [21, 22], rows=[21, 30, 31], accepted=1)  # ends by length at 30
    assert seq.output_ids == [20, 21, 30] and seq.status is SeqStatus.RUNNING
    _spec_step(sched, seq, [31], rows=[50, 51], accepted=0)
    assert seq.finish_reason is FinishReason.LENGTH and seq.output_ids == [20, 21, 30, 50]
    # Positions 0..6 hold the KV of PROMPT + [20, 21, 30]; 50 was never an input (its slot held
    # the rejected draft 31), so it must not be cached.
    assert cache.cached_tokens() == len(PROMPT) + 3
    cache.check_integrity()


def test_banned_rows_follow_min_new_tokens() -> None:
    sched, _, seq = _setup(min_new_tokens=3)
    seq.drafts = [21, 22, 23]
    plan, _ = sched.schedule()
    # One output exists: rows 0 and 1 are draws 2 and 3 (banned), rows 2 and 3 are free.
    banned = [b or [] for b in plan.spec.banned]
    assert [STOP in b for b in banned] == [True, True, False, False]


def test_a_short_budget_cuts_drafts() -> None:
    sched, _, seq = _setup()
    sched.config = SchedulerConfig(max_running_requests=2, max_num_batched_tokens=2)
    seq.drafts = [21, 22, 23]
    plan, _ = sched.schedule()
    assert plan.extend_lens == [2] and plan.spec.num_drafts == [1] and plan.input_ids == [20, 21]


def test_ngram_lookups_back_off_while_they_find_nothing() -> None:
    """A sequence whose lookups find nothing waits 2, 4, 8, 16, 16 tokens before the next one (so
    steps keep overlap scheduling); a hit resets the wait."""
    from rollout.spec.ngram import NgramIndex

    state, length, waits = NgramIndex(), 10, []
    for _ in range(5):
        assert state.due(length)
        state.found([], length)
        wait = next(w for w in range(1, 64) if state.due(length + w))
        assert not state.due(length + wait - 1)
        waits.append(wait)
        length += wait
    assert waits == [2, 4, 8, 16, 16]
    state.found([7, 8], length)
    state.found([], length + 1)
    assert state.due(length + 3) and not state.due(length + 2)
