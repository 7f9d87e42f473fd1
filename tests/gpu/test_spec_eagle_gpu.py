"""EAGLE drafting on a GPU: Triton attention, decode and verify CUDA graphs (whose captures hold the
target's feature writes), float32 and bf16. Greedy outputs equal plain decoding's, a trained head's
drafts are accepted as on the CPU, the features the head reads are transformers' hidden states,
and they survive a release and resume of the KV memory."""

from __future__ import annotations

import pytest
import torch

from rollout import Engine, SamplingParams
from rollout.testing.eagle_head import train_eagle_head, write_eagle_target

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 42, 99, 100, 7, 5, 17, 42], [1, 2, 3, 1, 2, 3], [9, 8, 7, 6, 5, 9, 8] * 3]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True, n=2)
COMMON = dict(device="cuda", attention_backend="triton", max_total_tokens=1 << 14)


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict[str, str]:
    """The CPU tests' target and head (trained on the CPU in seconds)."""
    target = write_eagle_target(str(tmp_path_factory.mktemp("eagle-target")))
    return dict(target=target, trained=train_eagle_head(target, str(tmp_path_factory.mktemp("eagle-trained"))))


def _eagle(head: str, **options) -> dict:
    return {"speculative_method": "eagle", "draft_model_path": head, "num_draft_tokens": 3, **options}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_equals_plain_with_cuda_graphs(heads, engine_cores, dtype: str) -> None:
    with Engine(heads["target"], dtype=dtype, **COMMON) as engine:
        ref = engine.generate(PROMPTS, GREEDY, return_logprob=True, top_logprobs_num=2)
    with Engine(heads["target"], dtype=dtype, **COMMON, **_eagle(heads["trained"], speculative_min_acceptance=0.0)) \
            as engine:
        outs = engine.generate(PROMPTS, GREEDY, return_logprob=True)
        engine.check_integrity()
        info = engine.info()
        assert info.kv_used_tokens == 0
        runner = engine_cores[-1].runner
        assert runner.graphs is not None, "decode graphs were not captured"
        graphs = runner.verify_graphs
        assert graphs is not None and graphs.graphs and graphs.replays > 0, "verify steps did not replay graphs"
    # The CPU run of the same head accepts ~2.3 of 3 drafts; features missing from graph replays
    # would make it accept next to none.
    assert info.spec_accepted / info.spec_verified > (1.5 if dtype == "float32" else 1.0)
    for o, r in zip(outs, ref):
        if dtype == "float32":
            assert o.output_ids == r.output_ids
            assert o.output_logprobs == pytest.approx(r.output_logprobs, abs=1e-3)
            continue
        # bf16: a verify forward and a decode step round apart, so greedy may part at a near-tie only.
        j = next((i for i, (a, b) in enumerate(zip(o.output_ids, r.output_ids)) if a != b), None)
        if j is not None:
            top = r.output_top_logprobs[j]
            assert top.logprobs[0] - top.logprobs[1] < 0.1, (j, top, o.output_ids[j])


def _check_features(core, hf, outs) -> None:
    """The target's kept features at every computed position of the finished (cached) sequences."""
    for prompt, out in zip([p for p in PROMPTS for _ in range(GREEDY.n)], outs):
        tokens = prompt + out.output_ids
        cached = core.cache.tree.match_prefix(tokens, core.scheduler.weight_version, len(tokens))
        assert cached.length == len(tokens) - 1
        with torch.no_grad():
            want = hf.model(input_ids=torch.tensor([tokens])).last_hidden_state[0, : cached.length]
        got = core.runner.feature_store[cached.slots[: cached.length].to("cuda")].float().cpu()
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_features_from_graph_replays_survive_a_kv_release(heads, engine_cores) -> None:
    """Plain decode steps replay decode graphs between the speculative ones (min_acceptance 1: after
    the first rejection one step in 8 speculates); every position's feature is the target's. After
    releasing and resuming the KV memory and the graphs, the same holds."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(heads["target"], dtype=torch.float32).eval()
    options = _eagle(heads["trained"], num_draft_tokens=2, speculative_min_acceptance=1.0)
    with Engine(heads["target"], dtype="float32", **COMMON, **options) as engine:
        core = engine_cores[-1]
        before = engine.generate(PROMPTS, GREEDY)
        assert engine.info().spec_accepted > 0
        _check_features(core, hf, before)
        engine.pause()
        engine.release_memory(["kv_cache", "cuda_graph"])
        engine.resume_memory(["kv_cache", "cuda_graph"])
        engine.continue_()
        accepted = engine.info().spec_accepted
        after = engine.generate(PROMPTS, GREEDY)
        assert [o.output_ids for o in after] == [o.output_ids for o in before]
        assert engine.info().spec_accepted > accepted and core.runner.verify_graphs.replays > 0
        _check_features(core, hf, after)
        engine.check_integrity()
