"""Bad input raises a clear error naming the field, and the engine keeps serving."""

from __future__ import annotations

import asyncio
import math

import pytest

from rollout import Engine, SamplingParams
from rollout.config import ModelConfig
from rollout.errors import InvalidArgumentError, OutOfRangeError, ResourceExhaustedError


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine(tiny_model_dir("qwen3"), max_total_tokens=1024) as eng:
        yield eng


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"top_k": 10**400}, "top_k"),  # once took the engine step down (float64 overflow) with every request in it
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens"),
    ],
)
def test_bad_sampling_params(kwargs, field) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and field in str(e.value)


def test_unknown_sampling_option() -> None:
    with pytest.raises(InvalidArgumentError, match="tempreature"):
        SamplingParams.from_dict({"tempreature": 1.0})


def test_unknown_engine_option(tiny_model_dir) -> None:
    with pytest.raises(InvalidArgumentError, match="max_runing_requests"):
        Engine(tiny_model_dir("qwen3"), max_runing_requests=3)


def test_bad_prompts_rejected_and_engine_keeps_serving(engine) -> None:
    good = [3, 4, 5]
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)
    with pytest.raises(InvalidArgumentError, match="input_ids.*empty"):
        engine.generate([], sp)
    with pytest.raises(InvalidArgumentError, match="input_ids.*outside the vocabulary"):
        engine.generate([1, 2, 10**6], sp)
    with pytest.raises(InvalidArgumentError, match="input_ids.*outside the vocabulary"):
        engine.generate([1, -2], sp)
    with pytest.raises(OutOfRangeError, match="max_new_tokens.*context length"):
        engine.generate(good, SamplingParams(max_new_tokens=10**6))
    with pytest.raises(ResourceExhaustedError, match="KV cache capacity"):
        engine.generate(good, SamplingParams(max_new_tokens=2040))
    with pytest.raises(InvalidArgumentError, match="stop_token_ids"):
        engine.generate(good, SamplingParams(stop_token_ids=[10**7]))
    with pytest.raises(InvalidArgumentError, match="top_logprobs_num"):
        engine.generate(good, sp, top_logprobs_num=1000)
    # A batch with one bad prompt is refused whole, before anything runs.
    with pytest.raises(InvalidArgumentError, match="index 1"):
        engine.generate([good, [1, 99999]], sp)
    assert engine.info().num_running == 0
    out = engine.generate(good, sp)[0]
    assert len(out.output_ids) >= 1
    engine.check_integrity()


def test_stop_ids_covering_the_vocabulary_before_min_new_tokens(engine, tiny_model_dir) -> None:
    vocab = engine.info().vocab_size
    eos = ModelConfig.from_pretrained(tiny_model_dir("qwen3")).eos_token_ids
    assert eos, "the tiny model has an EOS id"
    all_but_eos = [t for t in range(vocab) if t not in eos]
    # No token could be drawn before min_new_tokens: refused, naming the fields at fault.
    for kw in ({"stop_token_ids": list(range(vocab))}, {"stop_token_ids": all_but_eos},
               {"stop_token_ids": list(range(vocab)), "ignore_eos": True}):
        with pytest.raises(InvalidArgumentError, match="min_new_tokens.*whole vocabulary"):
            engine.generate([3, 4, 5], SamplingParams(min_new_tokens=3, max_new_tokens=4, **kw))
    # With ignore_eos the EOS ids stay drawable: served, with finite logprobs.
    out = engine.generate([3, 4, 5], SamplingParams(min_new_tokens=3, max_new_tokens=4, ignore_eos=True,
                                                    stop_token_ids=all_but_eos), return_logprob=True)[0]
    assert all(t in eos for t in out.output_ids[:3])
    assert all(math.isfinite(lp) for lp in out.output_logprobs)
    # Without min_new_tokens nothing is masked: any stop list is fine.
    out = engine.generate([3, 4, 5], SamplingParams(max_new_tokens=2, stop_token_ids=list(range(vocab))),
                          return_logprob=True)[0]
    assert len(out.output_ids) == 1 and math.isfinite(out.output_logprobs[0])


def test_async_generate(engine) -> None:
    sp = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
    sync = engine.generate([[7, 8, 9], [10, 11]], sp)

    async def main():
        return await engine.async_generate([[7, 8, 9], [10, 11]], sp)

    outs = asyncio.run(main())
    assert [o.output_ids for o in outs] == [o.output_ids for o in sync]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("stage", ["launch", "collect"])
def test_failed_step_fails_its_requests_frees_kv_and_keeps_serving(tiny_model_dir, stage, overlap) -> None:
    """A forward step that raises (when queued, or when its tokens are collected) fails the requests
    it held (INTERNAL), leaks no KV, and the engine serves the next request."""
    import rollout.runner.model_runner as mr
    from rollout.errors import RolloutError

    with Engine(tiny_model_dir("qwen3"), max_total_tokens=1024, overlap_schedule=overlap) as eng:
        sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
        ref = eng.generate([3, 4, 5], sp)[0].output_ids
        calls = {"n": 0}
        original = getattr(mr.ModelRunner, stage)

        def once_broken(self, arg):
            calls["n"] += 1
            if calls["n"] == 2:  # the second step: the first one's tokens are out already
                raise RuntimeError("device fell over")
            return original(self, arg)

        setattr(mr.ModelRunner, stage, once_broken)
        try:
            with pytest.raises(RolloutError, match="device fell over") as err:
                eng.generate([[3, 4, 5], [6, 7]], SamplingParams(max_new_tokens=4, n=2))
            assert err.value.code == "INTERNAL"
        finally:
            setattr(mr.ModelRunner, stage, original)
        eng.check_integrity()
        info = eng.info()
        assert info.kv_used_tokens == 0 and info.num_running == 0 and info.num_waiting == 0
        assert eng.generate([3, 4, 5], sp)[0].output_ids == ref


def test_a_cuda_device_without_index_means_the_current_one(monkeypatch) -> None:
    """``device="cuda"`` must carry an index: the engine loop thread makes the engine's device current
    with it (``torch.cuda.set_device("cuda")`` raises, which killed engines started with "cuda")."""
    import torch

    from rollout.runner.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_cuda_device_on_a_machine_without_one_is_a_clear_error(monkeypatch, tiny_model_dir) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(InvalidArgumentError, match="device: no CUDA device is available"):
            Engine(tiny_model_dir("qwen3"), device=device)
    with pytest.raises(InvalidArgumentError, match="device: .*cpu, cuda or cuda:N"):
        Engine(tiny_model_dir("qwen3"), device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InvalidArgumentError, match="device: cuda:2 .*2 CUDA devices"):
        Engine(tiny_model_dir("qwen3"), device="cuda:2")


def test_host_inputs_land_on_16_byte_aligned_views() -> None:
    """Every segment of a step's one host->device copy starts 16-byte aligned whatever the segment
    lengths: Triton compiles a kernel once per pointer alignment, and a misaligned view in one step
    compiled the rotary kernel again in the middle of a run (a 300 ms step)."""
    import torch

    from rollout.runner.model_runner import host_segments_to_device

    segments = [[7], [1, 2, 3], torch.arange(5), [], [4, 5], [9] * 11]
    views = host_segments_to_device(segments, torch.device("cpu"))
    for seg, view in zip(segments, views):
        assert view.data_ptr() % 16 == 0
        assert view.tolist() == (seg.tolist() if isinstance(seg, torch.Tensor) else seg)


def test_the_lm_head_runs_at_few_row_counts() -> None:
    """Sampled rows are padded to a short list of row counts (their cuBLAS kernels are loaded at
    start-up: a first launch waits for the device), never fewer rows than asked for."""
    from rollout.runner.cuda_graph import logits_rows

    counts = {logits_rows(n) for n in range(1, 2049)}
    assert len(counts) <= 64
    assert all(logits_rows(n) >= n for n in range(1, 3000))
    assert [logits_rows(n) for n in (1, 2, 3, 5, 9, 250, 257, 1025)] == [1, 2, 4, 8, 16, 256, 288, 1280]


def test_client_values_are_quoted_short_in_messages() -> None:
    from rollout.errors import quoted

    assert quoted("abc") == "'abc'"
    long = quoted("y" * 10_000)
    assert long.startswith("'yyy") and long.endswith("...[9922 more chars]") and len(long) < 110
    # An unknown option's name is the field: it is shortened too.
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams.from_dict({"z" * 100_000: 1})
    assert len(str(e.value)) < 1000 and "more chars]" in str(e.value)
    with pytest.raises(InvalidArgumentError) as e:
        SamplingParams(stop=["s" * 100_000, ""])
    assert len(str(e.value)) < 300 and "stop" in str(e.value)


def test_sampling_params_as_a_dict(engine) -> None:
    sp = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    want = engine.generate([3, 4, 5], sp)[0].output_ids
    as_dict = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True}
    assert engine.generate([3, 4, 5], as_dict)[0].output_ids == want
    assert engine.generate(input_ids=[3, 4, 5], sampling_params={"max_new_tokens": 4})[0].completion_tokens <= 4
    outs = engine.generate([[3, 4, 5], [3, 4, 5]], [as_dict, sp])
    assert [o.output_ids for o in outs] == [want, want]
    assert [t for c in engine.stream([3, 4, 5], as_dict) for t in c.token_ids] == want
    assert asyncio.run(engine.async_generate([3, 4, 5], as_dict))[0].output_ids == want
    with pytest.raises(InvalidArgumentError, match="max_tokens: unknown sampling option"):
        engine.generate([3, 4, 5], {"max_tokens": 4})
    with pytest.raises(InvalidArgumentError, match="sampling_params: must be a SamplingParams or a dict"):
        engine.generate([3, 4, 5], 4)


def test_more_samples_than_the_queue_holds_is_invalid_not_busy(tiny_model_dir) -> None:
    """A retry could never fit n samples into a smaller queue: INVALID_ARGUMENT, not 'retry later'."""
    with Engine(tiny_model_dir("qwen3"), max_total_tokens=256, max_queued_requests=2) as eng:
        with pytest.raises(InvalidArgumentError, match="exceed the queue") as err:
            eng.generate([3, 4, 5], SamplingParams(max_new_tokens=2, n=3))
        assert err.value.code == "INVALID_ARGUMENT"
        assert len(eng.generate([3, 4, 5], SamplingParams(max_new_tokens=2, n=2))) == 2


def test_an_argument_that_cannot_reach_the_engine_process_is_invalid(tiny_model_dir) -> None:
    """A control argument that cannot be pickled (a lambda, a generator) is refused in the caller;
    before, the queue's feeder thread dropped the command and the caller waited forever."""
    path = tiny_model_dir("qwen3")
    with Engine(path, separate_process=True, max_total_tokens=256) as engine:
        with pytest.raises(InvalidArgumentError, match="cannot be sent to the engine process"):
            engine.update_weights_from_disk(lambda: path)
        with pytest.raises(InvalidArgumentError):
            engine.update_weights_from_tensor(names=(n for n in ["x"]), dtypes=["float32"], shapes=[[1]],
                                              sources=[])
        sp = SamplingParams(temperature=0.0, max_new_tokens=3)
        assert len(engine.generate([1, 2, 3], sp)[0].output_ids) == 3
