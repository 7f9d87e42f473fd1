"""The prompts ``examples/profile_decode.py`` decodes from: spread lengths, long ones, shared groups."""

from __future__ import annotations

from examples.profile_decode import make_prompts, prompt_lengths


def test_equal_lengths_by_default():
    assert prompt_lengths(4, 10, 0.0, 0.0) == [10, 10, 10, 10]


def test_spread_and_long_lengths():
    lens = prompt_lengths(40, 100, 0.5, 0.05)
    long = [n for n in lens if n > 150]
    assert len(long) == 2 and all(250 <= n <= 750 for n in long)  # ceil(5% of 40), each 5x of 50..150
    assert all(50 <= n <= 150 for n in lens if n <= 150)
    assert len(set(lens)) > 10
    assert prompt_lengths(3, 10, 0.0, 0.01).count(50) == 1  # at least one long sequence


def test_groups_share_their_first_prompt():
    prompts = make_prompts(6, 12, 0.5, 0.0, group=3, vocab=50)
    assert prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[4] == prompts[5]
    assert prompts[0] != prompts[3]
    assert all(0 <= t < 50 for p in prompts for t in p)
    alone = make_prompts(3, 12, 0.0, 0.0, group=1, vocab=50)
    assert len({tuple(p) for p in alone}) == 3
