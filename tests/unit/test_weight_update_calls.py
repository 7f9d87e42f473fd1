"""An update sent in several calls (``more``): generation waits for the last call, the calls count as
one update, and a call that fails once earlier ones were written leaves the weights invalid (never a
mix of two versions that generates)."""

from __future__ import annotations

import pytest
import torch

import weight_sync
from rollout import Engine, SamplingParams
from rollout.errors import FailedPreconditionError
from rollout.models.loader import iter_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
PROMPT = [3, 4, 5, 6]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def halves(model_dir) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    items = [(n, t + 0.5 * t.float().std() * torch.randn(t.shape, generator=gen).to(t.dtype))
             for n, t in iter_checkpoint(model_dir)]
    return items[: len(items) // 2], items[len(items) // 2:]


def test_two_calls_are_one_update(model_dir, halves) -> None:
    first, second = halves
    with Engine(model_dir, max_total_tokens=1024) as engine:
        assert weight_sync.push_tensors_shm([engine], first + second, version=1) == 1
        want = engine.generate(PROMPT, GREEDY)[0].output_ids
        engine.update_weights_from_disk(model_dir, version=2)  # the old weights again
        assert engine.generate(PROMPT, GREEDY)[0].output_ids != want
        assert weight_sync.push_tensors_shm([engine], first, version=3, more=True) == 3
        with pytest.raises(FailedPreconditionError, match="waits for its last call"):
            engine.generate(PROMPT, GREEDY)
        assert engine.info().weight_version == 2
        assert weight_sync.push_tensors_shm([engine], second) == 3  # the version of the update's first call
        out = engine.generate(PROMPT, GREEDY)[0]
        assert out.output_ids == want and out.weight_versions == [3] * len(want)
        assert engine.info().weights_valid


def test_a_failed_later_call_leaves_the_weights_invalid(model_dir, halves) -> None:
    first, second = halves
    bad = second[:-1] + [(second[-1][0], torch.ones(3))]
    with Engine(model_dir, max_total_tokens=1024) as engine:
        weight_sync.push_tensors_shm([engine], first, version=1, more=True)
        with pytest.raises(FailedPreconditionError, match="weights are invalid.*stopped after 1"):
            weight_sync.push_tensors_shm([engine], bad, version=1)
        info = engine.info()
        assert not info.weights_valid and info.weight_version == 0
        with pytest.raises(FailedPreconditionError, match="weights are invalid"):
            engine.generate(PROMPT, GREEDY)
        assert weight_sync.push_tensors_shm([engine], first + second, version=2) == 2  # a full update heals
        assert engine.info().weights_valid and engine.generate(PROMPT, GREEDY)[0].weight_versions[0] == 2


def test_other_updates_between_the_calls(model_dir, halves) -> None:
    """A swap update is refused while an update in calls is open; another kind of update ends it
    (the weights invalid until that one, a full update here, succeeds)."""
    first, _ = halves
    with Engine(model_dir, max_total_tokens=1024) as engine:
        weight_sync.push_tensors_shm([engine], first, version=1, more=True)
        with pytest.raises(FailedPreconditionError, match="cannot come in several calls"):
            engine.update_weights_from_disk(model_dir, swap=True)
        assert engine.update_weights_from_disk(model_dir, version=5) == 5
        assert engine.info().weights_valid and engine.generate(PROMPT, GREEDY)[0].weight_versions[0] == 5
        with pytest.raises(FailedPreconditionError, match="cannot come in several calls"):
            weight_sync.push_tensors_shm([engine], first, version=6, more=True, swap=True)


def test_a_parameter_whose_shards_come_in_two_calls_counts_as_written(model_dir, halves) -> None:
    """A trainer's buckets may cut between q_proj and k_proj: the calls of one update count the shards
    of a fused parameter together, so the update is full and heals weights released without a backup."""
    first, second = halves
    items = first + second
    # Just after the first of layer 0's q/k/v: the other two come in the second call.
    cut = 1 + next(i for i, (n, _) in enumerate(items) if ".layers.0.self_attn." in n and n[-13:-7] in (
        "q_proj", "k_proj", "v_proj"))
    with Engine(model_dir, max_total_tokens=1024) as engine:
        weight_sync.push_tensors_shm([engine], items, version=1)
        want = engine.generate(PROMPT, GREEDY)[0].output_ids
        engine.release_memory(["weights"])
        engine.resume_memory(["weights"])
        assert not engine.info().weights_valid
        weight_sync.push_tensors_shm([engine], items[:cut], version=2, more=True)
        assert weight_sync.push_tensors_shm([engine], items[cut:]) == 2
        assert engine.info().weights_valid
        assert engine.generate(PROMPT, GREEDY)[0].output_ids == want


def test_more_crosses_the_wire() -> None:
    from rollout.server.convert_weights import tensor_from_proto, tensor_to_proto

    source = {"shared_memory": {"name": "x", "offset": 0, "size": 4}}
    for more in (True, False):
        msg = tensor_to_proto(names=["a"], dtypes=["float32"], shapes=[[1]], sources=[source], version=3, more=more)
        assert tensor_from_proto(msg).more is more


def test_a_failed_first_call_leaves_no_shards_for_the_next_update(model_dir, halves, monkeypatch) -> None:
    """The first call of an update in calls writes the embedding, then fails (weights invalid). A
    later update in calls that never sends the embedding is not full: the failed call's shards do
    not count toward it."""
    import rollout.control.weights as cw

    first, second = halves
    items = first + second
    embed = [(n, t) for n, t in items if "embed_tokens" in n]
    rest = [(n, t) for n, t in items if "embed_tokens" not in n]
    original = cw.bucket_views
    armed = [True]

    def views(layout, buf):
        for i, item in enumerate(original(layout, buf)):
            if armed[0] and i == 1:
                armed[0] = False
                raise RuntimeError("a device fault mid-call")
            yield item

    monkeypatch.setattr(cw, "bucket_views", views)
    with Engine(model_dir, max_total_tokens=1024) as engine:
        with pytest.raises(FailedPreconditionError, match="weights are invalid"):
            weight_sync.push_tensors_shm([engine], embed + rest[:1], version=3, more=True)
        weight_sync.push_tensors_shm([engine], rest[:3], version=4, more=True)
        weight_sync.push_tensors_shm([engine], rest[3:])
        assert not engine.info().weights_valid
        with pytest.raises(FailedPreconditionError, match="weights are invalid"):
            engine.generate(PROMPT, GREEDY)


def test_weights_released_between_the_calls_do_not_count_as_written(model_dir, halves) -> None:
    """The first call's tensors are lost when the weights are released without a backup: the last
    call does not make the weights valid (they served zeros for the first call's parameters)."""
    first, second = halves
    with Engine(model_dir, max_total_tokens=1024) as engine:
        weight_sync.push_tensors_shm([engine], first, version=3, more=True)
        engine.release_memory(["weights"])
        engine.resume_memory(["weights"])
        weight_sync.push_tensors_shm([engine], second, version=3)
        assert not engine.info().weights_valid
        with pytest.raises(FailedPreconditionError, match="weights"):
            engine.generate(PROMPT, GREEDY)
        assert weight_sync.push_tensors_shm([engine], first + second, version=4) == 4
        assert engine.info().weights_valid


def test_a_rank_that_fell_apart_from_rank_0_follows_rank_0s_next_update() -> None:
    """Rank 1 kept an update in calls open that rank 0 ended (rank 0 refused a call rank 1 took).
    Rank 0's next update carries another version; rank 1 starts it afresh, marking nothing (rank 0
    decides), instead of refusing it, which failed every later update there for good."""
    from rollout.control.gate import Blocker, GenerationGate
    from rollout.control.update_calls import UpdateInCalls

    for follower in (False, True):
        calls, gate = UpdateInCalls(follower), GenerationGate()
        calls.add(3, {"a"}, False)
        assert calls.version_of(None, gate) == 3 and calls.version_of(3, gate) == 3 and calls.open
        assert calls.version_of(5, gate) == 5 and not calls.open and calls.written == set()
        assert gate.blocks(Blocker.WEIGHTS_INVALID) is not follower


def test_a_sender_gone_mid_update_is_healed_by_the_next_update_in_calls(model_dir, halves) -> None:
    """A trainer failed after the first call of version 3 (no last call). Its next step sends version
    4 in calls: that starts a new update (the old one abandoned, the weights invalid meanwhile), and
    it heals them; it was refused ("carry one version"), and only a third update loaded."""
    first, second = halves
    with Engine(model_dir, max_total_tokens=1024) as engine:
        weight_sync.push_tensors_shm([engine], first + second, version=1)
        want = engine.generate(PROMPT, GREEDY)[0].output_ids
        engine.update_weights_from_disk(model_dir, version=2)
        weight_sync.push_tensors_shm([engine], first, version=3, more=True)
        assert weight_sync.push_tensors_shm([engine], first, version=4, more=True) == 4
        with pytest.raises(FailedPreconditionError, match="waits for its last call"):
            engine.generate(PROMPT, GREEDY)
        assert weight_sync.push_tensors_shm([engine], second) == 4
        assert engine.info().weights_valid
        out = engine.generate(PROMPT, GREEDY)[0]
        assert out.output_ids == want and out.weight_versions == [4] * len(want)
        # A new update that leaves parameters out keeps the weights invalid.
        weight_sync.push_tensors_shm([engine], first, version=5, more=True)
        weight_sync.push_tensors_shm([engine], second[:1], version=6, more=True)
        weight_sync.push_tensors_shm([engine], second[1:2])
        assert not engine.info().weights_valid
