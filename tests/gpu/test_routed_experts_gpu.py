"""Routed experts on a GPU: CUDA-graph decode records the same routing as eager steps and as HF."""

from __future__ import annotations

import numpy as np
import pytest

from rollout import Engine, SamplingParams
from tests.hf_oracle import hf_routed_experts

pytestmark = pytest.mark.gpu

PROMPTS = [[7, 21, 3, 90, 41, 8, 13, 200, 5, 66, 12, 4], [31, 4, 150, 9, 77, 2], [300, 12, 55]]


@pytest.fixture(scope="module")
def moe_dir(tiny_model_dir):
    return tiny_model_dir("qwen3_moe", hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                          moe_intermediate_size=128, vocab_size=512, mlp_only_layers=(1,))


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_graph_replay_records_the_routing_of_eager_steps_and_of_transformers(moe_dir, backend) -> None:
    if backend == "flashinfer":
        pytest.importorskip("flashinfer")
    sp = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    # flashinfer attends in 16-bit only: there the graphed run is compared with the eager one alone.
    dtype = "bfloat16" if backend == "flashinfer" else "float32"
    opts = dict(device="cuda", dtype=dtype, attention_backend=backend, enable_return_routed_experts=True,
                max_total_tokens=1 << 14)
    with Engine(moe_dir, cuda_graph_max_bs=0, **opts) as eager:
        ref = eager.generate(PROMPTS, sp, return_routed_experts=True)
    with Engine(moe_dir, **opts) as graphed:
        assert graphed.generate(PROMPTS[0], sp)[0].routed_experts is None
        outs = graphed.generate(PROMPTS, sp, return_routed_experts=True)
        again = graphed.generate(PROMPTS[0], sp, return_routed_experts=True)[0]  # prompt from the cache
        graphed.check_integrity()
    assert again.cached_tokens > 0
    np.testing.assert_array_equal(again.prompt_routed_experts, outs[0].prompt_routed_experts)
    for prompt, o, r in zip(PROMPTS, outs, ref):
        assert o.output_ids == r.output_ids
        np.testing.assert_array_equal(o.routed_experts, r.routed_experts)
        np.testing.assert_array_equal(o.prompt_routed_experts, r.prompt_routed_experts)
        if dtype != "float32":
            continue
        ours = np.concatenate([o.prompt_routed_experts, o.routed_experts])  # (P + n - 1, 2, 4)
        hf = hf_routed_experts(moe_dir, prompt + o.output_ids[:-1])
        # Same experts per token and layer as the CPU oracle (GPU rounding may swap two close scores).
        np.testing.assert_array_equal(np.sort(ours, -1), np.sort(hf, -1))
