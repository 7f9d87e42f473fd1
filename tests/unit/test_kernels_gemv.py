"""The skinny matmul kernel against ``x @ w.T + b`` (Triton's interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
triton = pytest.importorskip("triton")

from kernels.gemv import CONFIGS, FMA_CONFIGS, FMA_MAX_ROWS, candidates, gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 300), (3, 96, 512), (4, 17, 1000), (16, 64, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_matmul(dtype, m, n, k, bias):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    want = x.float() @ w.float().T + (b.float() if bias else 0)
    # Two of each kind (every candidate is run in test_every_candidate_matches_matmul).
    for config in candidates(m)[:2] + (FMA_CONFIGS[:2] if m <= FMA_MAX_ROWS else ()):
        got = gemv(x, w, b, config)
        assert got.shape == (m, n) and got.dtype == dtype
        # fp32 accumulation in both; bf16 output rounding is the only difference there.
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        assert (got.float() - want).abs().max().item() <= tol * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("m", [1, 4, 16])
def test_every_candidate_matches_matmul(m):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=gen).to(DEVICE, torch.bfloat16)
    w = torch.randn(48, 256, generator=gen).to(DEVICE, torch.bfloat16)
    want = x.float() @ w.float().T
    for config in candidates(m):
        got = gemv(x, w, None, config).float()
        assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item(), config


@pytest.mark.parametrize("config", [CONFIGS[0], FMA_CONFIGS[1]])
def test_gemv_reads_strided_rows(config):
    """Rows of x may be a view with a row stride wider than K (a slice of a larger activation)."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(2, 80, generator=gen).to(DEVICE)
    x = big[:, :50]
    w = torch.randn(33, 50, generator=gen).to(DEVICE)
    assert torch.allclose(gemv(x, w, None, config), x @ w.T, atol=1e-4, rtol=1e-4)


def test_candidates_offer_the_fma_kernel_only_to_few_rows():
    assert all(c.fma for c in candidates(FMA_MAX_ROWS) if c not in CONFIGS)
    assert any(c.fma for c in candidates(1))
    assert not any(c.fma for c in candidates(FMA_MAX_ROWS + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,half,k", [(1, 24, 300), (3, 40, 512), (16, 9, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_gemv_is_the_plain_product_then_silu_and_mul(dtype, m, half, k, bias):
    """The gated form gives the bits of the plain kernel followed by the activation kernel: same
    accumulation, each projection rounded before the silu, the silu rounded before the product
    (compiled; in the interpreter within an ulp or so).
    Tiles too large for the GPU's shared memory in the gated form (fp32) are skipped, as the timed
    choice skips them."""
    from kernels.fused import silu_and_mul

    gen = torch.Generator().manual_seed(m * half + k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(2 * half, k, generator=gen).to(DEVICE, dtype) * 0.1
    b = torch.randn(2 * half, generator=gen).to(DEVICE, dtype) if bias else None
    ran = 0
    # Compiled, every config; in the interpreter (slow) two of each kind: the code is the same.
    configs = candidates(m) if DEVICE == "cuda" else CONFIGS[:2] + (FMA_CONFIGS[:2] if m <= FMA_MAX_ROWS else ())
    for config in configs:
        try:
            got = gemv(x, w, b, config, gated=True)
        except triton.runtime.errors.OutOfResources:
            continue
        assert got.shape == (m, half) and got.dtype == dtype
        want = silu_and_mul(gemv(x, w, b, config))
        if DEVICE == "cuda":
            assert torch.equal(got, want), config
        else:  # the interpreter's tl.dot is numpy's matmul, whose sums may round apart by a tile's
            # shape (numpy 2.4: 1 ulp at 32-column tiles): the bits are pinned on the GPU
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6, msg=str(config))
        ran += 1
    assert ran


def test_gated_gemv_wants_two_equal_halves():
    with pytest.raises(AssertionError, match="two halves"):
        gemv(torch.ones(1, 8, device=DEVICE), torch.ones(7, 8, device=DEVICE), None, CONFIGS[0], gated=True)
