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


def _control(reports: list[RankReport]) -> tuple[RankControl, GenerationGate, _Versions]:
    gate, versions = GenerationGate(), _Versions()
    return RankControl(_Followers(reports), None, None, gate, versions), gate, versions


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
