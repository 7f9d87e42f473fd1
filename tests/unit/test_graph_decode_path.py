"""The model runner's graph decode path gives what its eager path gives, checked on a CPU.

On a GPU, decode steps replay captured graphs (``ModelRunner._replay_decode``): the inputs and the
sampling draws go to the graphs' static buffers in one copy, the previous step's samples are put in
place on the device, the static batches and the sampling rows are kept from step to step. Here a
stand-in for the graphs (``rollout.testing.cpu_graphs``) runs that path with the forward done
eagerly on the static buffers, and the outputs are compared with the eager path's: requests of
different sampling parameters finish at different steps and waiting ones take their places, so
the batch changes composition, at the same size too, while the draws and rows must follow it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable

from rollout.config import EngineConfig
from rollout.engine.core import EngineCore
from rollout.engine.request_validation import make_add_request
from rollout.testing.cpu_graphs import install_cpu_graphs
from rollout.types import SamplingParams, StreamChunk

Outputs = dict[tuple[str, int], tuple[list[int], list[float]]]


def _mixed(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    """Nine requests of every kind of sampling, for three rows: whenever one ends, a waiting one takes
    its place in the same step (the batch changes composition, not size)."""
    rng = random.Random(3)
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_p=0.8),
        dict(temperature=1.0, min_new_tokens=2, stop_token_ids=tuple(range(3, vocab, 5))),  # stops early
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.2, min_p=0.05),
    ]
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))],
             SamplingParams(max_new_tokens=rng.randint(3, 14), seed=i, **kinds[i % len(kinds)]))
            for i in range(9)]


def _middle_ends_first(vocab: int) -> list[tuple[list[int], SamplingParams]]:
    """Three requests whose middle one ends first: the last row's input is then the previous step's
    sample of another row than its own."""
    return [([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)),
            ([8, 9], SamplingParams(temperature=1.0, max_new_tokens=3, seed=1, ignore_eos=True)),
            ([10, 11, 12, 13], SamplingParams(temperature=0.8, top_k=4, max_new_tokens=8, seed=2, ignore_eos=True))]


Requests = Callable[[int], list[tuple[list[int], SamplingParams]]]  # vocabulary size -> prompts and params


def _generate(path: str, requests: Requests, graphs: bool) -> Outputs:
    """Every request's tokens and logprobs, on three rows; with ``graphs`` the decode steps take the
    graph path, without them each step's sampling rows are built anew (the reference)."""
    core = EngineCore(EngineConfig.build(path, device="cpu", max_running_requests=3))
    replays = 0
    if graphs:
        replay = install_cpu_graphs(core.runner).replay

        def counted(gbs: int):
            nonlocal replays
            replays += 1
            return replay(gbs)

        core.runner.graphs.replay = counted
    for i, (prompt, sp) in enumerate(requests(core.limits.vocab_size)):
        core.add(make_add_request(f"r{i}", input_ids=prompt, text=None, sampling=sp, limits=core.limits,
                                  tokenizer=None, return_logprob=True, stream=True))
    outs: Outputs = defaultdict(lambda: ([], []))
    while core.has_work():
        if not graphs:
            core.runner._sampling.clear()
        for ev in core.step():
            assert isinstance(ev, StreamChunk), ev
            ids, lps = outs[ev.request_id, ev.index]
            ids.extend(ev.token_ids)
            lps.extend(ev.logprobs)
    core.cache.check_integrity()
    core.shutdown()
    core.close()
    assert not graphs or replays > 4  # the decode steps took the graph path
    return dict(outs)


def test_graph_decode_path_matches_the_eager_path(tiny_model_dir, monkeypatch) -> None:
    import rollout.runner.step_inputs as step_inputs

    path = tiny_model_dir("qwen3")
    resolved = 0  # graph steps whose inputs were not one run of the previous samples
    resolve = step_inputs.resolve_previous_samples

    def counted(*args):
        nonlocal resolved
        resolved += 1
        return resolve(*args)

    monkeypatch.setattr(step_inputs, "resolve_previous_samples", counted)
    for requests in (_mixed, _middle_ends_first):
        reference = _generate(path, requests, graphs=False)
        graphed = _generate(path, requests, graphs=True)
        assert reference.keys() == graphed.keys() and len(reference) in (3, 9)
        for key, (ids, lps) in reference.items():
            g_ids, g_lps = graphed[key]
            assert g_ids == ids, key
            assert max(abs(a - b) for a, b in zip(lps, g_lps)) < 1e-4
    assert resolved > 0
