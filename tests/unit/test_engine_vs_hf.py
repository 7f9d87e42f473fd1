"""Greedy generation matches Hugging Face transformers token for token, logprobs within 1e-4."""

from __future__ import annotations

import random

import pytest

from rollout import Engine, SamplingParams
from rollout.config import ModelConfig
from tests.hf_oracle import hf_generate, hf_greedy

ARCHS = ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"]
MAX_NEW = 12


def prompts_with_shared_prefix(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 300) for _ in range(9)]
    return [
        shared + [rng.randrange(3, 300) for _ in range(4)],
        [rng.randrange(3, 300) for _ in range(3)],
        shared + [rng.randrange(3, 300) for _ in range(11)],
        [rng.randrange(3, 300) for _ in range(21)],
        shared,
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(arch: str, tiny_model_dir) -> None:
    path = tiny_model_dir(arch)
    eos = ModelConfig.from_pretrained(path).eos_token_ids
    prompts = prompts_with_shared_prefix()
    with Engine(path) as engine:
        outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW),
                               return_logprob=True)
        engine.check_integrity()
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs):
        ref_tokens, ref_lps = hf_greedy(path, prompt, MAX_NEW, eos)
        assert out.output_ids == ref_tokens, f"{arch}: prompt of {len(prompt)} tokens"
        assert out.prompt_tokens == len(prompt)
        assert out.finish_reason.value == ("stop" if ref_tokens[-1] in eos else "length")
        assert max(abs(a - b) for a, b in zip(out.output_logprobs, ref_lps)) < 1e-4
    # The oracle itself agrees with transformers' own generate().
    assert outs[1].output_ids[:MAX_NEW] == hf_generate(path, prompts[1], MAX_NEW)[: len(outs[1].output_ids)]
