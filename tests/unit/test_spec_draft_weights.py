"""Weight updates of a draft model: ``draft.`` tensors go to the draft, keep it current and drafting;
target-only updates leave it stale; draft names without a draft model are refused, nothing written.

The pushed draft is the new target itself, so under greedy decoding every draft made after the push
is accepted: that shows the draft runs on the pushed weights, not on its old ones.
"""

from __future__ import annotations

import os

import pytest
import torch

import weight_sync
from rollout import Engine, SamplingParams
from rollout.errors import InvalidArgumentError
from rollout.models.loader import iter_checkpoint
from tests.weight_helpers import perturb_checkpoint, write_checkpoint

PROMPTS = [[3, 4] * 5 + [3], [5, 17, 42, 99, 100, 7, 5, 17, 42]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
BUCKET = 16 << 10


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict:
    """A peaky target, a draft of the same shapes, and a perturbed target (a directory with the draft
    checkpoint ``draft/`` beside it too, for disk updates)."""
    target = tiny_model_dir("qwen3", num_hidden_layers=1, init_std=1.0)
    new, new_dir = perturb_checkpoint(target, str(tmp_path_factory.mktemp("new")), seed=5)
    with_draft = str(tmp_path_factory.mktemp("with-draft"))
    write_checkpoint(target, new, with_draft)
    os.mkdir(os.path.join(with_draft, "draft"))
    write_checkpoint(target, new, os.path.join(with_draft, "draft"))
    return dict(target=target, draft=tiny_model_dir("qwen3", num_hidden_layers=1, init_std=0.7), new=new,
                new_dir=new_dir, with_draft=with_draft, old=dict(iter_checkpoint(target)))


def _plain(path: str) -> list[list[int]]:
    with Engine(path) as engine:
        return [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]


def _with_draft(weights: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """An update of the target's and the draft's weights, both set to ``weights``."""
    return [*weights.items(), *((f"draft.{n}", t) for n, t in weights.items())]


class Run:
    """Greedy outputs of a speculative engine, and the drafts proposed / accepted for them."""

    def __init__(self, engine: Engine, core) -> None:
        self.engine, self.policy = engine, core.spec.policy

    def __call__(self) -> tuple[list[list[int]], int, int]:
        drafted, accepted = self.policy.drafted, self.policy.accepted
        outs = [o.output_ids for o in self.engine.generate(PROMPTS, GREEDY)]
        return outs, self.policy.drafted - drafted, self.policy.accepted - accepted


def test_draft_pushes_keep_drafting_and_target_pushes_leave_it_stale(models, engine_cores) -> None:
    old_out, new_out = _plain(models["target"]), _plain(models["new_dir"])
    assert old_out != new_out, "the new target must change the greedy output"
    with Engine(models["target"], speculative_method="draft", draft_model_path=models["draft"],
                num_draft_tokens=3) as engine:
        core = engine_cores[-1]
        run = Run(engine, core)
        out, drafted, accepted = run()
        assert out == old_out and 0 < accepted < drafted  # the old draft: some drafts rejected

        def draft_equals_target() -> bool:
            target = dict(core.runner.model.named_parameters())
            return all(torch.equal(p, target[n]) for n, p in core.spec.draft.runner.model.named_parameters())

        with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            bad = {**dict(_with_draft(models["new"])), "draft.model.norm.weight": torch.ones(3)}
            with pytest.raises(InvalidArgumentError, match=r"^draft\.model\.norm\.weight: .*shape mismatch"):
                group.push(bad.items(), version=4)  # checked against the draft's names and shapes
            assert engine.info().weight_version == 0 and run()[0] == old_out
            assert group.push(_with_draft(models["new"]), version=5) == 5
        out, drafted, accepted = run()
        assert out == new_out and accepted == drafted > 0  # drafting on, from the pushed draft
        assert draft_equals_target()

        # A target-only update leaves the draft stale: "disable" stops drafting.
        assert weight_sync.push_tensors_shm([engine], models["old"].items(), version=6) == 6
        out, drafted, _ = run()
        assert out == old_out and drafted == 0
        assert weight_sync.push_tensors_shm([engine], _with_draft(models["old"]), version=7) == 7
        out, drafted, accepted = run()
        assert out == old_out and accepted == drafted > 0 and draft_equals_target()

        # Disk (the draft's checkpoint in draft/), received beside the loop in swap mode.
        result = engine.update_weights_from_disk(models["with_draft"], version=8, swap=True)
        assert result.weight_version == 8 and result.swapped
        out, drafted, accepted = run()
        assert out == new_out and accepted == drafted > 0 and draft_equals_target()
        engine.check_integrity()


def test_draft_names_without_a_draft_model_are_refused(models) -> None:
    old_out = _plain(models["target"])
    with Engine(models["target"]) as engine:
        with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            with pytest.raises(InvalidArgumentError, match=r"^draft\..*no draft model.*nothing was written"):
                group.push(_with_draft(models["new"]), version=3)
        with pytest.raises(InvalidArgumentError, match="no draft model"):
            weight_sync.push_tensors_shm([engine], _with_draft(models["new"]), version=3)
        with pytest.raises(InvalidArgumentError, match="no draft model"):
            engine.update_weights_from_disk(models["with_draft"], version=3)
        assert engine.info().weight_version == 0 and engine.info().weights_valid
        assert [o.output_ids for o in engine.generate(PROMPTS, GREEDY)] == old_out


def test_a_target_update_before_any_step_leaves_the_draft_stale(models, engine_cores) -> None:
    with Engine(models["target"], speculative_method="draft", draft_model_path=models["target"]) as engine:
        assert weight_sync.push_tensors_shm([engine], models["new"].items(), version=2) == 2
        _, drafted, _ = Run(engine, engine_cores[-1])()
    assert drafted == 0  # the draft went with version 0, not with the first version it drafted under


def test_the_draft_models_memory_goes_and_comes_back_with_the_engines(models, engine_cores) -> None:
    """A release frees the draft model's weights, KV and graphs too (it kept them). With the weights
    backed up the draft comes back current and drafting; without, it is stale until a push carries it."""
    old_out = _plain(models["target"])
    opts = dict(speculative_method="draft", draft_model_path=models["draft"], num_draft_tokens=3)
    with Engine(models["target"], memory_backup_tags=["weights"], **opts) as engine:
        core = engine_cores[-1]
        run = Run(engine, core)
        assert run()[0] == old_out
        draft_saver = core.spec.draft.runner.memory.saver
        held = {tag: int(state["bytes"]) for tag, state in draft_saver.states().items()}
        assert held["weights"] > 0 and held["kv_cache"] > 0
        before = engine.info().memory
        states = engine.release_memory()
        assert all(s["state"] == "released" for s in draft_saver.states().values())
        assert states["weights"]["bytes"] == before["weights"]["bytes"]  # the draft's bytes counted in
        engine.resume_memory()
        assert all(s["state"] == "active" for s in draft_saver.states().values())
        out, drafted, accepted = run()
        assert out == old_out and drafted > 0  # backed up: still drafting
        engine.check_integrity()
    with Engine(models["target"], **opts) as engine:
        core = engine_cores[-1]
        run = Run(engine, core)
        engine.release_memory()
        engine.resume_memory()
        assert weight_sync.push_tensors_shm([engine], models["old"].items(), version=1) == 1
        out, drafted, _ = run()
        assert out == old_out and drafted == 0  # the draft's weights were lost: stale, no drafting
        assert weight_sync.push_tensors_shm([engine], _with_draft(models["old"]), version=2) == 2
        out, drafted, accepted = run()
        assert out == old_out and drafted > 0


def test_the_draft_models_graph_bytes_count_in_cuda_graph(models, engine_cores) -> None:
    """The draft's decode graphs are torch-allocated like the target's: their bytes are added to the
    cuda_graph tag (a CPU stand-in for a GPU capture sets them here)."""
    opts = dict(speculative_method="draft", draft_model_path=models["draft"], num_draft_tokens=3)
    with Engine(models["target"], **opts) as engine:
        runner = engine_cores[-1].spec.draft.runner
        base = engine.info().memory["cuda_graph"]["bytes"]
        runner.graphs, runner.graph_bytes = object(), 1 << 20
        try:
            assert engine.info().memory["cuda_graph"]["bytes"] == base + (1 << 20)
        finally:
            runner.graphs, runner.graph_bytes = None, 0
