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
            assert skinny._key(x, w, None) in skinny._choices


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
    assert skinny._key(x, w, None) not in skinny._choices  # nothing timed in a capture
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
            key = skinny._key(x, w, None, gated=True)
            assert key in skinny._choices
            config = skinny._choices[key]
            assert (got is None) == (config is None)
            if got is None:
                continue
            assert torch.equal(got, silu_and_mul(gemv(x, w, None, config)))
            gate, up = F.linear(x.float(), w.float()).chunk(2, dim=1)
            want = F.silu(gate) * up
            assert (got.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@torch.no_grad()
def test_normed_linear_is_rmsnorm_then_the_product() -> None:
    """The normed form (RMSNorm and residual add as the matmul reads x) gives, where it serves, the
    norm kernel's summed rows bit for bit and its product within a bf16 rounding of the normed
    input (the sum of squares is taken in another order); its choice is remembered per form."""
    from kernels.fused import rmsnorm
    from rollout.layers import skinny

    gen = torch.Generator(device="cuda").manual_seed(2)
    for n, k, gated in ((4096, 1024, False), (6144, 1024, True), (6144, 4096, False), (28672, 4096, True)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        nw = torch.rand(k, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5
        for rows in (1, 4, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            for res in (None, torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)):
                got = skinny.skinny_norm_linear(x, res, nw, 1e-6, w, None, gated)
                assert skinny._key(x, w, None, gated, 1 if res is None else 2) in skinny._choices
                if got is None:
                    continue
                out, summed = got
                if res is None:
                    assert summed is x
                    h = rmsnorm(x, nw, 1e-6)
                else:
                    h, want_sum = rmsnorm(x, nw, 1e-6, res)
                    assert torch.equal(summed, want_sum)
                want = F.linear(h.float(), w.float())
                if gated:
                    gate, up = want.chunk(2, dim=1)
                    want = F.silu(gate) * up
                assert out.shape == want.shape
                assert (out.float() - want).abs().max().item() <= 3e-2 * want.abs().max().item()


@torch.no_grad()
def test_every_normed_config_is_the_norm_kernel_then_the_plain_kernel() -> None:
    """Compiled, every config of the normed form against the norm kernel followed by the same
    config's plain form: summed rows identical, products equal up to a rare last-bit difference of
    the normed input (the rms is summed tile by tile)."""
    from kernels.fused import rmsnorm
    from kernels.gemv import InputNorm, candidates, gemv

    gen = torch.Generator(device="cuda").manual_seed(3)
    for rows, k, gated in ((1, 1024, False), (3, 4096, True), (16, 1024, True)):
        w = torch.randn(512, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        nw = torch.rand(k, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        res = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        h, want_sum = rmsnorm(x, nw, 1e-6, res)
        for config in candidates(rows):
            summed = torch.empty_like(x)
            got = gemv(x, w, None, config, gated, InputNorm(nw, 1e-6, res, summed))
            want = gemv(h, w, None, config, gated)
            assert torch.equal(summed, want_sum), config
            assert (got.float() - want.float()).abs().max().item() <= 2e-2 * want.float().abs().max().item(), config
            assert (got == want).float().mean().item() > 0.95, config
