"""release_memory / resume_memory through the in-process Engine on CPU: the colocated RL cycle and misuse."""

from __future__ import annotations

import pytest
import torch

from rollout import Engine, SamplingParams
from rollout.config import CacheConfig
from rollout.control.memory_placement import EngineMemory
from rollout.errors import FailedPreconditionError, InvalidArgumentError
from rollout.models.loader import load_model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_new_tokens=100, ignore_eos=True)
PROMPTS = [[5, 17, 99, 3, 250, 8], [5, 17, 99, 3, 41], [300, 2, 77]]
OPTS = dict(max_total_tokens=512)


def outputs(engine: Engine) -> list[tuple[list[int], list[float]]]:
    outs = engine.generate(PROMPTS, GREEDY, return_logprob=True)
    return [(o.output_ids, o.output_logprobs) for o in outs]


def assert_same(got: list, ref: list) -> None:
    for (ids, lps), (rids, rlps) in zip(got, ref, strict=True):
        assert ids == rids
        assert max(abs(a - b) for a, b in zip(lps, rlps)) < 1e-4


def start_and_freeze(engine: Engine, prompt: list[int]):
    """Start a streamed request, wait for its first tokens, pause in place; returns (stream, tokens so far)."""
    stream = engine.stream(prompt, LONG)
    first = next(stream)
    engine.pause("in_place")
    info = engine.info()
    assert info.paused and info.pause_mode == "in_place", f"pause('in_place') returned, yet the engine reports {info}"
    if info.num_waiting:
        what = "retracted it to the queue instead of freezing it with its KV"
    elif not info.num_running:
        what = f"ended it (the pause came after {len(first.token_ids)} of its {LONG.max_new_tokens} tokens)"
    else:
        what = f"counts {info.num_paused} paused requests"
    assert info.num_paused == 1 and info.num_running == 1 and not info.num_waiting, (
        f"pause('in_place') while one request was generating: the engine {what}")
    return stream, list(first.token_ids)


def rest(stream) -> list[int]:
    return [t for chunk in stream for t in chunk.token_ids]


def test_cycle_with_weight_backup_gives_identical_generation(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path, memory_backup_tags=("weights",), **OPTS) as engine:
        ref = outputs(engine)
        ref_long = engine.generate(PROMPTS[0], LONG)[0].output_ids
        info = engine.info()
        assert info.memory["weights"] == {"state": "active", "bytes": info.memory["weights"]["bytes"], "backup": True}
        assert info.memory["weights"]["bytes"] > 0 and info.memory["kv_cache"]["bytes"] > 0

        stream, head = start_and_freeze(engine, PROMPTS[0])
        states = engine.release_memory(["kv_cache", "weights"])
        assert states["kv_cache"]["state"] == states["weights"]["state"] == "released"
        info = engine.info()
        # The frozen request went back to the queue; its KV and the prefix cache are gone.
        assert info.num_running == 0 and info.num_waiting == 1 and info.kv_used_tokens == 0
        assert info.kv_cached_tokens == 0 and info.memory["cuda_graph"]["state"] == "active"
        with pytest.raises(FailedPreconditionError, match="kv_cache") as exc:
            engine.generate(PROMPTS[1], GREEDY)
        assert "weights" in str(exc.value) and "resume_memory" in str(exc.value)

        engine.resume_memory(["weights"])
        with pytest.raises(FailedPreconditionError, match="memory of kv_cache is released"):
            engine.generate(PROMPTS[1], GREEDY)
        engine.resume_memory(["kv_cache"])
        assert engine.info().weights_valid
        engine.continue_()
        # The retracted request is recomputed and ends exactly as an uninterrupted run.
        assert head + rest(stream) == ref_long
        assert_same(outputs(engine), ref)
        engine.check_integrity()


def test_release_without_backup_refuses_until_new_weights(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    new_path = tiny_model_dir("qwen3", seed=7)
    with Engine(new_path, **OPTS) as engine:
        ref_new = outputs(engine)
    with Engine(path, **OPTS) as engine:
        ref = outputs(engine)
        assert ref != ref_new  # the two checkpoints really differ
        engine.pause("retract")
        engine.release_memory(["kv_cache", "weights"])
        assert not engine.info().weights_valid
        # While the weights' memory is released, no update may write into it.
        with pytest.raises((FailedPreconditionError, InvalidArgumentError)):
            engine.update_weights_from_disk(new_path)
        engine.resume_memory(["weights"])
        info = engine.info()
        assert info.memory["weights"]["state"] == "active" and not info.weights_valid
        engine.continue_()
        with pytest.raises(FailedPreconditionError, match="released without a host backup"):
            engine.generate(PROMPTS[0], GREEDY)
        try:
            engine.update_weights_from_disk(new_path, version=1)
        except InvalidArgumentError as e:  # weight updates not in this build: generation stays refused
            assert "unknown control operation" in str(e)
            with pytest.raises(FailedPreconditionError, match="update_weights"):
                engine.generate(PROMPTS[0], GREEDY)
            return
        with pytest.raises(FailedPreconditionError, match="kv_cache"):
            engine.generate(PROMPTS[0], GREEDY)
        engine.resume_memory(["kv_cache"])
        assert engine.info().weights_valid
        assert_same(outputs(engine), ref_new)
        engine.check_integrity()


def test_misuse_gets_clear_errors_and_no_crash(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path, **OPTS) as engine:
        ref = outputs(engine)
        stream = engine.stream(PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True))
        next(stream)
        with pytest.raises(FailedPreconditionError, match="pause first"):
            engine.release_memory()
        engine.abort()
        rest(stream)
        with pytest.raises(InvalidArgumentError, match="'activations'"):
            engine.release_memory(["kv_cache", "activations"])
        with pytest.raises(InvalidArgumentError, match="'optimizer'"):
            engine.resume_memory(["optimizer"])
        for bad in (5, [1, 2], {"weights": 1}):  # a bare TypeError before
            with pytest.raises(InvalidArgumentError, match="memory tag"):
                engine.release_memory(bad)  # type: ignore[arg-type]
        assert engine.info().memory["kv_cache"]["state"] == "active"  # nothing changed

        # Idle (nothing running) is enough: no pause needed. Twice is harmless, in both directions.
        first = engine.release_memory(["kv_cache"])
        assert engine.release_memory(["kv_cache"]) == first
        assert first["kv_cache"]["state"] == "released" and first["weights"]["state"] == "active"
        with pytest.raises(FailedPreconditionError, match="memory of kv_cache is released"):
            engine.generate(PROMPTS[0], GREEDY)
        engine.resume_memory()
        again = engine.resume_memory()
        assert all(s["state"] == "active" for s in again.values())
        assert_same(outputs(engine), ref)
        engine.release_memory([])  # no tags: every tag
        assert all(s["state"] == "released" for s in engine.info().memory.values())
        engine.resume_memory(None)
        engine.check_integrity()
    with pytest.raises(InvalidArgumentError, match="memory_backup_tags"):
        CacheConfig(memory_backup_tags=("weights", "bogus"))
    assert CacheConfig(memory_backup_tags=["weights"]).memory_backup_tags == ("weights",)


def test_place_weights_moves_parameters_into_one_arena(tiny_model_dir) -> None:
    from rollout.config import ModelConfig

    path = tiny_model_dir("qwen3", tie_word_embeddings=True)
    cfg = ModelConfig.from_pretrained(path)
    model = load_model(cfg, path, torch.float32, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mem = EngineMemory("cpu", backup_tags=["weights"])
    nbytes = mem.place_weights(model)
    (arena,) = mem.saver.region("weights").arenas
    assert nbytes == arena.nbytes >= sum(p.numel() * 4 for p in model.parameters())
    base, end = arena.data.data_ptr(), arena.data.data_ptr() + arena.nbytes
    for name, p in model.named_parameters():
        assert base <= p.data_ptr() < end and torch.equal(p, before[name]), name
    mem.saver.release(["weights"])
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    mem.saver.resume(["weights"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    kv = mem.allocate_kv((10, 2, 16), torch.float32, 4)
    assert len(kv) == 4 and len({t.data_ptr() for t in kv}) == 4 and all(int(t.count_nonzero()) == 0 for t in kv)


def test_allocate_kv_hands_out_views_that_release_frees() -> None:
    mem = EngineMemory("cpu")
    kv = mem.allocate_kv((10, 2, 16), torch.float32, 4)
    (arena,) = mem.saver.region("kv_cache").arenas
    offsets = [t.data_ptr() - arena.data.data_ptr() for t in kv]
    assert all(t.untyped_storage().data_ptr() == arena.data.untyped_storage().data_ptr() for t in kv), (
        "allocate_kv handed out tensors that are not views of the kv_cache arena")
    for t in kv:
        t.fill_(1.0)
    mem.saver.release(["kv_cache"])
    kept = [t.untyped_storage().nbytes() for t in kv]
    assert kept == [0] * 4, f"after releasing kv_cache the KV tensors still hold {kept} bytes"
    mem.saver.resume(["kv_cache"])
    # CPU storage comes back at a new address; the views follow it, each at its old place in the arena.
    assert [t.data_ptr() - arena.data.data_ptr() for t in kv] == offsets
    assert all(t.untyped_storage().nbytes() == arena.nbytes for t in kv)
    assert all(int(t.count_nonzero()) == 0 for t in kv)  # no backup for kv_cache: zeros, not the old ones


def test_engine_release_frees_the_kv_pool_buffers_and_resume_restores_them(tiny_model_dir, engine_cores) -> None:
    cores = engine_cores
    with Engine(tiny_model_dir("qwen3"), **OPTS) as engine:
        ref = outputs(engine)
        runner = cores[0].runner
        buffers = runner.kv_pool.k_buffers + runner.kv_pool.v_buffers
        (arena,) = runner.memory.saver.region("kv_cache").arenas
        offsets = [b.data_ptr() - arena.data.data_ptr() for b in buffers]
        assert all(b.untyped_storage().nbytes() == arena.nbytes for b in buffers), (
            "the KV pool's buffers are not views of the kv_cache arena")
        engine.release_memory(["kv_cache"])
        kept = sum(b.untyped_storage().nbytes() for b in buffers)
        assert kept == 0, f"release_memory(['kv_cache']) left the KV pool's buffers holding {kept} bytes"
        engine.resume_memory(["kv_cache"])
        # On CUDA the addresses themselves stay (tests/gpu); on CPU each buffer keeps its place in the arena.
        assert [b.data_ptr() - arena.data.data_ptr() for b in buffers] == offsets
        assert all(b.untyped_storage().nbytes() == arena.nbytes for b in buffers)
        assert_same(outputs(engine), ref)
        engine.check_integrity()
