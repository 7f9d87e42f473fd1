"""Rollout replicas as Ray actors on a local CPU cluster: generate, pause / continue, weight push from
this process as the trainer (gloo), release / resume, routing of GRPO groups, colocated placement.

One Ray instance and two replicas (each a real ``rollout serve`` process) serve the whole module.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from safetensors.torch import load_file

from tests.ray_start import start_ray
from tests.waiting import process_running

ray = pytest.importorskip("ray")

import weight_sync  # noqa: E402
from integrations.ray import RolloutRouter, RolloutServerConfig, create_rollout_actors  # noqa: E402
from rollout import Engine  # noqa: E402
from rollout.client import RolloutClient  # noqa: E402
from rollout.errors import FailedPreconditionError, InvalidArgumentError  # noqa: E402
from rollout.types import FinishReason, PauseMode, SamplingParams  # noqa: E402

pytestmark = pytest.mark.ray

PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [200, 3, 45, 46], [90, 91, 92, 93, 94]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
STEP_S = 20.0  # deadline of any single wait on a replica: a bug fails in seconds, not a hang


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance for this module: 2 logical CPUs (Ray starts one idle worker per CPU)."""
    start_ray(ray, num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tiny_model_dir) -> dict[str, str]:
    """Two random Qwen3 models of one shape: the one served first and the one the trainer pushes."""
    return {"first": tiny_model_dir("qwen3"), "second": tiny_model_dir("qwen3", seed=1)}


@pytest.fixture(scope="module")
def expected(models) -> dict[str, list[list[int]]]:
    """Greedy tokens of a fresh in-process engine on each model's weights."""
    out = {}
    for key, path in models.items():
        with Engine(path, device="cpu", dtype="float32", max_total_tokens=4096) as eng:
            out[key] = [o.output_ids for o in eng.generate(PROMPTS, GREEDY)]
    assert out["first"] != out["second"], "the two models must disagree for the push to be visible"
    return out


@pytest.fixture(scope="module")
def replicas(ray_cluster, models):
    """Two replicas on a placement group of their own (one bundle each)."""
    reps = create_rollout_actors(RolloutServerConfig(models["first"], max_total_tokens=4096), 2, num_cpus=0.5)
    yield reps
    reps.shutdown()


@pytest.fixture(scope="module")
def infos(replicas):
    return replicas.ready(timeout_s=120)


@pytest.fixture(scope="module")
def group(replicas, infos):
    """The trainer's weight-update group: this process (rank 0) and both replicas, over gloo."""
    with weight_sync.connect(replicas.weight_targets(timeout_s=60), backend="gloo", master_address="127.0.0.1",
                             bucket_bytes=16 << 10, timeout_s=60) as g:
        yield g


def weights(path: str) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


def greedy(actor) -> list[list[int]]:
    outs = ray.get(actor.generate_batch.remote(PROMPTS, GREEDY), timeout=STEP_S)
    return [o.output_ids for o in outs]


def test_replicas_serve_with_logprobs_and_versions(replicas, infos, expected):
    assert len({i.address for i in infos}) == 2
    assert [i.bundle_index for i in infos] == [0, 1]
    assert {i.placement_group_id for i in infos} == {replicas.placement_group.id.hex()}
    for actor in replicas.actors:
        assert greedy(actor) == expected["first"]
    outs = ray.get(replicas.actors[0].generate.remote(PROMPTS[0], {"n": 3, "max_new_tokens": 6, "seed": 1}),
                   timeout=STEP_S)
    assert [o.index for o in outs] == [0, 1, 2]
    for o in outs:
        assert len(o.output_logprobs) == len(o.output_ids) == len(o.weight_versions) > 0
        assert all(lp <= 0.0 for lp in o.output_logprobs)
        assert set(o.weight_versions) == {0}
    info = ray.get(replicas.actors[1].info.remote(), timeout=STEP_S)
    assert info.weight_version == 0 and info.weights_valid and not info.paused
    with pytest.raises(InvalidArgumentError, match="n"):
        ray.get(replicas.actors[0].generate.remote(PROMPTS[0], {"n": 0}), timeout=STEP_S)


def test_trainer_pushes_a_second_model_to_every_replica(replicas, group, models, expected):
    assert group.push(weights(models["second"]).items(), version=5) == 5
    for actor in replicas.actors:
        assert greedy(actor) == expected["second"]
        [out] = ray.get(actor.generate.remote(PROMPTS[1], GREEDY), timeout=STEP_S)
        assert set(out.weight_versions) == {5}
        assert ray.get(actor.info.remote(), timeout=STEP_S).weight_version == 5
    # And back: the same group carries the next push.
    assert group.push(weights(models["first"]).items(), version=6) == 6
    assert greedy(replicas.actors[0]) == expected["first"]


def test_in_place_pause_lets_a_sample_finish_under_the_new_version(replicas, infos, group, models):
    actor = replicas.actors[0]
    old = ray.get(actor.info.remote(), timeout=STEP_S).weight_version
    new = old + 1
    long = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
    with RolloutClient(infos[0].address, timeout=STEP_S) as client:
        stream = client.stream(PROMPTS[0], long, return_logprob=True, timeout=60)
        versions = list(next(stream).weight_versions)  # the request is running
        ray.get(actor.pause.remote(PauseMode.IN_PLACE), timeout=STEP_S)
        info = ray.get(actor.info.remote(), timeout=STEP_S)
        assert info.paused and info.num_paused == 1
        group.push(weights(models["second"]).items(), version=new)
        ray.get(actor.continue_.remote(), timeout=STEP_S)
        for chunk in stream:
            versions += chunk.weight_versions
            if new in versions or chunk.finished:
                break
        stream.close()  # aborts the rest
    assert versions[0] == old and versions[-1] == new, "the sample must span the push"
    assert versions == sorted(versions)  # old tokens first, then the new version only


def test_release_and_resume_round_trip(replicas, group, models, expected):
    actor = replicas.actors[1]
    ray.get(actor.pause.remote(PauseMode.ABORT), timeout=STEP_S)
    states = ray.get(actor.release_memory.remote(["kv_cache", "weights"]), timeout=STEP_S)
    assert states["kv_cache"]["state"] == "released" and states["weights"]["state"] == "released"
    with pytest.raises(FailedPreconditionError, match="kv_cache"):
        ray.get(actor.generate.remote(PROMPTS[0], GREEDY), timeout=STEP_S)
    ray.get(actor.resume_memory.remote(["weights"]), timeout=STEP_S)
    # Released weights have no backup on CPU: they come back by a push, as in a colocated step.
    version = ray.get(actor.info.remote(), timeout=STEP_S).weight_version + 1
    assert group.push(weights(models["second"]).items(), version=version) == version
    ray.get(actor.resume_memory.remote(["kv_cache"]), timeout=STEP_S)
    ray.get(actor.continue_.remote(), timeout=STEP_S)
    info = ray.get(actor.info.remote(), timeout=STEP_S)
    assert all(m["state"] == "active" for m in info.memory.values()) and not info.paused
    assert greedy(actor) == expected["second"]


def test_abort_and_flush_through_the_actor(replicas):
    actor = replicas.actors[0]
    long = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
    ref = actor.generate.remote(PROMPTS[2], long, request_id="long-one")
    deadline = time.monotonic() + STEP_S
    while ray.get(actor.info.remote(), timeout=STEP_S).num_running == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    ray.get(actor.abort.remote("long-one"), timeout=STEP_S)
    [out] = ray.get(ref, timeout=STEP_S)
    assert out.finish_reason == FinishReason.ABORT and 0 < len(out.output_ids) < long.max_new_tokens
    assert ray.get(actor.info.remote(), timeout=STEP_S).kv_cached_tokens > 0
    ray.get(actor.flush_cache.remote(), timeout=STEP_S)
    assert ray.get(actor.info.remote(), timeout=STEP_S).kv_cached_tokens == 0


def test_router_keeps_each_group_on_one_replica(replicas, infos):
    prompts = [[300 + i, 7, 8, 9, 10, 11, 12] for i in range(4)]
    group_sp = {"n": 4, "max_new_tokens": 3, "seed": 0}

    async def route() -> tuple[list[int], list[list[int]], tuple[int, ...]]:
        async with RolloutRouter([i.address for i in infos]) as router:
            await router.pause(PauseMode.ABORT)  # every replica: a quiet point to flush at
            await router.flush_cache()
            await router.continue_()
            outs = await router.generate_batch(prompts, group_sp)
            assert len(outs) == 4 * len(prompts)
            where = [router.policy.replica_of(p) for p in prompts]
            # The same prompts again, one sample each: each goes where its group went, and finds its KV.
            again = [await router.generate(p, {"max_new_tokens": 1}) for p in prompts]
            assert [router.policy.replica_of(p) for p in prompts] == where
            return where, [[o.cached_tokens for o in outs] for outs in again], router.policy.routed

    where, cached, routed = asyncio.run(asyncio.wait_for(route(), 60))
    assert sorted(where) == [0, 0, 1, 1], "idle replicas of equal load share the groups"
    assert all(c[0] > 0 for c in cached)
    assert routed == (4, 4)
    # Server side: only the replica that ran a prompt's group holds that prompt in its prefix cache.
    clients = [RolloutClient(i.address, timeout=STEP_S) for i in infos]
    try:
        for p, r in zip(prompts, where):
            hits = [c.generate(p, {"max_new_tokens": 1})[0].cached_tokens > 0 for c in clients]
            assert hits == [k == r for k in range(2)]
    finally:
        for c in clients:
            c.close()


def test_colocated_replica_on_a_trainer_bundle(ray_cluster, models):
    trainer_pg = ray.util.placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
    ray.get(trainer_pg.ready(), timeout=STEP_S)
    try:
        with pytest.raises(InvalidArgumentError, match="bundle_indices"):
            create_rollout_actors(RolloutServerConfig(models["first"]), 1, placement_group=trainer_pg,
                                  bundle_indices=[2])
        reps = create_rollout_actors(RolloutServerConfig(models["first"], max_total_tokens=1024), 1,
                                     placement_group=trainer_pg, bundle_indices=[1], num_cpus=0.25)
        [info] = reps.ready(timeout_s=120)
        assert (info.placement_group_id, info.bundle_index) == (trainer_pg.id.hex(), 1)
        # The trainer's own worker still fits beside it on the same bundle.
        pg_strategy = ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
            trainer_pg, placement_group_bundle_index=1)
        trainer_step = ray.remote(num_cpus=0.25, scheduling_strategy=pg_strategy)(_trainer_step)
        assert ray.get(trainer_step.remote(), timeout=STEP_S) == "stepped"
        actor = reps.actors[0]
        assert len(ray.get(actor.generate.remote([5, 6, 7], {"max_new_tokens": 2}), timeout=STEP_S)) == 1
        assert ray.get(actor.shutdown.remote(), timeout=STEP_S) == 0  # the server stopped cleanly
        assert not process_running(info.server_pid) and not ray.get(actor.server_alive.remote(), timeout=STEP_S)
        with pytest.raises(FailedPreconditionError, match="shut down"):
            ray.get(actor.generate.remote([5, 6, 7]), timeout=STEP_S)
        reps.shutdown()  # again: harmless; ends the actor
    finally:
        ray.util.remove_placement_group(trainer_pg)




def test_a_two_rank_replica_takes_pushes_as_two_ranks(ray_cluster, models, expected):
    config = RolloutServerConfig(models["first"], max_total_tokens=4096, extra_args=("--tp-size", "2"))
    reps = create_rollout_actors(config, 1, num_cpus=0.25)
    try:
        [info] = reps.ready(timeout_s=120)
        assert info.engine_ranks == 2
        [actor] = reps.actors
        assert greedy(actor) == expected["first"]
        with weight_sync.connect(reps.weight_targets(timeout_s=60), backend="gloo", master_address="127.0.0.1",
                                 bucket_bytes=16 << 10, timeout_s=60) as g:
            assert g.comm.cfg.world_size == 3  # the trainer and both engine ranks
            assert g.push(weights(models["second"]).items(), version=3) == 3
            assert greedy(actor) == expected["second"]
    finally:
        reps.shutdown()


def _trainer_step() -> str:
    return "stepped"


def test_a_failed_start_leaves_no_placement_group_behind(ray_cluster, models):
    """An actor name already taken fails the start: the group made for it is removed (it held its
    bundles for good, and the caller had no handle to remove it)."""
    holder = ray.remote(num_cpus=0)(_NameHolder).options(name="taken-0").remote()
    ray.get(holder.ping.remote(), timeout=STEP_S)

    def live_groups() -> set:
        return {k for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}

    before = live_groups()
    try:
        with pytest.raises(ValueError, match="taken-0"):
            create_rollout_actors(RolloutServerConfig(models["first"]), 1, num_cpus=0.1, name_prefix="taken")
        assert live_groups() <= before
    finally:
        ray.kill(holder)


class _NameHolder:
    def ping(self) -> int:
        return 1
