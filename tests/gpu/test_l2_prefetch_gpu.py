"""L2 prefetch of a layer's later weights: changes no value, captures in a CUDA graph beside the
main stream, and leaves the engine's tokens and logprobs exactly as they are without it."""

from __future__ import annotations

import random

import pytest
import torch

from rollout import Engine, SamplingParams

pytestmark = pytest.mark.gpu


@torch.no_grad()
def test_prefetch_changes_nothing_and_forks_and_joins_in_a_graph() -> None:
    from kernels.l2_prefetch import available, prefetch_l2
    from rollout.layers.weight_prefetch import WeightPrefetch

    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
               for shape in ((1000, 1024), (24,), (3000, 4096))]
    copies = [t.clone() for t in tensors]
    assert available(tensors[0])
    prefetch_l2(tensors)
    prefetch_l2(tensors[:1], max_bytes=12345)  # a cut that is no multiple of the chunk or of 16 bytes
    torch.cuda.synchronize()
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))

    prefetch = WeightPrefetch(tensors)
    x = torch.randn(3, 64, device="cuda", generator=gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        y = x * 2
        prefetch.start(y)
        z = y + 1
        prefetch.join()
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(torch.arange(192, device="cuda", dtype=torch.float32).reshape(3, 64))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(z, x * 2 + 1)
    assert all(torch.equal(t, c) for t, c in zip(tensors, copies))


def test_engine_tokens_are_the_same_with_and_without_prefetch(tiny_model_dir, monkeypatch) -> None:
    """Batch 1 to 16 decode steps (graphs) prefetch; the tokens and logprobs are bit for bit those
    of the same engine with the prefetch off (the kernels chosen per shape are shared)."""
    path = tiny_model_dir("qwen3", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=1024,
                          init_std=0.08)
    rng = random.Random(0)
    batches = [[[rng.randrange(3, 1000) for _ in range(20 + n)] for _ in range(n)] for n in (1, 5, 16)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    outs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("ROLLOUT_L2_PREFETCH", mode)
        with Engine(path, device="cuda", attention_backend="triton", max_total_tokens=1 << 15) as engine:
            outs[mode] = [engine.generate(batch, sp, return_logprob=True) for batch in batches]
            engine.check_integrity()
    for batch_off, batch_on in zip(outs["0"], outs["1"]):
        for a, b in zip(batch_off, batch_on):
            assert a.output_ids == b.output_ids
            assert a.output_logprobs == b.output_logprobs
