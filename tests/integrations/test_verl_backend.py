"""The veRL backend driven by verl 0.9's own code on CPU.

verl's ``LLMServerManager`` builds our replicas (standalone: verl creates its
``CheckpointEngineWorker`` holding our adapter), verl's ``AgentLoopManager`` generates a batch
through them, and verl's ``CheckpointEngineManager`` / ``CheckpointEngineWorker`` run the
abort / release / update / resume / sleep / wake sequence. Ray gets one fake GPU so verl's
placement groups form on a CPU machine; the engine runs on CPU.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")

import ray  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.workers.rollout.base import get_rollout_class  # noqa: E402
from verl.workers.rollout.replica import RolloutReplicaRegistry  # noqa: E402

from integrations.verl import BACKEND_NAME  # noqa: E402
from integrations.verl.adapter import ServerAdapter  # noqa: E402
from integrations.verl.replica import RolloutServerReplica  # noqa: E402
from rollout import Engine, SamplingParams  # noqa: E402
from rollout.errors import InvalidArgumentError, UnimplementedError  # noqa: E402
from rollout.testing.random_model import write_random_model  # noqa: E402
from tests.ray_start import start_ray  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT_LEN, RESPONSE_LEN = 24, 6
CALL_TIMEOUT_S = 60  # a Ray call that waits on the engine fails in a minute, never hangs


def test_backend_is_in_both_verl_registries():
    assert RolloutReplicaRegistry.get(BACKEND_NAME) is RolloutServerReplica
    assert get_rollout_class(BACKEND_NAME, "async") is ServerAdapter


def _config(model_dir: str):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer")
    model, rollout = config.actor_rollout_ref.model, config.actor_rollout_ref.rollout
    model.path = model_dir
    model.custom_chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    rollout.name = BACKEND_NAME
    rollout.mode = "async"
    rollout.nnodes = 1
    rollout.n_gpus_per_node = 1
    rollout.tensor_model_parallel_size = 1
    rollout.dtype = "float32"
    rollout.prompt_length = PROMPT_LEN
    rollout.response_length = RESPONSE_LEN
    rollout.max_num_seqs = 8
    rollout.calculate_log_probs = True
    rollout.agent.num_workers = 1
    rollout.checkpoint_engine.backend = "naive"
    return config


@pytest.fixture(scope="module")
def verl_setup(tmp_path_factory):
    """Ray with one fake GPU, verl's LLMServerManager with one of our replicas (standalone)."""
    model_a = write_random_model(str(tmp_path_factory.mktemp("model-a")), "qwen3", seed=0)
    model_b = write_random_model(str(tmp_path_factory.mktemp("model-b")), "qwen3", seed=1)
    config = _config(model_a)
    yield from serve_replicas(config, num_gpus=1, models=(model_a, model_b))


def serve_replicas(config, num_gpus: int, models: tuple[str, str]):
    """Ray with ``num_gpus`` fake GPUs and verl's LLMServerManager over our replicas (standalone);
    yields (config, manager, *models) and shuts everything down after."""
    from verl.workers.rollout.llm_server import LLMServerManager

    env = {"VERL_USE_EXTERNAL_MODULES": "integrations.verl", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    start_ray(ray, num_cpus=8, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True,
              runtime_env={"env_vars": env})
    manager = None
    try:
        manager = LLMServerManager.create(config=config, worker_group=None)
        yield (config, manager, *models)
    finally:
        for replica in manager.get_replicas() if manager is not None else []:
            ray.get(replica.server_handle.shutdown.remote(), timeout=CALL_TIMEOUT_S)
        ray.shutdown()


def _prompts(n: int) -> DataProto:
    raw = np.empty(n, dtype=object)
    raw[:] = [[{"role": "user", "content": f"question {i}: what is {i} + {i}?"}] for i in range(n)]
    return DataProto(non_tensor_batch={"raw_prompt": raw}, meta_info={})


def test_agent_loop_generates_a_batch_with_logprobs(verl_setup):
    from verl.experimental.agent_loop import AgentLoopManager

    config, manager, _, _ = verl_setup
    agent_loops = AgentLoopManager.create(config=config, llm_client=manager.get_client())
    out = agent_loops.generate_sequences(_prompts(4))

    responses, mask = out.batch["responses"], out.batch["response_mask"]
    logprobs = out.batch["rollout_log_probs"]
    assert responses.shape == (4, RESPONSE_LEN) and logprobs.shape == (4, RESPONSE_LEN)
    assert mask.sum(dim=1).min() >= 1  # every sample got tokens
    real = mask.bool()
    assert torch.isfinite(logprobs[real]).all() and (logprobs[real] <= 0).all()
    assert (logprobs[real] < 0).any()  # sampled at temperature 1 from a random model
    versions = out.non_tensor_batch["weight_versions"]
    assert all(len(v) == int(m) for v, m in zip(versions, mask.sum(dim=1)))


def _generate(server, prompt_ids: list[int]):
    params = {"temperature": 0.0, "logprobs": True}
    return ray.get(server.generate.remote(prompt_ids=prompt_ids, sampling_params=params, request_id="greedy"),
                   timeout=CALL_TIMEOUT_S)


def _greedy_reference(model_dir: str, prompt_ids: list[int]) -> list[int]:
    engine = Engine(model_dir, device="cpu", dtype="float32")
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=RESPONSE_LEN)
        return engine.generate(input_ids=[prompt_ids], sampling_params=params)[0].output_ids
    finally:
        engine.shutdown()


def _hf_tensors(model_dir: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return sorted(load_file(os.path.join(model_dir, "model.safetensors")).items())


def test_weight_update_sequence_loads_new_weights_tagged_with_the_step(verl_setup):
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.checkpoint_engine.base import CheckpointEngineWorker
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup
    from verl.utils import omega_conf_to_dataclass

    config, manager, model_a, model_b = verl_setup
    replica = manager.get_replicas()[0]
    server = replica.server_handle
    prompt = [5, 17, 42, 99, 7, 250]
    expected_a, expected_b = _greedy_reference(model_a, prompt), _greedy_reference(model_b, prompt)
    assert expected_a != expected_b  # the two random models disagree, so the check below means something
    assert _generate(server, prompt).token_ids == expected_a

    ckpt = CheckpointEngineManager(
        config=omega_conf_to_dataclass(config.actor_rollout_ref.rollout.checkpoint_engine),
        actor_wg=None, replicas=manager.get_replicas())
    # The rollout side of CheckpointEngineManager.update_weights, step by step: verl's
    # CheckpointEngineWorker (made by our standalone replica) receives the weights through its
    # checkpoint engine ("naive" here: handed over in process) and calls our adapter.
    workers = RayWorkerGroup(worker_handles=replica.workers,
                             ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(CheckpointEngineWorker)))
    ckpt.abort_replicas()
    ckpt.release_kv_cache_replicas()
    ray.get(workers.execute_checkpoint_engine(["send_weights"], [_hf_tensors(model_b)]), timeout=CALL_TIMEOUT_S)
    ray.get(workers.update_weights(global_steps=7), timeout=CALL_TIMEOUT_S)
    ckpt.resume_kv_cache_replicas()
    ckpt.resume_generation_replicas()

    after = _generate(server, prompt)
    assert after.token_ids == expected_b
    assert after.extra_fields["weight_versions"] == [7] * len(after.token_ids)
    assert after.extra_fields["global_steps"] == 7
    assert len(after.log_probs) == len(after.token_ids)

    # verl's sleep / wake_up between steps (standalone: the KV cache goes, the weights stay).
    ckpt.sleep_replicas()
    ckpt.wake_up_replicas()
    assert _generate(server, prompt).token_ids == expected_b


def test_hybrid_update_sequence_through_the_adapter(verl_setup):
    """What verl's trainer worker does in hybrid mode (ActorRolloutRefWorker.update_weights with the
    "naive" checkpoint engine), with our adapter made by verl's get_rollout_class: the replica slept
    (weights released, so generation is refused), then resume(["weights"]), update_weights with
    the trainer's tensors, resume(["kv_cache"]). verl's trainer worker itself needs CUDA + NCCL."""
    import ray.exceptions

    config, manager, model_a, _ = verl_setup
    server = manager.get_replicas()[0].server_handle
    prompt = [9, 8, 7, 6]
    expected_a = _greedy_reference(model_a, prompt)
    adapter = get_rollout_class(BACKEND_NAME, "async")(
        config=config.actor_rollout_ref.rollout, model_config=config.actor_rollout_ref.model, device_mesh=None)

    asyncio.run(adapter.release())  # a hybrid sleep: KV cache and weights
    with pytest.raises(ray.exceptions.RayTaskError, match="weights were released"):
        _generate(server, prompt)
    asyncio.run(adapter.resume(["weights"]))
    trainer_tensors = (pair for pair in _hf_tensors(model_a))  # a generator, as the model engine gives
    asyncio.run(adapter.update_weights(trainer_tensors, peft_config=None, base_sync_done=True, global_steps=9))
    asyncio.run(adapter.resume(["kv_cache"]))

    out = _generate(server, prompt)
    assert out.token_ids == expected_a
    assert out.extra_fields["weight_versions"] == [9] * len(out.token_ids)
    assert ray.get(server.get_global_steps.remote(), timeout=CALL_TIMEOUT_S) == 9


def test_abort_with_reject_refuses_new_requests_until_resume(verl_setup):
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.utils import omega_conf_to_dataclass

    config, manager, _, _ = verl_setup
    server = manager.get_replicas()[0].server_handle
    ckpt = CheckpointEngineManager(
        config=omega_conf_to_dataclass(config.actor_rollout_ref.rollout.checkpoint_engine),
        actor_wg=None, replicas=manager.get_replicas())
    ckpt.abort_replicas(reject_request=True)
    with pytest.raises(ray.exceptions.RayTaskError, match="takes no new requests"):
        _generate(server, [1, 2, 3])
    ckpt.resume_generation_replicas()
    assert len(_generate(server, [1, 2, 3]).token_ids) >= 1


def test_a_request_resubmitted_during_an_update_waits_for_resume_generation(verl_setup):
    """verl's CheckpointEngineManager aborts, releases the KV cache, updates and resumes; its server
    client resubmits an aborted request meanwhile. That request waits for resume_generation (it failed
    with "memory of kv_cache is released")."""
    from verl.checkpoint_engine import CheckpointEngineManager
    from verl.utils import omega_conf_to_dataclass

    config, manager, _, _ = verl_setup
    server = manager.get_replicas()[0].server_handle
    ckpt = CheckpointEngineManager(
        config=omega_conf_to_dataclass(config.actor_rollout_ref.rollout.checkpoint_engine),
        actor_wg=None, replicas=manager.get_replicas())
    ckpt.abort_replicas()
    ckpt.release_kv_cache_replicas()
    resubmitted = server.generate.remote(prompt_ids=[1, 2, 3], sampling_params={"temperature": 0.0},
                                         request_id="resubmitted")
    ready, _ = ray.wait([resubmitted], timeout=1.0)
    assert not ready  # it waits
    ckpt.resume_kv_cache_replicas()
    ckpt.resume_generation_replicas()
    assert len(ray.get(resubmitted, timeout=CALL_TIMEOUT_S).token_ids) >= 1


@pytest.mark.parametrize("sampling,field", [
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"prompt_logprobs": 0}, "prompt_logprobs"),
    ({"n": 2}, "n"),
])
def test_options_the_engine_lacks_are_refused_by_name(sampling, field):
    from integrations.verl.requests import LengthBudget, to_generate_call

    with pytest.raises(UnimplementedError) as err:
        to_generate_call(3, sampling, LengthBudget(8, 4, 64))
    assert err.value.field == field


def test_unknown_sampling_option_is_refused():
    from integrations.verl.requests import LengthBudget, to_generate_call

    with pytest.raises(InvalidArgumentError) as err:
        to_generate_call(3, {"temprature": 1.0}, LengthBudget(8, 4, 64))
    assert err.value.field == "temprature"


def test_response_length_follows_verl_budget_and_the_context():
    from integrations.verl.requests import LengthBudget, to_generate_call

    budget = LengthBudget(prompt_length=8, response_length=4, context_length=12)
    assert to_generate_call(3, {}, budget).max_new_tokens == 4  # response_length
    assert to_generate_call(10, {}, budget).max_new_tokens == 2  # what prompt_length + response_length leave
    assert to_generate_call(3, {"max_tokens": 50}, budget).max_new_tokens == 9  # what the context leaves
    call = to_generate_call(12, {"max_new_tokens": 5}, budget)
    assert call.max_new_tokens == 0 and "max_new_tokens" not in call.sampling
