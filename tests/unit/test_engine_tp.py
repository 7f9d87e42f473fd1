"""The whole engine at tp_size=2 (two gloo ranks on CPU) against tp_size=1.

Each case runs the same requests through a one-rank engine and a two-rank one: chunked prompts, a
shared prefix served from the radix cache on the second pass, greedy and seeded sampling with n=2.
Greedy tokens must be equal and logprobs within 1e-4 (float32); the seeded samples too (rank 0
samples from logits equal to ~1e-6, and broadcasts its tokens).
"""

from __future__ import annotations

import pytest

from rollout import Engine, SamplingParams

TOL = 1e-4
OPTS = dict(max_total_tokens=1024, chunked_prefill_size=4, max_running_requests=8)
# name -> (arch, write_random_model options)
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    # One kv head for two ranks (replicated), three query heads per rank, an odd vocab (padded slice).
    "llama-kv1": ("llama", {"num_attention_heads": 6, "num_key_value_heads": 1, "vocab_size": 383}),
    "qwen2": ("qwen2", {}),
    "qwen3-kv1": ("qwen3", {"num_key_value_heads": 1}),
    "qwen3_moe": ("qwen3_moe", {"mlp_only_layers": (0,)}),
    "mixtral": ("mixtral", {}),
}
PREFIX = [5, 9, 14, 3, 27, 31, 8, 2, 40]
PROMPTS = [PREFIX + [11, 12], PREFIX + [60], [70, 71, 72], PREFIX]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=5, n=2, seed=17)


def _run(engine: Engine) -> list:
    outs = engine.generate(PROMPTS, GREEDY, return_logprob=True)
    outs += engine.generate(PROMPTS, GREEDY, return_logprob=True)  # the prefix now comes from the cache
    outs += engine.generate(PROMPTS[:2], SAMPLED, return_logprob=True)
    return outs


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_generate_what_one_rank_generates(tiny_model_dir, name: str) -> None:
    arch, kw = CASES[name]
    path = tiny_model_dir(arch, **kw)
    with Engine(path, **OPTS) as one:
        want = _run(one)
    with Engine(path, tp_size=2, **OPTS) as two:
        got = _run(two)
        info = two.info()
        assert info.tp_size == 2 and two.engine_ranks() == 2
        assert len(info.rank_memory) == 2
        assert info.kv_cached_tokens > 0
        two.check_integrity()
    assert sum(o.cached_tokens for o in got[len(PROMPTS):2 * len(PROMPTS)]) > 0
    for w, g in zip(want, got):
        assert g.output_ids == w.output_ids
        assert max(abs(a - b) for a, b in zip(w.output_logprobs, g.output_logprobs)) < TOL


def test_three_ranks_generate_what_one_rank_generates(tiny_model_dir) -> None:
    """Nothing assumes two ranks: three, with three kv heads and an odd vocabulary."""
    path = tiny_model_dir("qwen3", num_attention_heads=6, num_key_value_heads=3, intermediate_size=96,
                          vocab_size=385)
    with Engine(path, **OPTS) as one:
        want = one.generate(PROMPTS, GREEDY, return_logprob=True)
    with Engine(path, tp_size=3, **OPTS) as three:
        got = three.generate(PROMPTS, GREEDY, return_logprob=True)
        assert len(three.info().rank_memory) == 3
    for w, g in zip(want, got):
        assert g.output_ids == w.output_ids
        assert max(abs(a - b) for a, b in zip(w.output_logprobs, g.output_logprobs)) < TOL


def test_a_tp_size_the_heads_cannot_split_over_is_refused_by_name(tiny_model_dir) -> None:
    from rollout.errors import InvalidArgumentError

    path = tiny_model_dir("llama", num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(InvalidArgumentError, match="tp_size.*6 attention heads do not divide over 4 ranks"):
        Engine(path, tp_size=4)
    with pytest.raises(InvalidArgumentError, match="tp_size.*integer"):
        Engine(path, tp_size=0)
