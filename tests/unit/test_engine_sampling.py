"""Sampling options through the engine: seeds, stop conditions, n, top logprobs."""

from __future__ import annotations

import math

from rollout import Engine, SamplingParams
from rollout.types import FinishReason

PROMPT = [5, 17, 42, 99, 100, 7]


def test_seed_reproduces_across_batches(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=16, seed=1234, ignore_eos=True)
    with Engine(path) as engine:
        alone = engine.generate(PROMPT, sp, return_logprob=True)[0]
        other = SamplingParams(temperature=0.7, max_new_tokens=20, ignore_eos=True)
        mixed = engine.generate([[1, 2, 3], PROMPT, [9] * 30], [other, sp, other], return_logprob=True)[1]
        unseeded = engine.generate([PROMPT] * 2, SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True))
    assert alone.output_ids == mixed.output_ids
    assert all(abs(a - b) < 1e-5 for a, b in zip(alone.output_logprobs, mixed.output_logprobs))
    assert all(lp <= 0 for lp in alone.output_logprobs)
    assert unseeded[0].output_ids != unseeded[1].output_ids


def test_stop_token_ids_min_new_tokens_and_max(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path) as engine:
        base = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))[0]
        stop_tok = base.output_ids[3]
        first = base.output_ids.index(stop_tok)
        out = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=[stop_tok]))[0]
        assert out.output_ids == base.output_ids[: first + 1]
        assert out.finish_reason is FinishReason.STOP and out.matched_stop == stop_tok
        # min_new_tokens masks the stop token until enough tokens exist.
        out = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=10, min_new_tokens=first + 2,
                                                     stop_token_ids=[stop_tok]))[0]
        assert len(out.output_ids) >= first + 2
        assert stop_tok not in out.output_ids[: first + 2]
        assert engine.generate(PROMPT, SamplingParams(max_new_tokens=3, ignore_eos=True))[0].finish_reason \
            is FinishReason.LENGTH


def test_stop_strings(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path) as engine:
        base = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))[0]
        text = base.text
        assert text
        # Stop on a piece of text the greedy output is known to produce.
        stop = text[len(text) // 2: len(text) // 2 + 2] or text[-1]
        out = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12, stop=[stop],
                                                     ignore_eos=True))[0]
        assert out.finish_reason is FinishReason.STOP and out.matched_stop == stop
        assert stop in out.text
        assert out.output_ids == base.output_ids[: len(out.output_ids)]
        assert stop not in engine._client.tokenizer.decode(out.output_ids[:-1])


def test_top_and_raw_logprobs(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path) as engine:
        out = engine.generate(PROMPT, SamplingParams(temperature=0.8, top_k=5, max_new_tokens=5, seed=7),
                              return_logprob=True, return_raw_logprob=True, top_logprobs_num=3)[0]
    assert len(out.output_top_logprobs) == len(out.output_ids) == len(out.output_raw_logprobs)
    for lp, raw, top in zip(out.output_logprobs, out.output_raw_logprobs, out.output_top_logprobs):
        assert len(top.token_ids) == 3 and top.logprobs == sorted(top.logprobs, reverse=True)
        assert raw <= top.logprobs[0] + 1e-6
        assert lp >= raw - 1e-6  # top-k renormalised mass is >= the raw probability
        assert math.isfinite(lp)


def test_stream_matches_generate(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, n=2)
    with Engine(path) as engine:
        full = engine.generate(PROMPT, sp, return_logprob=True)
        got = {0: [], 1: []}
        finished = 0
        for chunk in engine.stream(PROMPT, sp, return_logprob=True):
            got[chunk.index].extend(chunk.token_ids)
            finished += chunk.finished
        assert finished == 2
        assert got[0] == full[0].output_ids and got[1] == full[1].output_ids


def test_engine_in_a_separate_process_matches_the_thread(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    sp = SamplingParams(temperature=0.8, max_new_tokens=8, seed=5, ignore_eos=True, n=2)
    with Engine(path) as engine:
        want = engine.generate([PROMPT, [9, 8, 7]], sp, return_logprob=True)
    with Engine(path, separate_process=True) as engine:
        got = engine.generate([PROMPT, [9, 8, 7]], sp, return_logprob=True)
        streamed = [t for c in engine.stream(PROMPT, sp) if c.index == 0 for t in c.token_ids]
        engine.check_integrity()
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert streamed == want[0].output_ids
    for a, b in zip(got, want):
        assert max(abs(x - y) for x, y in zip(a.output_logprobs, b.output_logprobs)) < 1e-5


def test_stop_token_drawn_exactly_at_min_new_tokens_ends_the_sample(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path) as engine:
        greedy = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True))[0]
        ids = greedy.output_ids
        # k: a position whose greedy token does not occur earlier, so masking it before k changes nothing.
        k = next(i for i in range(3, len(ids) - 2) if ids[i] not in ids[:i])
        stop_tok = ids[k]

        def run(min_new: int):
            sp = SamplingParams(temperature=0.0, max_new_tokens=16, min_new_tokens=min_new,
                                stop_token_ids=[stop_tok], ignore_eos=True)
            return engine.generate(PROMPT, sp)[0]

        out = run(k)  # k tokens are required; the stop token is the greedy choice for the (k+1)-th
        assert out.output_ids == ids[: k + 1], (
            f"min_new_tokens={k}, stop token {stop_tok} greedy at index {k}: the engine produced "
            f"{out.output_ids}, not the greedy tokens up to and including the stop token {ids[: k + 1]}")
        assert out.finish_reason is FinishReason.STOP and out.matched_stop == stop_tok
        out = run(k + 1)  # one more required: the stop token must be masked at index k
        assert out.output_ids[:k] == ids[:k]
        assert out.output_ids[k] != stop_tok, (
            f"min_new_tokens={k + 1}, but the engine drew the stop token at index {k} (it was not masked)")
        assert stop_tok not in out.output_ids[: k + 1]


def test_stop_string_across_two_tokens_completed_at_min_new_tokens_ends_the_sample(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path) as engine:
        decode = engine.tokenizer.decode
        ids = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True))[0].output_ids
        # A two-character stop string cut between tokens j-1 and j ("o|e"), not seen before token j.
        for j in range(1, len(ids) - 2):
            prev, cur = decode(ids[:j]), decode(ids[: j + 1])
            if prev and len(cur) > len(prev) and cur.startswith(prev):
                stop = prev[-1] + cur[len(prev)]
                if "\ufffd" not in stop and all(stop not in decode(ids[:i]) for i in range(1, j + 1)):
                    break
        else:
            raise AssertionError(f"no two-token stop string in the greedy text {decode(ids)!r}")

        def run(min_new: int):
            sp = SamplingParams(temperature=0.0, max_new_tokens=16, min_new_tokens=min_new, stop=[stop],
                                ignore_eos=True)
            return engine.generate(PROMPT, sp)[0]

        out = run(0)
        assert out.output_ids == ids[: j + 1], (
            f"stop {stop!r} is cut between tokens {j} and {j + 1}: the engine produced {out.output_ids}, "
            f"not {ids[: j + 1]}")
        out = run(j + 1)  # the (j+1)-th token completes the stop string and is the last one required
        assert out.output_ids == ids[: j + 1], (
            f"stop {stop!r} completes at token {j + 1} = min_new_tokens: the engine produced {out.output_ids}, "
            f"not {ids[: j + 1]}")
        assert out.finish_reason is FinishReason.STOP and out.matched_stop == stop
        out = run(j + 2)
        assert len(out.output_ids) >= j + 2, f"min_new_tokens={j + 2} but the engine stopped after {out.output_ids}"
        assert out.output_ids[: j + 2] == ids[: j + 2]


def test_tiny_top_p_samples_the_argmax(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    with Engine(path) as engine:
        greedy = engine.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True),
                                 return_logprob=True)[0]
        for top_p in (1e-46, 1e-300):
            sp = SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=6, ignore_eos=True, seed=3)
            out = engine.generate(PROMPT, sp, return_logprob=True)[0]
            assert out.output_ids == greedy.output_ids
            # The kept set is the argmax alone: its renormalised probability is 1.
            assert out.output_logprobs == [0.0] * 6
