"""The merge done by each (request, kv head)'s last piece, compiled: many layers replayed from a
CUDA graph many times give the same bits every replay, match the merge kernel, and leave the
counts zeroed. A missing barrier or a count read too early would show as a replay that differs.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

HQ, HKV, D, LAYERS = 16, 8, 128, 8


@pytest.mark.parametrize("batch,context", [(1, 900), (5, 333), (16, 2000)])
@torch.no_grad()
def test_fused_merge_repeats_over_graph_replays(batch: int, context: int, monkeypatch) -> None:
    from kernels.attention import choose_max_splits, decode_attention, plan_kv_splits
    from kernels.attention.decode_merge import merge_counts
    from kernels.triton_utils import num_sms

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(batch)
    bf = torch.bfloat16
    num_slots = batch * context + 1
    pools = [tuple(torch.randn(num_slots, HKV, D, device=dev, dtype=bf, generator=gen) for _ in range(2))
             for _ in range(LAYERS)]
    q = torch.randn(batch, HQ, D, device=dev, dtype=bf, generator=gen)
    kv_indices = torch.randperm(num_slots - 1, device=dev, generator=gen) + 1
    starts = torch.arange(batch, device=dev) * context
    lens = torch.tensor([context - 17 * b for b in range(batch)], device=dev, dtype=torch.int32)
    max_splits = choose_max_splits(batch, HKV, num_sms(dev), 16)
    assert max_splits > 1, "a split step"
    num_splits = plan_kv_splits(lens, max_splits, 64)

    def layers(fused: bool) -> torch.Tensor:
        outs = [decode_attention(q, k, v, kv_indices, starts, lens, D**-0.5, num_splits, max_splits,
                                 fused_merge=fused) for k, v in pools]
        return torch.stack(outs)

    want = layers(False)
    first = layers(True)  # compiles outside the capture
    torch.testing.assert_close(first.float(), want.float(), rtol=1e-2, atol=1e-2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        got = layers(True)
    torch.cuda.current_stream().wait_stream(stream)
    for replay in range(100):
        graph.replay()
        assert torch.equal(got, first), f"replay {replay} differs"
    torch.cuda.synchronize()
    assert not merge_counts(dev, batch * HKV)[: batch * HKV].any()
