"""Fused element-wise kernels (RMSNorm, SiLU-and-mul, q/k norm + rotary) against their torch forms.

Without CUDA the kernels run in Triton's interpreter. In fp32 they must agree to rounding noise.
In bf16 on a GPU RMSNorm and SiLU-and-mul round exactly where torch does, so only the few elements
where a different fp32 summation order moves a value across a bf16 rounding boundary may differ, by
one unit in the last place (rotary: see ``assert_matches``); the interpreter truncates fp32 -> bf16
instead of rounding, so on CPU elements may be a few units off.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
pytest.importorskip("triton")

from kernels.fused import (  # noqa: E402
    qk_norm_rope_,
    reference,  # noqa: E402
    rmsnorm,
    silu_and_mul,
)
from rollout.config import RopeConfig  # noqa: E402
from rollout.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def assert_matches(got: torch.Tensor, want: torch.Tensor, cancelling: bool = False) -> None:
    """``cancelling``: outputs are sums of rounded terms (rotary), so a unit of the terms, not of the
    result, bounds the error: judged against the largest output instead of each element. The
    compiled rotary kernel does not reproduce torch's rounding of each product exactly (about one
    element in ten is one unit off on an H100), so only the bound is checked there."""
    assert got.shape == want.shape and got.dtype == want.dtype
    g, w = got.float(), want.float()
    if want.dtype == torch.float32:
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        return
    ulp = 2.0**-7  # bf16: 8 significant bits; a unit in the last place is at most 2^-7 of the value
    # The interpreter truncates at each of a kernel's (up to three) roundings: a few units apart.
    units = 1 if DEVICE == "cuda" else 4
    off = (g - w).abs() > 0
    scale = w.abs().max() if cancelling else w.abs()
    assert bool(((g - w).abs() <= units * ulp * scale + 1e-6).all()), f"max error {(g - w).abs().max().item()}"
    if DEVICE == "cuda" and not cancelling:
        assert off.float().mean().item() <= 0.01, f"{off.float().mean().item():.2%} of elements differ"


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 1000), (33, 256)])
def test_rmsnorm_matches_reference(dtype: torch.dtype, rows: int, hidden: int) -> None:
    x = randn(rows, hidden, dtype=dtype, seed=rows, scale=3.0)
    res = randn(rows, hidden, dtype=dtype, seed=rows + 1)
    w = randn(hidden, dtype=dtype, seed=hidden)
    assert_matches(rmsnorm(x, w, 1e-6), reference.rmsnorm(x, w, 1e-6))
    got, got_sum = rmsnorm(x, w, 1e-5, residual=res)
    want, want_sum = reference.rmsnorm(x, w, 1e-5, residual=res)
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(got_sum, want_sum)  # one add, rounded to nearest: exact
    else:
        assert_matches(got_sum, want_sum)
    assert_matches(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 48), (5, 1536), (16, 2100)])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, rows: int, inter: int) -> None:
    x = randn(rows, 2 * inter, dtype=dtype, seed=inter, scale=4.0)
    assert_matches(silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (8, 8, 64), (6, 1, 128)])
def test_qk_norm_rope_matches_reference(dtype: torch.dtype, qk_norm: bool, heads: int, kv_heads: int,
                                        head_dim: int) -> None:
    t = 9
    rope = RotaryEmbedding(head_dim, 4096, RopeConfig(theta=1e6), device=DEVICE)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = randn(t, width + 16, dtype=dtype, seed=head_dim)[:, :width]  # a row stride wider than the row
    positions = torch.tensor([0, 1, 5, 17, 300, 4095, 2, 2, 1000], dtype=torch.int64, device=DEVICE)
    qw = randn(head_dim, dtype=dtype, seed=1) if qk_norm else None
    kw = randn(head_dim, dtype=dtype, seed=2) if qk_norm else None
    want = reference.qk_norm_rope(qkv, positions, rope.cos_cache, rope.sin_cache, heads, kv_heads, head_dim, qw, kw)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    qk_norm_rope_(qkv, positions, rope.cos_cache, rope.sin_cache, heads, kv_heads, head_dim, qw, kw)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched
    assert_matches(qkv, want, cancelling=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (6, 3, 64)])
def test_qk_norm_rope_stores_kv_like_set_kv(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> None:
    """With the layer's cache given, the kernel leaves in it exactly what ``KVPool.set_kv`` of the
    rotated k and the v heads would, at the given slots only, and q/k in qkv as without it."""
    from rollout.cache.kv_pool import KVPool

    t = 7
    rope = RotaryEmbedding(head_dim, 4096, RopeConfig(theta=1e6), device=DEVICE)
    qkv = randn(t, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    positions = torch.tensor([0, 3, 9, 2, 40, 41, 1], dtype=torch.int64, device=DEVICE)
    slots = torch.tensor([5, 1, 17, 8, 2, 30, 11], dtype=torch.int64, device=DEVICE)
    qw, kw = randn(head_dim, dtype=dtype, seed=4), randn(head_dim, dtype=dtype, seed=5)
    pools = [KVPool(1, 32, kv_heads, head_dim, dtype, DEVICE) for _ in range(2)]
    plain = qkv.clone()
    qk_norm_rope_(plain, positions, rope.cos_cache, rope.sin_cache, heads, kv_heads, head_dim, qw, kw)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    k, v = plain[:, q_size: q_size + kv_size], plain[:, q_size + kv_size:]
    pools[0].set_kv(0, slots, k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim))
    fused = qkv.clone()
    qk_norm_rope_(fused, positions, rope.cos_cache, rope.sin_cache, heads, kv_heads, head_dim, qw, kw,
                  kv_cache=(pools[1].k_buffers[0], pools[1].v_buffers[0], slots))
    assert torch.equal(fused, plain)
    assert torch.equal(pools[1].k_buffers[0], pools[0].k_buffers[0])
    assert torch.equal(pools[1].v_buffers[0], pools[0].v_buffers[0])
