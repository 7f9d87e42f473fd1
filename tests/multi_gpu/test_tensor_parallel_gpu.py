"""Two engine ranks on two GPUs (NCCL, CUDA graphs on) against one GPU, in bfloat16.

The models are trained briefly (``rollout.testing.trained_model``) so their greedy choices have a
margin wider than bfloat16's rounding differences between one and two ranks.
"""

from __future__ import annotations

import pytest

from rollout import Engine, SamplingParams
from rollout.testing.trained_model import progression, train_briefly

pytestmark = pytest.mark.multi_gpu

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
OPTS = dict(device="cuda:0", dtype="bfloat16", max_total_tokens=8192)
LOGPROB_TOL = 0.1  # bf16 logits over a small vocabulary


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    def make(arch: str, **kw) -> str:
        base = tiny_model_dir(arch, hidden_size=256, intermediate_size=512, head_dim=64, **kw)
        return train_briefly(base, str(tmp_path_factory.mktemp(f"trained-{arch}")), steps=300, device="cuda:0")
    return make


def _prompts(vocab: int) -> list[list[int]]:
    return [progression(a, d, 8, vocab) for a, d in ((10, 3), (200, 5), (50, 1), (120, 7))]


def _compare(path: str, **parallel) -> None:
    with Engine(path, **OPTS) as one:
        prompts = _prompts(one.limits.vocab_size)
        want = one.generate(prompts, GREEDY, return_logprob=True)
    with Engine(path, **OPTS, **parallel) as two:
        got = two.generate(prompts, GREEDY, return_logprob=True)
        info = two.info()
        assert info.tp_size == 2
        # Decode ran in CUDA graphs on both ranks.
        assert all(rank["cuda_graph"]["bytes"] > 0 for rank in info.rank_memory)
    for w, g in zip(want, got):
        assert g.output_ids == w.output_ids
        assert max(abs(a - b) for a, b in zip(w.output_logprobs, g.output_logprobs)) < LOGPROB_TOL


def test_tp2_matches_one_gpu(trained) -> None:
    _compare(trained("qwen3", num_attention_heads=8, num_key_value_heads=2), tp_size=2)


def test_tp2_with_one_kv_head_matches_one_gpu(trained) -> None:
    _compare(trained("llama", num_attention_heads=4, num_key_value_heads=1), tp_size=2)


def test_ep2_matches_one_gpu(trained) -> None:
    _compare(trained("qwen3_moe", num_experts=7, num_experts_per_tok=3), ep_size=2, ep_spare_slots=1)
