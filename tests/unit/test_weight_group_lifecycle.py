"""A trainer's weight group over its life: refused pushes, closing, pushing after close, versions.

Whatever an engine does, the trainer gets a clear error and never waits past the group's timeout,
and a group name can be formed again after the group is gone."""

from __future__ import annotations

import threading

import pytest

import weight_sync
from rollout import Engine
from rollout.errors import FailedPreconditionError, InvalidArgumentError
from rollout.models.loader import iter_checkpoint
from rollout.server.convert_weights import distributed_to_proto
from weight_sync.group import GroupFailedError


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir, max_total_tokens=1024) as eng:
        yield eng


@pytest.fixture(scope="module")
def weights(model_dir) -> dict:
    return {n: t * 1.1 for n, t in iter_checkpoint(model_dir)}


def test_a_group_name_forms_again_after_a_push_refused_before_the_vote(engine, weights) -> None:
    """An engine that refuses before the status vote never sees the trainer's abort: closing the
    group still destroys it there, so the name is free again."""
    group = weight_sync.connect([engine], backend="gloo", group_name="actor", timeout_s=30)
    engine.release_memory(["weights"])
    try:
        with pytest.raises(FailedPreconditionError, match="resume_memory"):
            group.push(weights.items(), version=1)
    finally:
        engine.resume_memory(["weights"])
    with weight_sync.connect([engine], backend="gloo", group_name="actor", timeout_s=30) as again:
        assert again.push(weights.items(), version=2) == 2


class Unanswering:
    """An engine whose destroy never answers until released."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.release = threading.Event()

    def engine_ranks(self) -> int:
        return 1

    def init_weight_update_group(self, **kw):
        return self.engine.init_weight_update_group(**kw)

    def update_weights_from_distributed(self, **kw):
        return self.engine.update_weights_from_distributed(**kw)

    def destroy_weight_update_group(self, group_name: str):
        self.release.wait(60)
        return self.engine.destroy_weight_update_group(group_name)


def test_close_waits_at_most_the_group_timeout(engine, weights) -> None:
    target = Unanswering(engine)
    group = weight_sync.connect([target], backend="gloo", group_name="slow", timeout_s=3)
    assert group.push(weights.items(), version=3) == 3
    closer = threading.Thread(target=group.close, daemon=True)
    closer.start()
    closer.join(timeout=20)
    hung = closer.is_alive()
    target.release.set()  # the engine's destroy runs now (the group's name is freed)
    closer.join(timeout=20)
    assert not hung, "close() waited past the group's timeout for an engine that did not answer"


def test_a_push_on_a_closed_group_says_so(engine, weights) -> None:
    group = weight_sync.connect([engine], backend="gloo", timeout_s=30)
    group.close()
    with pytest.raises(GroupFailedError, match="is closed"):
        group.push(weights.items(), version=4)


@pytest.mark.parametrize("version", [7.9, "8", True, -1])
def test_a_version_that_is_not_an_integer_is_refused_by_the_trainer(engine, weights, version) -> None:
    before = engine.info().weight_version
    with pytest.raises(InvalidArgumentError, match="version"):
        weight_sync.push_tensors_shm([engine], weights.items(), version=version)
    with weight_sync.connect([engine], backend="gloo", timeout_s=30) as group:
        with pytest.raises(InvalidArgumentError, match="version"):
            group.push(weights.items(), version=version)
        assert group.push(weights.items(), version=before + 1) == before + 1  # still usable
    if not isinstance(version, int) or isinstance(version, bool):  # int() in the gRPC client coerced these
        with pytest.raises(InvalidArgumentError, match="version"):
            distributed_to_proto(names=["a"], dtypes=["float32"], shapes=[[1]], group_name="g", version=version)
