"""Prompts that share a long prefix and arrive together compute it once (the RL rollout step)."""

from __future__ import annotations

import random

from rollout import Engine, SamplingParams
from rollout.scheduler.shared_prefix import MIN_SHARED, common_prefix

SYSTEM = [(7 * i + 3) % 300 + 10 for i in range(48)]  # a 48-token "system prompt"
PROMPTS = [SYSTEM + [i + 1, i + 2, i + 3] for i in range(4)] + [[5, 6, 7]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4)


def test_common_prefix_against_a_plain_loop() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 700))]
        k = rng.randrange(0, len(a) + 1)
        b = a[:k] + [rng.randrange(4, 8) for _ in range(rng.randrange(0, 20))]
        want = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == want


def test_prompts_sharing_a_system_prompt_compute_it_once(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path, enable_prefix_cache=False) as plain:
        want = [o.output_ids for o in plain.generate(PROMPTS, GREEDY)]
    with Engine(path) as engine:
        outs = engine.generate(PROMPTS, GREEDY)  # one call: every prompt waits in the queue at once
        engine.check_integrity()
    assert [o.output_ids for o in outs] == want
    # The first computes the system prompt; the other three take it from the cache.
    assert sorted(o.cached_tokens for o in outs[:4]) == [0, len(SYSTEM), len(SYSTEM), len(SYSTEM)]
    assert outs[4].cached_tokens == 0 and len(SYSTEM) >= MIN_SHARED
