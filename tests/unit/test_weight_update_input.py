"""Bad weight-update input is refused as INVALID_ARGUMENT before any write, the previous weights keep
serving, and a distributed update refused that way is rejected through the status vote (so the
trainer's group stays usable)."""

from __future__ import annotations

import concurrent.futures
import os
import shutil

import pytest

import weight_sync
from rollout import Engine, SamplingParams
from rollout.control.weights import MAX_VERSION
from rollout.errors import InvalidArgumentError
from weight_sync.group import VOTE_REJECT

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine(tiny_model_dir("qwen3"), max_total_tokens=1024) as eng:
        yield eng


def _serves_version(engine: Engine, version: int) -> None:
    info = engine.info()
    assert info.weights_valid and info.weight_version == version
    assert engine.generate([3, 4, 5], GREEDY)[0].weight_versions == [version] * 3


def test_a_corrupt_checkpoint_is_invalid_argument(engine, tiny_model_dir, tmp_path) -> None:
    src = tiny_model_dir("qwen3")
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(src, name), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    before = engine.info().weight_version
    with pytest.raises(InvalidArgumentError, match="model_path: .* is not a readable safetensors file"):
        engine.update_weights_from_disk(str(tmp_path))
    _serves_version(engine, before)


def test_versions_stay_within_int64(engine, tiny_model_dir) -> None:
    """Versions travel as int64: one past that is refused, and so is an update without a version
    once the current one is the largest (current + 1 would not fit)."""
    path = tiny_model_dir("qwen3")
    with pytest.raises(InvalidArgumentError, match="version"):
        engine.update_weights_from_disk(path, version=MAX_VERSION + 1)
    assert engine.update_weights_from_disk(path, version=MAX_VERSION) == MAX_VERSION
    with pytest.raises(InvalidArgumentError, match="next version would pass"):
        engine.update_weights_from_disk(path)
    _serves_version(engine, MAX_VERSION)
    assert engine.update_weights_from_disk(path, version=1) == 1


def test_a_shape_no_tensor_can_have_is_rejected_through_the_vote(engine) -> None:
    group = weight_sync.connect([engine], backend="gloo", timeout_s=20)
    try:
        before = engine.info().weight_version
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(engine.update_weights_from_distributed, names=["model.norm.weight"],
                               dtypes=["float32"], shapes=[[2**62]], group_name=group.group_name,
                               version=before + 1)
            verdict = group.comm.vote(0)  # the trainer's side of the status vote
            with pytest.raises(InvalidArgumentError, match="not a tensor shape"):
                call.result(timeout=30)
        assert verdict == VOTE_REJECT
        _serves_version(engine, before)
    finally:
        group.close()
