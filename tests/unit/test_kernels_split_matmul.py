"""The split-K matmul kernel against ``x @ w.T + b`` (Triton's interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
triton = pytest.importorskip("triton")

from kernels.split_matmul import SplitConfig, count_buffer, split_matmul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = SplitConfig(16, 32, 32, 4, 2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,splits", [(37, 96, 200, 3), (70, 64, 128, 1), (5, 40, 300, 8), (17, 33, 64, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_split_matmul_matches_matmul(dtype, m, n, k, splits, bias):
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    want = x.float() @ w.float().T + (b.float() if bias else 0)
    got = split_matmul(x, w, b, SMALL._replace(splits=splits))
    assert got.shape == (m, n) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # fp32 accumulation; bf16 output rounding
    assert (got.float() - want).abs().max().item() <= tol * max(want.abs().max().item(), 1.0)


def test_counts_are_left_zero_and_a_given_buffer_is_used():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 256, generator=gen).to(DEVICE)
    w = torch.randn(64, 256, generator=gen).to(DEVICE)
    mine = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    first = split_matmul(x, w, None, SMALL._replace(splits=4), counts=mine)
    assert int(mine.abs().sum()) == 0
    again = split_matmul(x, w, None, SMALL._replace(splits=4))
    assert int(count_buffer(x.device).abs().sum()) == 0
    assert torch.equal(first, again)  # the same slices summed in the same order


def test_more_slices_than_k_tiles_are_cut_down():
    """K of 64 with 32-wide tiles has two tiles: eight slices asked for become two, none empty."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 64, generator=gen).to(DEVICE)
    w = torch.randn(48, 64, generator=gen).to(DEVICE)
    got = split_matmul(x, w, None, SMALL._replace(splits=8))
    assert torch.allclose(got, x @ w.T, atol=1e-4, rtol=1e-4)
