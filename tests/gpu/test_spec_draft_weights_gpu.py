"""Draft-model weight updates on a GPU: ``draft.`` tensors written in place and, in swap mode, copied
aside on the side stream and written at the switch; the draft then drafts from them."""

from __future__ import annotations

import pytest

import weight_sync
from rollout import Engine, SamplingParams
from tests.weight_helpers import perturb_checkpoint

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 42, 99, 100, 7, 5, 17, 42], [1, 2, 3, 1, 2, 3]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True)
OPTS = dict(device="cuda", dtype="float32", attention_backend="triton", max_total_tokens=1 << 14)


@pytest.mark.parametrize("swap", [False, True], ids=["in-place", "swap"])
def test_draft_push_on_gpu(tiny_model_dir, tmp_path, engine_cores, swap: bool) -> None:
    shape = dict(hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=1024, init_std=0.08)
    target = tiny_model_dir("qwen3", num_hidden_layers=2, **shape)
    draft = tiny_model_dir("qwen3", num_hidden_layers=2, **{**shape, "init_std": 0.05})  # the target's shapes
    new, new_dir = perturb_checkpoint(target, str(tmp_path), seed=3)
    with Engine(new_dir, **OPTS) as engine:
        want = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]
    with Engine(target, speculative_method="draft", draft_model_path=draft, **OPTS) as engine:
        policy = engine_cores[-1].spec.policy
        named = [*new.items(), *((f"draft.{n}", t) for n, t in new.items())]  # the draft: the new target
        result = weight_sync.push_tensors_shm([engine], named, version=3, swap=swap)
        assert (result.weight_version if swap else result) == 3
        assert not swap or result.swapped
        drafted, accepted = policy.drafted, policy.accepted
        outs = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]
        engine.check_integrity()
    assert outs == want
    drafted, accepted = policy.drafted - drafted, policy.accepted - accepted
    assert drafted > 0 and accepted > 0.9 * drafted  # drafting goes on, from the pushed weights


def test_draft_memory_is_released_and_its_graphs_come_back(tiny_model_dir, engine_cores) -> None:
    """release_memory() unmaps the draft model's weights, KV and graphs too; after the resume (weights
    backed up) its decode graphs are captured again and it drafts as before, with the same output."""
    shape = dict(hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=1024, init_std=0.08)
    target = tiny_model_dir("qwen3", num_hidden_layers=2, **shape)
    with Engine(target, speculative_method="draft", draft_model_path=target, memory_backup_tags=["weights"],
                **OPTS) as engine:
        core = engine_cores[-1]
        want = [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]
        draft = core.spec.draft.runner
        assert draft.graphs is not None
        engine.release_memory()
        assert draft.graphs is None
        assert all(s["state"] == "released" for s in draft.memory.saver.states().values())
        engine.resume_memory()
        assert draft.graphs is not None
        policy = core.spec.policy
        drafted, accepted = policy.drafted, policy.accepted
        assert [o.output_ids for o in engine.generate(PROMPTS, GREEDY)] == want
        engine.check_integrity()
    assert policy.drafted > drafted and policy.accepted - accepted > 0.9 * (policy.drafted - drafted)
