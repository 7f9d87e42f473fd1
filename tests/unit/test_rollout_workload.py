"""The rollout-step workload: seeded long-tailed lengths, the shared prefix, and the step's figures."""

from __future__ import annotations

import pytest

from rollout.errors import InvalidArgumentError
from rollout.testing.rollout_workload import RolloutWorkload, SampleRecord, summarize_rollout
from rollout.types import FinishReason


def build(**kw) -> RolloutWorkload:
    args = dict(num_prompts=32, samples=8, prefix_len=10, prompt_len=5, max_new_tokens=2000,
                median_new_tokens=100, sigma=1.2, vocab=1000, seed=7)
    return RolloutWorkload.build(**{**args, **kw})


def test_lengths_are_seeded_long_tailed_and_capped() -> None:
    wl = build()
    assert wl == build() and build(seed=8).output_lens != wl.output_lens
    flat = sorted(x for row in wl.output_lens for x in row)
    assert len(wl.output_lens) == 32 and all(len(row) == 8 for row in wl.output_lens)
    assert 1 <= flat[0] and flat[-1] == 2000
    # Most samples are short, a few are long: the median sits near the asked one, far below the cap.
    assert 50 <= flat[len(flat) // 2] <= 200 and flat[int(0.99 * len(flat))] > 5 * flat[len(flat) // 2]
    # A draw that would stay under the cap everywhere still puts one sample at it.
    short = build(sigma=0.0, median_new_tokens=3)
    assert sorted(x for row in short.output_lens for x in row)[-2:] == [3, 2000]


def test_prompts_share_the_prefix_and_requests_carry_the_lengths() -> None:
    wl = build(num_prompts=3, samples=2)
    assert all(p[:10] == wl.prompts[0][:10] and len(p) == 15 for p in wl.prompts)
    assert len({tuple(p) for p in wl.prompts}) == 3
    reqs = wl.requests()
    assert [r[0] for r in reqs] == ["p0-s0", "p0-s1", "p1-s0", "p1-s1", "p2-s0", "p2-s1"]
    assert [r[2].max_new_tokens for r in reqs] == [x for row in wl.output_lens for x in row]
    assert all(r[2].ignore_eos and r[2].temperature == 1.0 for r in reqs)
    assert len({r[2].seed for r in reqs}) == 6
    # A perfect cache: prompt 0 computes all 15 tokens once; prompts 1 and 2 reuse the 10-token
    # prefix; each second sample reuses its prompt but the last token.
    assert wl.best_cached_tokens() == 2 * 10 + 3 * 14
    assert wl.best_cached_tokens(page_size=4) == 2 * 8 + 3 * 12


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        build(samples=0)
    with pytest.raises(InvalidArgumentError):
        build(median_new_tokens=0)


def test_summary_of_synthetic_records() -> None:
    """Ten samples ending at 1..10 s: the tail is the last one (10% of ten), from 9 s to 10 s."""
    wl = build(num_prompts=5, samples=2, prefix_len=2, prompt_len=2)
    records = []
    for k in range(10):
        n = k + 1
        rec = SampleRecord(f"r{k}", n, 4, start=100.0, finish_time=101.0 + k, finish_reason=FinishReason.LENGTH,
                           completion_tokens=n, cached_tokens=2 if k else 0)
        # n tokens, one chunk each, the first at 100.5 s and the last at the finish.
        rec.chunk_times = [100.5 + (0.5 + k) * i / max(n - 1, 1) for i in range(n)]
        rec.chunk_tokens = [1] * n
        rec.logprobs = [-1.0] * n
        records.append(rec)
    f = summarize_rollout(records, 100.0, wl)
    assert f["successful_requests"] == 10 and f["total_output_tokens"] == 55
    assert f["makespan_s"] == pytest.approx(10.0) and f["tail_s"] == pytest.approx(1.0)
    assert f["tail_tokens"] == 1  # only the 10-token sample's last token arrives after 9 s
    assert f["prefix_hit_rate"] == pytest.approx(18 / 40)
    assert f["p50_ttft_ms"] == pytest.approx(500.0) and f["output_throughput"] == pytest.approx(5.5)
    # A sample that ended short of its length, or without a logprob per token, is not successful.
    records[0].completion_tokens = 0
    records[1].logprobs = [-1.0]
    assert summarize_rollout(records, 100.0, wl)["successful_requests"] == 8
