"""Randomised stress: pauses of every mode, aborts, n > 1 and a small KV pool, all at once.

Every request must end (nothing lost), every request that was not aborted must carry exactly the
greedy tokens of an undisturbed run, and no KV slot may leak.
"""

from __future__ import annotations

import random
import threading
import time

from rollout import Engine, SamplingParams
from rollout.types import FinishReason, PauseMode
from tests.waiting import join_all


def test_pauses_aborts_and_memory_pressure_lose_nothing(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randrange(3, 30))] for _ in range(14)]
    news = [rng.randrange(5, 40) for _ in prompts]
    ns = [rng.choice([1, 1, 2, 3]) for _ in prompts]

    def params(i: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_new_tokens=news[i], ignore_eos=True, n=ns[i])

    with Engine(path) as engine:
        ref = [engine.generate(p, params(i))[0].output_ids for i, p in enumerate(prompts)]

    with Engine(path, max_total_tokens=160, page_size=2, chunked_prefill_size=8, max_running_requests=6) as engine:
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = engine.generate(prompts[i], params(i), request_id=f"q{i}")
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,), name=f"q{i}", daemon=True) for i in range(len(prompts))]
        # Queue every request behind a pause first, so the pauses below find them under way however
        # fast or slowly this machine runs (under load they could all finish before the first pause).
        engine.pause(PauseMode.IN_PLACE)
        for t in threads:
            t.start()
            time.sleep(0.01)
        deadline = time.monotonic() + 30
        while engine.info().num_waiting < sum(ns) and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.continue_()
        aborted = {"q3", "q8"}
        for mode in (PauseMode.RETRACT, PauseMode.IN_PLACE, PauseMode.RETRACT, PauseMode.IN_PLACE):
            time.sleep(0.05)
            if mode is PauseMode.RETRACT:  # something to retract, however slowly this machine runs
                deadline = time.monotonic() + 30
                while engine.info().num_running == 0 and time.monotonic() < deadline:
                    time.sleep(0.005)
            engine.pause(mode)
            engine.check_integrity()
            time.sleep(0.02)
            engine.continue_()
        engine.abort(sorted(aborted))
        join_all(threads, "with pauses, aborts and a small pool the engine did not finish every request (leaked KV?)")
        assert not errors, errors
        assert sorted(results) == list(range(len(prompts)))
        for i, outs in results.items():
            assert len(outs) == ns[i]
            for o in outs:
                if o.finish_reason is FinishReason.ABORT:
                    assert f"q{i}" in aborted
                    assert o.output_ids == ref[i][: len(o.output_ids)]
                else:
                    assert o.finish_reason is FinishReason.LENGTH
                    assert o.output_ids == ref[i], f"request {i} sample {o.index}"
        engine.check_integrity()
        info = engine.info()
        assert info.num_running == 0 and info.num_waiting == 0, f"every request ended, yet the engine holds {info}"
        assert info.kv_used_tokens == 0, f"every request ended, yet {info.kv_used_tokens} KV tokens stay in use"
        assert info.num_retractions > 0
        # An ABORT pause ends what is in flight and the engine still serves afterwards.
        engine.pause(PauseMode.ABORT)
        engine.continue_()
        assert engine.generate(prompts[0], params(0))[0].output_ids == ref[0]
