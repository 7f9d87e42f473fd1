"""Triton fused MoE (expert alignment + grouped GEMMs) against the reference expert loop.

Without CUDA the kernels run in Triton's interpreter; with CUDA the same tests compile them.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
pytest.importorskip("triton")

from kernels.moe import (  # noqa: E402
    GemmTiles,
    MoeKernelConfig,
    align_tokens_to_experts,
    default_config,
    fused_experts_triton,
)
from kernels.moe.align_triton import align_tokens_to_experts_triton  # noqa: E402
from rollout.layers.moe import fused_experts, fused_experts_reference, select_experts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_moe(tokens, experts, top_k, hidden, inter, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5
    weights, ids = select_experts(torch.randn(tokens, experts, generator=gen), top_k, renormalize=True)
    to = dict(device=DEVICE)
    return x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to), weights.to(**to), ids.to(**to)


def check(out: torch.Tensor, x, w13, w2, weights, ids) -> None:
    """fp32: the reference within 1e-4 of its scale. 16-bit: no farther from the exact result (fp32
    math on the same inputs) than 3% of its scale; the interpreter truncates fp32 -> bf16 where the
    GPU rounds (the activation, each expert's output and the combined sum), hence the margin over
    the reference's own ~1% error."""
    ref = fused_experts_reference(x, w13, w2, weights, ids)
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()
    if x.dtype == torch.float32:
        scale = ref.abs().max().item()
        assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, scale)
        return
    exact = fused_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    scale = exact.abs().max().item()
    assert (out.float() - exact).abs().max().item() <= 3e-2 * scale
    assert (out.float() - ref.float()).abs().max().item() <= 3e-2 * scale


def test_alignment_example():
    align = align_tokens_to_experts(torch.tensor([[2, 0], [2, 1], [0, 2]], device=DEVICE), 3, 4)
    assert align.sorted_ids.tolist() == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6, 6, 6, 6, 6]
    assert align.block_experts.tolist() == [0, 1, 2, -1]
    assert align.num_rows == 6


@pytest.mark.parametrize("align_fn", [align_tokens_to_experts, align_tokens_to_experts_triton])
@pytest.mark.parametrize("tokens,experts,top_k,block_m",
                         [(1, 8, 1, 16), (37, 16, 4, 16), (200, 8, 2, 64), (300, 128, 8, 16), (5, 7, 3, 16)])
def test_alignment_groups_every_row_once(tokens, experts, top_k, block_m, align_fn):
    ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]).to(DEVICE)
    align = align_fn(ids, experts, block_m)
    if align_fn is align_tokens_to_experts_triton:  # the same blocks as the torch reference
        ref = align_tokens_to_experts(ids, experts, block_m)
        assert align.block_experts.tolist() == ref.block_experts.tolist()
        assert align.sorted_ids.numel() == ref.sorted_ids.numel()
    n = tokens * top_k
    sorted_ids = align.sorted_ids.cpu()
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))  # each row exactly once
    assert sorted_ids.numel() % block_m == 0 and align.block_experts.numel() == sorted_ids.numel() // block_m
    flat = ids.reshape(-1).cpu()
    for b, e in enumerate(align.block_experts.cpu().tolist()):
        rows = sorted_ids[b * block_m : (b + 1) * block_m]
        rows = rows[rows < n]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == e).all()
    used = (align.block_experts >= 0).sum().item()
    assert used == sum(-(-c // block_m) for c in torch.bincount(flat, minlength=experts).tolist())


# (tokens, experts, top_k, hidden, intermediate): tokens fewer than experts, top-k 1 / 2 / 8, uneven sizes.
SHAPES = [
    (1, 4, 1, 32, 16),
    (3, 16, 8, 64, 48),
    (20, 8, 2, 48, 40),
    (70, 4, 2, 32, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_reference(shape, dtype):
    tokens, experts, top_k, hidden, inter = shape
    x, w13, w2, weights, ids = make_moe(tokens, experts, top_k, hidden, inter, dtype)
    check(fused_experts_triton(x, w13, w2, weights, ids), x, w13, w2, weights, ids)


def test_fused_moe_small_tiles_loop_over_k_and_n():
    """Small tiles, other ones for each GEMM: several K steps with a partial last one (40 and 24 are not
    multiples of 16), masked N."""
    x, w13, w2, weights, ids = make_moe(12, 6, 2, 40, 24, torch.float32, seed=1)
    cfg = MoeKernelConfig(block_m=16, gate_up=GemmTiles(32, 16, 4, 2), down=GemmTiles(16, 32, 2, 3))
    check(fused_experts_triton(x, w13, w2, weights, ids, config=cfg), x, w13, w2, weights, ids)


def test_default_config_follows_rows_per_expert():
    assert default_config(256 * 8, 128).block_m == 16
    assert default_config(4096 * 8, 128).block_m == 64


def test_fused_experts_entry_point():
    """``fused_experts`` (Triton on CUDA, the reference loop on CPU) matches the reference."""
    x, w13, w2, weights, ids = make_moe(9, 8, 2, 32, 16, torch.float32, seed=2)
    check(fused_experts(x, w13, w2, weights, ids), x, w13, w2, weights, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_of_other_ranks_are_skipped(dtype):
    """Expert parallelism: ids of -1 (another rank's experts) add nothing, and their rows stay zero."""
    x, w13, w2, weights, ids = make_moe(24, 6, 3, 32, 16, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    elsewhere = (torch.rand(ids.shape, generator=gen) < 0.5).to(ids.device)
    ids = torch.where(elsewhere, -1, ids)
    ids[0] = -1  # a token served entirely elsewhere
    out = fused_experts_triton(x, w13, w2, weights, ids, skip_negative=True)
    check(out, x, w13, w2, weights, ids)
    assert torch.all(out[0] == 0)
    # Only the kept pairs count: the same as giving the skipped pairs zero weight.
    kept = torch.where(elsewhere, 0, ids)
    zeroed = torch.where(elsewhere, torch.zeros_like(weights), weights)
    zeroed[0] = 0
    ref = fused_experts_reference(x, w13, w2, zeroed, torch.where(ids < 0, 0, kept))
    assert torch.allclose(out.float(), ref.float(), atol=3e-2 * ref.abs().max().item())  # see check()
