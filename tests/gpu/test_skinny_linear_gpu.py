"""Linear layers at a few rows take cuBLAS or the skinny kernel, chosen by timing, same results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu


@torch.no_grad()
def test_skinny_linear_matches_cublas_and_remembers_its_choice() -> None:
    from rollout.layers import skinny

    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, k in ((4096, 4096), (1024, 3072), (6144, 1024)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        for rows in (1, 3, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            got = skinny.skinny_linear(x, w, None)
            want = F.linear(x, w)
            assert (got.float() - want.float()).abs().max().item() <= 2e-2 * want.float().abs().max().item()
            assert (n, k, skinny._bucket(rows), torch.bfloat16, False, x.device, False) in skinny._choices


@torch.no_grad()
def test_a_shape_first_seen_in_a_capture_takes_cublas() -> None:
    from rollout.layers import skinny

    w = torch.randn(1000, 777, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 777, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = skinny.skinny_linear(x, w, None)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert (1000, 777, 2, torch.bfloat16, False, x.device, False) not in skinny._choices  # nothing timed in a capture
    assert torch.equal(out, F.linear(x, w))


@torch.no_grad()
def test_gated_linear_is_silu_and_mul_of_the_product() -> None:
    """The gated form (activation in the matmul's epilogue) gives, where it serves, the bits of its
    kernel followed by the activation kernel, and ``silu(gate) * up`` within bf16 rounding."""
    from kernels.fused import silu_and_mul
    from kernels.gemv import gemv
    from rollout.layers import skinny

    gen = torch.Generator(device="cuda").manual_seed(1)
    for inter, k in ((3072, 1024), (14336, 4096), (1000, 777)):
        w = torch.randn(2 * inter, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        for rows in (1, 2, 8, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            got = skinny.skinny_gated_linear(x, w, None)
            key = (2 * inter, k, skinny._bucket(rows), torch.bfloat16, False, x.device, True)
            assert key in skinny._choices
            config = skinny._choices[key]
            assert (got is None) == (config is None)
            if got is None:
                continue
            assert torch.equal(got, silu_and_mul(gemv(x, w, None, config)))
            gate, up = F.linear(x.float(), w.float()).chunk(2, dim=1)
            want = F.silu(gate) * up
            assert (got.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()
