"""Routed experts (``return_routed_experts``) equal Hugging Face's router top-k for every token.

The oracle runs one forward over prompt + output minus the last token (causal: each position's
routing depends on the tokens up to it only) and takes the top-k of each MoE layer's router logits.
"""

from __future__ import annotations

import numpy as np
import pytest

from rollout import Engine, SamplingParams
from rollout.engine.request_validation import RequestLimits, make_add_request
from rollout.errors import FailedPreconditionError, InvalidArgumentError
from tests.hf_oracle import hf_routed_experts

# Qwen3-MoE with a dense layer between two sparse ones (the layer axis skips it); Mixtral all sparse.
MODELS = {
    "qwen3_moe": dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=3, mlp_only_layers=(1,)),
    "mixtral": dict(num_experts=6, num_experts_per_tok=2),
}
MOE_LAYERS = {"qwen3_moe": 2, "mixtral": 2}
PROMPTS = [[7, 21, 3, 90, 41, 8, 13, 200, 5, 66, 12], [31, 4, 150, 9, 77, 2]]


def check_rows(path: str, prompt: list[int], out, layers: int, top_k: int) -> None:
    """``out``'s rows: P - 1 prompt rows, one per output token, equal to the oracle's in order."""
    assert out.prompt_routed_experts.dtype == np.int16 and out.routed_experts.dtype == np.int16
    assert out.prompt_routed_experts.shape == (len(prompt) - 1, layers, top_k)
    assert out.routed_experts.shape == (len(out.output_ids), layers, top_k) == (len(out.weight_versions), layers, top_k)
    ours = np.concatenate([out.prompt_routed_experts, out.routed_experts])
    ref = hf_routed_experts(path, prompt + out.output_ids[:-1])
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_routed_experts_match_transformers_with_chunks_and_cache(arch: str, tiny_model_dir) -> None:
    path = tiny_model_dir(arch, **MODELS[arch])
    k = MODELS[arch]["num_experts_per_tok"]
    sp = SamplingParams(temperature=0.0, max_new_tokens=5)
    # Chunks of 4 tokens: the prompt rows of the long prompt come from three steps.
    with Engine(path, enable_return_routed_experts=True, chunked_prefill_size=4) as engine:
        outs = engine.generate(PROMPTS, sp, return_routed_experts=True)
        for prompt, out in zip(PROMPTS, outs):
            check_rows(path, prompt, out, MOE_LAYERS[arch], k)
        # The same prompt again: its prefix comes from the prefix cache, with the routing kept with it.
        again = engine.generate(PROMPTS[0], sp, return_routed_experts=True)[0]
        assert again.cached_tokens > 0
        check_rows(path, PROMPTS[0], again, MOE_LAYERS[arch], k)
        np.testing.assert_array_equal(again.prompt_routed_experts, outs[0].prompt_routed_experts)
        # Requests that do not ask get no arrays.
        plain = engine.generate(PROMPTS[1], sp)[0]
        assert plain.routed_experts is None and plain.prompt_routed_experts is None
        engine.check_integrity()


def test_sampled_siblings_streamed_and_retracted(tiny_model_dir, engine_cores) -> None:
    """n = 3 sampled samples of one prompt (siblings read it from the prefix cache), streamed, on a KV
    pool so small that samples are retracted and recomputed in chunks: every sample's rows still match."""
    path = tiny_model_dir("qwen3_moe", **MODELS["qwen3_moe"])
    prompt = PROMPTS[0]
    sp = {"n": 3, "temperature": 1.0, "seed": 5, "max_new_tokens": 12}
    with Engine(path, enable_return_routed_experts=True, max_total_tokens=32, chunked_prefill_size=4) as engine:
        tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
        rows: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
        prompt_rows: dict[int, list[np.ndarray]] = {0: [], 1: [], 2: []}
        cached: dict[int, int] = {}
        for chunk in engine.stream(prompt, sp, return_routed_experts=True):
            assert chunk.routed_experts.shape == (len(chunk.token_ids), 2, 3)
            tokens[chunk.index] += chunk.token_ids
            rows[chunk.index].append(chunk.routed_experts)
            if chunk.prompt_routed_experts is not None:
                assert len(tokens[chunk.index]) == len(chunk.token_ids) > 0  # on the first chunk with a token
                prompt_rows[chunk.index].append(chunk.prompt_routed_experts)
            if chunk.finished:
                cached[chunk.index] = chunk.cached_tokens
        assert engine_cores[0].scheduler.num_retractions > 0
        engine.check_integrity()
    assert sum(1 for c in cached.values() if c > 0) >= 1  # a sibling read the prompt from the cache
    assert len({tuple(t) for t in tokens.values()}) > 1  # the samples differ
    for i in range(3):
        assert len(prompt_rows[i]) == 1
        ours = np.concatenate([prompt_rows[i][0], *rows[i]])
        np.testing.assert_array_equal(ours, hf_routed_experts(path, prompt + tokens[i][:-1]))


def test_nothing_is_read_back_unless_asked(tiny_model_dir, engine_cores) -> None:
    """On an engine that records routing, steps without a request that asks gather nothing."""
    path = tiny_model_dir("mixtral", **MODELS["mixtral"])
    with Engine(path, enable_return_routed_experts=True) as engine:
        runner = engine_cores[0].runner
        gathered = []
        gather = runner.routing.gather
        runner.routing.gather = lambda plan, table: gathered.append(gather(plan, table)) or gathered[-1]
        engine.generate(PROMPTS, {"temperature": 0.0, "max_new_tokens": 4})
        assert gathered and all(g is None for g in gathered)
        engine.generate(PROMPTS[1], {"temperature": 0.0, "max_new_tokens": 4}, return_routed_experts=True)
        assert any(g is not None for g in gathered)


def test_dense_model_refuses(tiny_model_dir) -> None:
    with Engine(tiny_model_dir("qwen3")) as engine:
        with pytest.raises(InvalidArgumentError, match="no MoE layers") as e:
            engine.generate([1, 2, 3], {"max_new_tokens": 2}, return_routed_experts=True)
        assert e.value.field == "return_routed_experts"
        assert engine.generate([1, 2, 3], {"max_new_tokens": 2})[0].completion_tokens == 2  # still serving
    with pytest.raises(InvalidArgumentError, match="no MoE layers"):
        Engine(tiny_model_dir("qwen3"), enable_return_routed_experts=True)


def test_speculation_with_routed_experts_refuses(tiny_model_dir) -> None:
    """Verify steps record no routing rows: the combination is refused at start, not failed mid-run."""
    with pytest.raises(InvalidArgumentError, match="does not return routed experts"):
        Engine(tiny_model_dir("qwen3_moe"), enable_return_routed_experts=True, speculative_method="ngram")


def test_moe_engine_without_recording_refuses() -> None:
    limits = RequestLimits(vocab_size=100, context_length=64, max_total_tokens=64, num_moe_layers=2)
    with pytest.raises(FailedPreconditionError, match="enable_return_routed_experts"):
        make_add_request("r", input_ids=[1, 2], text=None, sampling=SamplingParams(), limits=limits,
                         tokenizer=None, return_routed_experts=True)
    on = RequestLimits(vocab_size=100, context_length=64, max_total_tokens=64, num_moe_layers=2, routed_experts=True)
    req = make_add_request("r", input_ids=[1, 2], text=None, sampling=SamplingParams(max_new_tokens=8), limits=on,
                           tokenizer=None, return_routed_experts=True)
    assert req.return_routed_experts
