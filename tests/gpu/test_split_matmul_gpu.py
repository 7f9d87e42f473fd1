"""The split-K matmul on a GPU: programs of one tile run at once, and the last to finish sums.

A missing acquire/release or a stale read shows as a tile summed without one of its slices:
results far from cuBLAS's, or that vary from call to call. Many launches, eagerly and replayed
from a CUDA graph, must give one result, within bf16 rounding of cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n,k", [(1024, 2048), (1024, 3072), (4096, 1024)])
@pytest.mark.parametrize("rows", [24, 256])
@torch.no_grad()
def test_split_matmul_repeats_bit_for_bit_and_matches_cublas(n, k, rows) -> None:
    from kernels.split_matmul import SplitConfig, count_buffer, split_matmul

    gen = torch.Generator(device="cuda").manual_seed(n + k + rows)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    want = F.linear(x, w, b).float()
    configs = (SplitConfig(64, 64, 64, 4, 4, 4), SplitConfig(128, 128, 64, 8, 3, 8), SplitConfig(64, 128, 64, 4, 4, 3))
    for cfg in configs:
        first = split_matmul(x, w, b, cfg)
        assert (first.float() - want).abs().max().item() <= 2 * 2**-8 * want.abs().max().item()
        for _ in range(50):
            assert torch.equal(split_matmul(x, w, b, cfg), first)
        outs = []
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                outs.append(split_matmul(x, w, b, cfg))
        for _ in range(5):
            graph.replay()
            torch.cuda.synchronize()
            for out in outs:
                assert torch.equal(out, first)
        assert int(count_buffer(x.device).abs().sum()) == 0
