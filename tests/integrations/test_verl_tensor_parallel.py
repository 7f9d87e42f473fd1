"""A verl replica of two tensor-parallel ranks (tensor_model_parallel_size=2) on CPU.

verl makes the replica's two workers; our replica starts one ``rollout serve --tp-size 2`` over
them, and of the two adapters only the leader (rank 0 of the replica) talks to the server: the
weights both workers receive reach both engine ranks by one push.
"""

from __future__ import annotations

import pytest

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

import ray  # noqa: E402

from rollout.client import RolloutClient  # noqa: E402
from rollout.testing.random_model import write_random_model  # noqa: E402
from tests.integrations.test_verl_backend import (  # noqa: E402
    CALL_TIMEOUT_S,
    _config,
    _generate,
    _greedy_reference,
    _hf_tensors,
    serve_replicas,
)


@pytest.fixture(scope="module")
def tp_setup(tmp_path_factory):
    model_a = write_random_model(str(tmp_path_factory.mktemp("model-a")), "qwen3", seed=0)
    model_b = write_random_model(str(tmp_path_factory.mktemp("model-b")), "qwen3", seed=1)
    config = _config(model_a)
    config.actor_rollout_ref.rollout.tensor_model_parallel_size = 2
    config.actor_rollout_ref.rollout.n_gpus_per_node = 2
    yield from serve_replicas(config, num_gpus=2, models=(model_a, model_b))


def test_a_two_rank_replica_serves_and_takes_weights_once(tp_setup):
    from verl.checkpoint_engine.base import CheckpointEngineWorker
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup

    config, manager, model_a, model_b = tp_setup
    [replica] = manager.get_replicas()
    assert len(replica.workers) == 2
    server = replica.server_handle
    host, port = ray.get(server.get_server_address.remote(), timeout=CALL_TIMEOUT_S)
    with RolloutClient(f"{host}:{port}") as client:
        assert client.get_info().tp_size == 2
    prompt = [5, 17, 42, 99, 7, 250]
    expected_a, expected_b = _greedy_reference(model_a, prompt), _greedy_reference(model_b, prompt)
    assert expected_a != expected_b
    assert _generate(server, prompt).token_ids == expected_a

    workers = RayWorkerGroup(worker_handles=replica.workers,
                             ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(CheckpointEngineWorker)))
    tensors = _hf_tensors(model_b)
    ray.get(workers.execute_checkpoint_engine(["send_weights"] * 2, [tensors, tensors]), timeout=CALL_TIMEOUT_S)
    ray.get(workers.update_weights(global_steps=3), timeout=CALL_TIMEOUT_S)
    after = _generate(server, prompt)
    assert after.token_ids == expected_b
    assert after.extra_fields["weight_versions"] == [3] * len(after.token_ids)
