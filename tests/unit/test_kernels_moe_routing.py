"""The Triton router top-k and the per-token combine of the fused MoE against their torch references.

Without CUDA the kernels run in Triton's interpreter; with CUDA the same tests compile them.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
pytest.importorskip("triton")

from kernels.moe.fused_moe import combine_rows  # noqa: E402
from kernels.moe.routing import topk_softmax  # noqa: E402
from rollout.layers.moe import select_experts_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (37, 128, 8), (5, 512, 16), (9, 60, 6), (3, 4, 4)])
def test_topk_softmax_matches_torch(tokens, experts, top_k, renormalize):
    """Random fp32 logits (no ties): the same ids in the same (descending) order, the same weights."""
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens)).to(DEVICE)
    weights, ids = topk_softmax(logits, top_k, renormalize)
    ref_w, ref_ids = select_experts_reference(logits, top_k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(weights, ref_w, rtol=1e-5, atol=1e-7)


def test_topk_softmax_bf16_logits_and_strided_rows():
    """bf16 logits (distinct values) read from every other row of a larger tensor."""
    gen = torch.Generator().manual_seed(0)
    distinct = torch.stack([torch.randperm(128, generator=gen) for _ in range(12)]).float() / 32  # bf16-exact
    logits = distinct.to(torch.bfloat16).to(DEVICE)[::2]  # (6, 128), row stride 256
    weights, ids = topk_softmax(logits, 8, renormalize=True)
    ref_w, ref_ids = select_experts_reference(logits, 8, renormalize=True)
    assert torch.equal(ids, ref_ids) and torch.allclose(weights, ref_w, rtol=1e-5, atol=1e-7)


def test_topk_softmax_ties_go_to_the_lower_id_and_no_tokens():
    weights, ids = topk_softmax(torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]], device=DEVICE), 3, renormalize=False)
    assert ids.tolist() == [[1, 2, 4]]
    assert torch.allclose(weights, torch.softmax(torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]), 0)[[1, 2, 4]].to(DEVICE))
    weights, ids = topk_softmax(torch.empty(0, 16, device=DEVICE), 4, renormalize=True)
    assert weights.shape == ids.shape == (0, 4)
    with pytest.raises(ValueError, match="top_k=5 of 4 experts"):
        topk_softmax(torch.zeros(1, 4, device=DEVICE), 5, renormalize=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_rows_sums_each_tokens_rows(dtype):
    """(T * k, H) -> (T, H): the fp32 sum over each token's k rows, rounded once (H not a multiple of
    the block, k not a power of two)."""
    tokens, top_k, hidden = 7, 3, 1100
    y = torch.randn(tokens * top_k, hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    ids = torch.zeros(tokens, top_k, dtype=torch.int64, device=DEVICE)
    out = combine_rows(y, ids, dtype)
    exact = y.view(tokens, top_k, hidden).sum(dim=1, dtype=torch.float32)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    # fp32: summation order only. bf16: one rounding (the interpreter truncates: up to one bf16 step).
    rtol = 1e-6 if dtype == torch.float32 else 2**-7
    assert torch.allclose(out.float(), exact, rtol=rtol, atol=1e-6)
    assert combine_rows(y[:0], ids[:0], dtype).shape == (0, hidden)


def test_combine_rows_skips_rows_of_other_ranks_without_reading_them():
    tokens, top_k, hidden = 5, 4, 64
    y = torch.randn(tokens * top_k, hidden, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    ids = torch.arange(tokens * top_k, device=DEVICE).view(tokens, top_k) % 3 - 1  # -1 in a third of the rows
    ids[0] = -1  # a token served entirely elsewhere
    skipped = (ids < 0).reshape(-1)
    y[skipped] = float("nan")  # never written by the down kernel: must not be read
    out = combine_rows(y, ids, torch.float32, skip_negative=True)
    kept = torch.where(skipped[:, None], 0.0, y).view(tokens, top_k, hidden).sum(1)
    assert torch.equal(out[0], torch.zeros(hidden, device=DEVICE))
    assert torch.allclose(out, kept, rtol=1e-6, atol=1e-6)
