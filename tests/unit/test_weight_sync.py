"""Weight updates end to end on CPU: gloo groups, shared memory, disk; versions; failures.

A trainer perturbs every weight of a tiny model and pushes it; the engines must then generate
exactly what transformers generates with the perturbed weights (greedy, token for token).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import threading
import time

import pytest
import torch

import weight_sync
from rollout import Engine, SamplingParams
from rollout.config import ModelConfig
from rollout.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from rollout.models.loader import iter_checkpoint
from tests.hf_oracle import hf_greedy
from tests.weight_helpers import client_outputs as engine_outputs
from tests.weight_helpers import perturb_checkpoint, write_checkpoint
from weight_sync.buckets import layouts_to_args, plan_buckets

MAX_NEW = 8
PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [11, 12, 13, 14, 15, 16, 17, 90, 91], [200, 3, 45]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW)
ENGINE_OPTS = dict(max_total_tokens=4096)
BUCKET = 16 << 10  # several buckets for the tiny model; the embedding is larger than one


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def perturbed(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], str]:
    """Every weight changed by a few percent, and an HF directory holding them (for the oracle)."""
    return perturb_checkpoint(model_dir, str(tmp_path_factory.mktemp("perturbed")), seed=123)


def oracle(path: str) -> list[list[int]]:
    eos = ModelConfig.from_pretrained(path).eos_token_ids
    return [hf_greedy(path, p, MAX_NEW, eos)[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(model_dir: str, perturbed) -> dict[str, list[list[int]]]:
    out = {"old": oracle(model_dir), "new": oracle(perturbed[1])}
    assert out["old"] != out["new"], "the perturbation must change the greedy output"
    return out


def outputs(engine: Engine) -> list[list[int]]:
    return [o.output_ids for o in engine.generate(PROMPTS, GREEDY)]


def client_outputs(client) -> list[list[int]]:
    """Greedy outputs of an engine process, through its EngineClient."""
    return engine_outputs(client, PROMPTS, GREEDY)


def test_gloo_push_to_two_engines_matches_transformers(model_dir, perturbed, expected) -> None:
    weights, _ = perturbed
    other = Engine(model_dir, separate_process=True, **ENGINE_OPTS)  # a server-style engine process
    try:
        with Engine(model_dir, **ENGINE_OPTS) as engine:
            assert outputs(engine) == expected["old"]
            group = weight_sync.connect([engine, other], backend="gloo", bucket_bytes=BUCKET, timeout_s=60)
            with group:
                assert group.comm.cfg.world_size == 3
                assert group.push(weights.items(), version=7) == 7
                assert outputs(engine) == expected["new"]
                assert client_outputs(other) == expected["new"]
                outs = engine.generate(PROMPTS[0], GREEDY)
                assert outs[0].weight_versions == [7] * len(outs[0].output_ids)
                assert engine.info().weight_version == 7 and other.info().weight_version == 7
                # Groups can be used again, then destroyed and formed again.
                assert group.push(iter_checkpoint(model_dir), version=8) == 8
                assert outputs(engine) == expected["old"]
                # The same state dict twice in a row: both sides reuse the plan and the layout.
                assert group.push(weights.items(), version=10) == 10
                assert group.push(iter_checkpoint(model_dir), version=11) == 11
                assert group.push(iter_checkpoint(model_dir), version=12) == 12
                assert outputs(engine) == expected["old"] and client_outputs(other) == expected["old"]
            with pytest.raises(NotFoundError):
                engine.destroy_weight_update_group(group.group_name)
            with weight_sync.connect([engine], backend="gloo", timeout_s=60) as again:
                assert again.push(weights.items()) == 13  # no version: the engine counts on
            assert outputs(engine) == expected["new"]
            engine.check_integrity()
    finally:
        other.shutdown()


def test_shared_memory_push_matches_transformers(model_dir, perturbed, expected, monkeypatch) -> None:
    import weight_sync.colocated
    from weight_sync.shm import SHM_DIR, ExportedBuffer

    weights, _ = perturbed
    made: list[str] = []

    class Recorded(ExportedBuffer):
        def __init__(self, nbytes: int) -> None:
            super().__init__(nbytes)
            made.append(self.name)

    monkeypatch.setattr(weight_sync.colocated, "ExportedBuffer", Recorded)
    with Engine(model_dir, **ENGINE_OPTS) as a, Engine(model_dir, **ENGINE_OPTS) as b:
        assert weight_sync.push_tensors_shm([a, b], weights.items(), version=3, bucket_bytes=BUCKET) == 3
        assert outputs(a) == expected["new"] and outputs(b) == expected["new"]
        assert a.info().weight_version == 3 and b.info().weight_version == 3
    assert len(made) > 2  # one segment per bucket
    assert not any(os.path.exists(os.path.join(SHM_DIR, name)) for name in made)  # all unlinked


def test_disk_update_matches_transformers(model_dir, perturbed, expected) -> None:
    with Engine(model_dir, **ENGINE_OPTS) as engine:
        assert engine.update_weights_from_disk(perturbed[1]) == 1  # no version: previous + 1
        assert outputs(engine) == expected["new"]
        assert engine.update_weights_from_disk(model_dir, version=10) == 10
        assert outputs(engine) == expected["old"]
        with pytest.raises(InvalidArgumentError, match="model_path"):
            engine.update_weights_from_disk(os.path.join(model_dir, "missing"))


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.0.self_attn.q_proj.weight"])
def test_disk_update_with_a_broadcastable_wrong_shape_is_rejected(model_dir, expected, tmp_path, name) -> None:
    weights = dict(iter_checkpoint(model_dir))
    weights[name] = weights[name][:1].clone()  # (1,) or (1, hidden): copy_ would broadcast it over the parameter
    bad_dir = write_checkpoint(model_dir, weights, str(tmp_path))
    with Engine(model_dir, **ENGINE_OPTS) as engine:
        with pytest.raises(InvalidArgumentError, match=re.escape(name)):
            engine.update_weights_from_disk(bad_dir, version=1)
        info = engine.info()
        assert info.weight_version == 0 and info.weights_valid
        assert outputs(engine) == expected["old"]


def test_in_place_pause_push_continue(model_dir, perturbed, expected) -> None:
    weights, _ = perturbed
    with Engine(model_dir, **ENGINE_OPTS) as engine:
        assert outputs(engine) == expected["old"]  # the prompts' prefixes are now cached under version 0
        long = SamplingParams(temperature=0.0, max_new_tokens=1500, ignore_eos=True)
        stream = engine.stream(PROMPTS[2], long, request_id="long")
        versions = list(next(stream).weight_versions)
        engine.pause("in_place")
        with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            group.push(weights.items(), version=5)
        assert engine.info().paused and engine.info().num_running == 1  # frozen, not finished
        engine.continue_()
        for chunk in stream:
            versions += chunk.weight_versions
            if 5 in versions:
                break
        engine.abort("long")
        stream.close()
        assert versions[0] == 0 and versions[-1] == 5 and versions == sorted(versions)
        # A prompt seen before the update is computed afresh under the new weights.
        assert outputs(engine) == expected["new"]
        engine.check_integrity()


def _dying_trainer(port_queue, model_dir: str, bucket_bytes: int) -> None:
    """Trainer rank 0 that sends the first bucket of a push, then dies."""
    from weight_sync.buckets import pack_bucket
    from weight_sync.group import CommGroup, GroupConfig, master_store

    store = master_store("127.0.0.1", None, 2, 60)
    port_queue.put(store.port)
    comm = CommGroup.join(GroupConfig("127.0.0.1", store.port, 0, 2, "dying", "gloo", 60), "cpu", store)
    tensors = dict(iter_checkpoint(model_dir))
    layouts = plan_buckets(((n, t.dtype, t.shape) for n, t in tensors.items()), bucket_bytes)
    assert comm.vote(0) == 0
    first = layouts[0]
    comm.wait(comm.broadcast(pack_bucket(first, [tensors[t.name] for t in first.tensors])), "bucket 0")
    time.sleep(1.0)  # the engine reads bucket 0 before it sees the connection close
    os._exit(1)


def test_trainer_killed_mid_push_then_recovery(model_dir, perturbed, expected) -> None:
    weights, _ = perturbed
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    trainer = ctx.Process(target=_dying_trainer, args=(ports, model_dir, BUCKET), daemon=True)
    trainer.start()
    with Engine(model_dir, **ENGINE_OPTS) as engine:
        port = ports.get(timeout=120)
        engine.init_weight_update_group(master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2,
                                        group_name="dying", backend="gloo", timeout_s=60)
        layouts = plan_buckets(((n, t.dtype, t.shape) for n, t in iter_checkpoint(model_dir)), BUCKET)
        assert len(layouts) > 2
        with pytest.raises(FailedPreconditionError) as failure:
            engine.update_weights_from_distributed(group_name="dying", version=1, **layouts_to_args(layouts))
        total = sum(len(lay.tensors) for lay in layouts)
        assert "weights are invalid" in str(failure.value) and "receiving bucket 2" in str(failure.value)
        assert f"{len(layouts[0].tensors)} of {total} tensors were written" in str(failure.value)
        trainer.join(timeout=30)
        info = engine.info()
        assert not info.weights_valid and info.weight_version == 0
        with pytest.raises(FailedPreconditionError, match="weights are invalid after a failed update"):
            engine.generate(PROMPTS[0], GREEDY)
        with pytest.raises(NotFoundError):  # the broken group was destroyed
            engine.destroy_weight_update_group("dying")
        with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            group.push([(n, t) for n, t in weights.items() if "norm" in n], version=2)  # not every parameter
            with pytest.raises(FailedPreconditionError):
                engine.generate(PROMPTS[0], GREEDY)
            group.push(weights.items(), version=3)
        assert engine.info().weights_valid
        assert outputs(engine) == expected["new"]
        engine.check_integrity()


def test_an_engine_failing_before_the_vote_releases_the_others_quickly(model_dir, perturbed, expected) -> None:
    weights, _ = perturbed
    with Engine(model_dir, **ENGINE_OPTS) as a, Engine(model_dir, **ENGINE_OPTS) as b:
        group = weight_sync.connect([a, b], backend="gloo", bucket_bytes=BUCKET, timeout_s=120)
        b.destroy_weight_update_group(group.group_name)  # b will not take part in the next push
        start = time.monotonic()
        with pytest.raises(NotFoundError, match="group_name"):
            group.push(weights.items(), version=2)
        # a was waiting in the status vote: the group's abort signal freed it long before the timeout.
        assert time.monotonic() - start < 20
        with pytest.raises(NotFoundError):
            a.destroy_weight_update_group(group.group_name)  # a dropped the failed group
        assert a.info().weights_valid and outputs(a) == expected["old"]
        with weight_sync.connect([a, b], backend="gloo", timeout_s=60) as again:
            again.push(weights.items(), version=3)
        assert outputs(a) == expected["new"] and outputs(b) == expected["new"]


def test_group_abort_signal_frees_a_member_waiting_on_a_collective() -> None:
    from weight_sync.group import CommGroup, GroupConfig, GroupFailedError, master_store

    store = master_store("127.0.0.1", None, 3, 60)
    groups: dict[int, CommGroup] = {}

    def join(rank: int) -> None:
        cfg = GroupConfig("127.0.0.1", store.port, rank, 3, "signal", "gloo", 60)
        groups[rank] = CommGroup.join(cfg, "cpu", store if rank == 0 else None)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    errors: list[BaseException] = []

    def vote() -> None:  # rank 2 never takes part: without the signal this waits 60 s
        try:
            groups[1].vote(0)
        except GroupFailedError as e:
            errors.append(e)

    waiter = threading.Thread(target=vote)
    start = time.monotonic()
    waiter.start()
    groups[0].abort("the trainer gave up")
    waiter.join(timeout=30)
    assert time.monotonic() - start < 5
    assert len(errors) == 1 and "rank 0: the trainer gave up" in str(errors[0])
    assert groups[1].broken
    for g in groups.values():
        g.close()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model.norm.weight": torch.zeros(3)}, "model.norm.weight: shape mismatch: expected (64,), got (3,)"),
        ({"model.layers.0.self_attn.q_proj.weight": torch.zeros(5, 64)},
         "model.layers.0.self_attn.q_proj.weight: shape mismatch: expected (64, 64), got (5, 64) "
         "(loading into model.layers.0.self_attn.qkv_proj.weight[q])"),
        ({"model.layers.9.mlp.up_proj.weight": torch.zeros(4, 4)},
         "weights: unexpected checkpoint keys: 'model.layers.9.mlp.up_proj.weight'"),
        ({"model.norm.weight": torch.zeros(64, dtype=torch.int32)},
         "model.norm.weight: dtype int32 is not a floating-point weight dtype"),
        # Wrong shapes that broadcast: an in-place copy_ alone would accept them and fill the parameter.
        ({"model.norm.weight": torch.ones(1)}, "model.norm.weight: shape mismatch: expected (64,), got (1,)"),
        ({"model.layers.0.self_attn.q_proj.weight": torch.ones(1, 64)},
         "model.layers.0.self_attn.q_proj.weight: shape mismatch: expected (64, 64), got (1, 64) "
         "(loading into model.layers.0.self_attn.qkv_proj.weight[q])"),
        ({"model.layers.1.mlp.down_proj.weight": torch.ones(1, 128)},
         "model.layers.1.mlp.down_proj.weight: shape mismatch: expected (64, 128), got (1, 128)"),
    ],
    ids=["shape", "fused-shard-shape", "unknown-name", "int-dtype", "broadcast-norm", "broadcast-fused-shard",
         "broadcast-row"],
)
def test_bad_update_is_rejected_and_old_weights_keep_serving(model_dir, perturbed, expected, change, message) -> None:
    # The whole message: each tensor name appears once.
    match = f"^{re.escape(message)}$"
    weights = dict(perturbed[0])
    weights.update(change)
    with Engine(model_dir, **ENGINE_OPTS) as engine:
        with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            with pytest.raises(InvalidArgumentError, match=match):
                group.push(weights.items(), version=4)
            assert engine.info().weight_version == 0 and engine.info().weights_valid
            assert outputs(engine) == expected["old"]
            with pytest.raises(InvalidArgumentError, match=match):
                weight_sync.push_tensors_shm([engine], weights.items(), version=4)
            assert outputs(engine) == expected["old"]
            group.push(perturbed[0].items(), version=5)  # the group survived the rejection
        assert outputs(engine) == expected["new"]


def test_bad_arguments_are_rejected_by_name(model_dir) -> None:
    with Engine(model_dir, **ENGINE_OPTS) as engine:
        with pytest.raises(NotFoundError, match="group_name"):
            engine.update_weights_from_distributed(group_name="nope", names=[], dtypes=[], shapes=[], version=1)
        with pytest.raises(TypeError, match="bucket_byts"):  # a typed signature: Python names the keyword
            engine.update_weights_from_tensor(names=[], dtypes=[], shapes=[], sources=[], bucket_byts=1)
        with pytest.raises(InvalidArgumentError, match="backend"):
            engine.init_weight_update_group(master_address="127.0.0.1", master_port=1234, rank_offset=1,
                                            world_size=2, group_name="g", backend="mpi")
        with pytest.raises(InvalidArgumentError, match="rank_offset"):
            engine.init_weight_update_group(master_address="127.0.0.1", master_port=1234, rank_offset=0,
                                            world_size=2, group_name="g", backend="gloo")
        src = {"shared_memory": {"name": "../../etc/passwd", "offset": 0, "size": 256}}
        with pytest.raises(InvalidArgumentError, match="name"):
            engine.update_weights_from_tensor(names=["model.norm.weight"], dtypes=["float32"], shapes=[[64]],
                                              sources=[src], version=1)
        with pytest.raises(InvalidArgumentError, match="version"):
            engine.update_weights_from_disk(model_dir, version=-1)
        assert engine.info().weights_valid and engine.info().weight_version == 0


def test_weights_released_without_backup_come_back_with_a_full_push(model_dir, perturbed, expected) -> None:
    weights, _ = perturbed
    with Engine(model_dir, **ENGINE_OPTS) as engine:
        engine.release_memory(["weights"])
        engine.resume_memory(["weights"])
        with pytest.raises(FailedPreconditionError, match="weights"):
            engine.generate(PROMPTS[0], GREEDY)
        weight_sync.push_tensors_shm([engine], [(n, t) for n, t in weights.items() if "layers.0." in n])
        assert not engine.info().weights_valid  # a partial push does not make the weights whole
        assert weight_sync.push_tensors_shm([engine], weights.items(), version=6) == 6
        assert engine.info().weights_valid and outputs(engine) == expected["new"]


@pytest.mark.parametrize("path", ["disk", "push"])
def test_an_update_that_keeps_the_version_never_reuses_old_prefix_kv(model_dir, perturbed, path) -> None:
    """The version is the trainer's label: KV computed under the old weights must not be reused
    under new ones even when the caller passes the current version again."""
    weights, new_dir = perturbed
    prompt = [(7 * i + 3) % 300 + 20 for i in range(40)]
    with Engine(new_dir, **ENGINE_OPTS) as fresh:
        [want] = fresh.generate(prompt, GREEDY)
    with Engine(model_dir, **ENGINE_OPTS) as engine:
        engine.generate(prompt, GREEDY)
        [again] = engine.generate(prompt, GREEDY)
        assert again.cached_tokens == len(prompt) - 1  # the prompt's KV is cached under version 0
        if path == "disk":
            assert engine.update_weights_from_disk(new_dir, version=0) == 0
        else:
            with weight_sync.connect([engine], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
                group.push(weights.items(), version=0)
        [after] = engine.generate(prompt, GREEDY)
        assert after.cached_tokens == 0, "KV computed under the old weights was reused under the new ones"
        assert after.output_ids == want.output_ids
        assert after.weight_versions == [0] * len(after.output_ids)
        engine.check_integrity()


def test_engines_on_different_versions_are_not_told_apart_silently(model_dir, perturbed) -> None:
    """Without a version each engine takes its own + 1: engines that started apart would tag the
    same weights 1 and 8, and the push answered 1. It raises now, naming the versions; an explicit
    version brings them together (over a group and over shared memory)."""
    weights, _ = perturbed
    with Engine(model_dir, **ENGINE_OPTS) as a, Engine(model_dir, **ENGINE_OPTS) as b:
        b.update_weights_from_disk(model_dir, version=7)
        with pytest.raises(FailedPreconditionError, match=r"different versions \[1, 8\]"):
            weight_sync.push_tensors_shm([a, b], weights.items())
        assert weight_sync.push_tensors_shm([a, b], weights.items(), version=9) == 9
        b.update_weights_from_disk(model_dir, version=20)
        with weight_sync.connect([a, b], backend="gloo", bucket_bytes=BUCKET, timeout_s=60) as group:
            with pytest.raises(FailedPreconditionError, match=r"different versions \[10, 21\]"):
                group.push(weights.items())
            assert group.push(weights.items(), version=30) == 30
        assert a.info().weight_version == b.info().weight_version == 30
