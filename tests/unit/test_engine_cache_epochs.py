"""The prefix cache after weight writes and flushes: what may be reused, and that caching goes on."""

from __future__ import annotations

from rollout import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
PROMPT = [(5 * i + 7) % 300 + 20 for i in range(30)]


def test_a_flush_while_requests_run_keeps_caching_later_prompts(tiny_model_dir) -> None:
    with Engine(tiny_model_dir("qwen3"), max_total_tokens=4096) as engine:
        long = SamplingParams(temperature=0.0, max_new_tokens=200, ignore_eos=True)
        stream = engine.stream([3, 4, 5, 6], long, request_id="long")
        next(stream)
        engine.flush_cache()  # one request is live: its KV must not be cached, later ones must
        engine.abort("long")
        stream.close()
        engine.generate(PROMPT, GREEDY)
        [again] = engine.generate(PROMPT, GREEDY)
        assert again.cached_tokens == len(PROMPT) - 1, "the engine stopped caching prefixes after a flush"
        engine.check_integrity()
