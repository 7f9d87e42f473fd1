"""Control commands on a two-rank engine (gloo on CPU): memory, colocated pushes, partial failures."""

from __future__ import annotations

import pytest

import weight_sync
from rollout import Engine
from rollout.control.gate import Blocker, GenerationGate
from rollout.engine.messages import UpdateWeightsFromDisk
from rollout.engine.rank_control import RankControl
from rollout.engine.ranks import RankReport
from rollout.errors import FailedPreconditionError, InvalidArgumentError
from tests.unit.test_weight_sync import GREEDY, PROMPTS, expected, model_dir, perturbed  # noqa: F401 (fixtures)

OPTS = dict(max_total_tokens=4096, tp_size=2)


def outputs(engine: Engine) -> list[list[int]]:
    return [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]


def test_release_and_resume_apply_on_every_rank(model_dir, perturbed, expected) -> None:
    weights, _ = perturbed
    with Engine(model_dir, **OPTS) as engine:
        assert outputs(engine) == expected["old"]
        with pytest.raises(InvalidArgumentError, match="unknown memory tag"):
            engine.release_memory(["kv"])  # refused before any rank acts
        states = engine.release_memory()
        assert all(s["state"] == "released" for s in states.values())
        info = engine.info()
        assert len(info.rank_memory) == 2
        assert all(s["state"] == "released" for rank in info.rank_memory for s in rank.values())
        with pytest.raises(FailedPreconditionError, match="resume_memory"):
            engine.generate(PROMPTS[0], GREEDY)
        engine.resume_memory()
        assert all(s["state"] == "active" for rank in engine.info().rank_memory for s in rank.values())
        # Released without a backup, the weights are invalid on every rank until a full push.
        with pytest.raises(FailedPreconditionError, match="weights"):
            engine.generate(PROMPTS[0], GREEDY)
        assert weight_sync.push_tensors_shm([engine], weights.items(), version=4) == 4
        assert engine.info().weights_valid and outputs(engine) == expected["new"]
        engine.check_integrity()


def test_shared_memory_and_disk_updates_reach_every_rank(model_dir, perturbed, expected) -> None:
    weights, new_dir = perturbed
    with Engine(model_dir, **OPTS) as engine:
        assert weight_sync.push_tensors_shm([engine], weights.items(), version=3) == 3
        assert outputs(engine) == expected["new"]
        assert engine.update_weights_from_disk(model_dir) == 4
        assert outputs(engine) == expected["old"]
        with pytest.raises(InvalidArgumentError, match="not a directory"):
            engine.update_weights_from_disk(model_dir + "-missing")
        assert engine.info().weights_valid and engine.info().weight_version == 4


class _Followers:
    """The other ranks' answers to one command, as given (rank 0's combination is under test)."""

    size = 3

    def __init__(self, reports: list[RankReport]) -> None:
        self.reports = reports

    def control(self, command) -> int:
        return 1

    def wait(self, op: int) -> list[RankReport]:
        return self.reports


class _Versions:
    def __init__(self) -> None:
        self.epochs = 0

    def new_kv_epoch(self) -> None:
        self.epochs += 1


class _Weights:
    def forget_open_update(self) -> None:
        pass


def _control(reports: list[RankReport]) -> tuple[RankControl, GenerationGate, _Versions]:
    gate, versions = GenerationGate(), _Versions()
    return RankControl(_Followers(reports), _Weights(), None, gate, versions), gate, versions


def test_an_update_that_fails_on_one_rank_only_invalidates_the_weights_everywhere() -> None:
    cmd = UpdateWeightsFromDisk("/x")
    failed = RankReport(1, 2, error_code="FAILED_PRECONDITION", error_message="disk full", weights_valid=False)
    control, gate, versions = _control([RankReport(1, 1, result=5), failed])
    with pytest.raises(FailedPreconditionError, match="engine rank 2: disk full"):
        control.update_weights(cmd, lambda: 5)
    assert gate.blocks(Blocker.WEIGHTS_INVALID) and "differ between engine ranks" in gate.reason()
    assert versions.epochs == 1  # no prefix computed before is reused

    # Rank 0 failing while the others took the update: the ranks differ too.
    control, gate, _ = _control([RankReport(1, 1, result=5), RankReport(1, 2, result=5)])

    def rank0_fails() -> int:
        raise FailedPreconditionError("rank 0 broke")

    with pytest.raises(FailedPreconditionError, match="rank 0 broke"):
        control.update_weights(cmd, rank0_fails)
    assert gate.blocks(Blocker.WEIGHTS_INVALID)

    # Every rank refusing before writing anything leaves the weights as they were.
    refused = [RankReport(1, r, error_code="INVALID_ARGUMENT", error_message="bad") for r in (1, 2)]
    control, gate, versions = _control(refused)

    def rank0_refuses() -> int:
        raise InvalidArgumentError("bad")

    with pytest.raises(InvalidArgumentError):
        control.update_weights(cmd, rank0_refuses)
    assert not gate.closed and versions.epochs == 0

    # All ranks taking it: the version comes back, nothing blocked.
    control, gate, _ = _control([RankReport(1, 1, result=7), RankReport(1, 2, result=7)])
    assert control.update_weights(cmd, lambda: 7) == 7 and not gate.closed


def test_a_call_of_an_update_in_calls_that_one_rank_refused_counts_toward_no_full_update(tiny_model_dir) -> None:
    """Call 1 (``more``) is written on rank 0 and refused on rank 1; call 2 brings the rest on both.
    Rank 0 must not count calls 1 + 2 as a full update: rank 1 still holds call 1's old tensors."""
    from rollout.config import EngineConfig
    from rollout.engine.api import parse_sources
    from rollout.engine.core import EngineCore
    from rollout.engine.messages import UpdateWeightsFromTensor
    from rollout.models.loader import iter_checkpoint
    from weight_sync.buckets import WireLayout

    core = EngineCore(EngineConfig.build(tiny_model_dir("qwen3"), max_total_tokens=256))
    refused = RankReport(1, 1, error_code="FAILED_PRECONDITION", error_message="no room")
    followers = _Followers([refused])
    core.ranks.followers = followers

    class Target:  # what push_tensors_shm calls, straight into rank 0's control path
        def engine_ranks(self) -> int:
            return 2

        def update_weights_from_tensor(self, **args):
            layout = WireLayout(args["names"], args["dtypes"], args["shapes"], args.get("offsets"),
                                args.get("bucket_sizes"), args.get("flat_bucket", False))
            return core.handle(UpdateWeightsFromTensor(layout, parse_sources(args["sources"]), args.get("version"),
                                                       False, args.get("more", False)))

    items = [(n, t + 0.1) for n, t in iter_checkpoint(tiny_model_dir("qwen3"))]
    layer0 = [(n, t) for n, t in items if ".layers.0." in n]  # whole parameters: call 1 covers them alone
    rest = [(n, t) for n, t in items if ".layers.0." not in n]
    with pytest.raises(FailedPreconditionError, match="engine rank 1: no room"):
        weight_sync.push_tensors_shm([Target()], layer0, version=3, more=True)
    assert core.gate.blocks(Blocker.WEIGHTS_INVALID)
    followers.reports = [RankReport(1, 1, result=3)]
    weight_sync.push_tensors_shm([Target()], rest, version=3)
    assert core.gate.blocks(Blocker.WEIGHTS_INVALID), "ranks that differ serve as if one full update landed"
    assert not core.gate.blocks(Blocker.WEIGHTS_UPDATING)
    weight_sync.push_tensors_shm([Target()], items, version=4)  # a full update on every rank heals
    assert not core.gate.closed


def test_a_release_without_backup_ends_the_open_update_on_every_rank(model_dir, perturbed, expected) -> None:
    """Rank 1 kept an update in calls open after the release had ended it on rank 0, and refused
    every later swap update ("cannot come ... between the calls of an update that does")."""
    weights, _ = perturbed
    items = list(weights.items())
    with Engine(model_dir, **OPTS) as engine:
        assert weight_sync.push_tensors_shm([engine], items[: len(items) // 2], version=3, more=True) == 3
        engine.release_memory(["weights"])
        engine.resume_memory(["weights"])
        result = weight_sync.push_tensors_shm([engine], items, version=4, swap=True)
        assert result.weight_version == 4
        assert engine.info().weights_valid and outputs(engine) == expected["new"]
