"""The merge of a split decode step done by each (request, kv head)'s last piece, against the merge
kernel and the torch reference: both decode kernels, piece counts with empty pieces, the count
buffer left zeroed for the next launch.

Without CUDA the kernels run in Triton's interpreter; with CUDA the same tests compile them.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
pytest.importorskip("triton")

from kernels.attention import (  # noqa: E402
    decode_attention,
    decode_attention_qkv,
    decode_attention_reference,
    plan_kv_splits,
    runs_from_indptr,
)
from kernels.attention.decode_merge import fused_merge_enabled, merge_counts  # noqa: E402
from tests.unit.test_kernels_attention import DEVICE, assert_close, make_case  # noqa: E402
from tests.unit.test_kernels_decode_qkv import make_step  # noqa: E402


def _counts_zero(n: int) -> bool:
    return not merge_counts(torch.device(DEVICE), n)[:n].any().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits,max_splits", [(None, 4), (3, 4), (8, 8), (0, 2)])
def test_fused_merge_matches_the_merge_kernel_and_the_reference(dtype, splits, max_splits):
    """Pieces planned per length, then fixed counts: 3 of 4 (empty pieces in short requests), more
    pieces than tokens, and a count of 0 (one piece)."""
    requests = [(0, 1), (40, 1), (99, 1), (4, 1), (150, 1)]
    q, k_buf, v_buf, _, kv_indptr, kv_indices, kv_lens = make_case(requests, 1, 2, 32, dtype, 23, seed=5)
    if splits is None:
        num_splits = plan_kv_splits(torch.tensor(kv_lens, device=DEVICE), max_splits, 32)
    else:
        num_splits = torch.full((len(requests),), splits, dtype=torch.int32, device=DEVICE)
    args = (q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), 0.2, num_splits, max_splits)
    kernel = decode_attention(*args, block_n=16, fused_merge=False)
    fused = decode_attention(*args, block_n=16, fused_merge=True)
    assert _counts_zero(len(requests) * k_buf.shape[1])
    assert_close(fused, decode_attention_reference(q, k_buf, v_buf, kv_indptr, kv_indices, 0.2), dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # the sum over pieces in another order
    torch.testing.assert_close(fused.float(), kernel.float(), rtol=tol, atol=tol)
    again = decode_attention(*args, block_n=16, fused_merge=True)
    assert torch.equal(again, fused)  # pieces summed in piece order, whichever came last


@pytest.mark.parametrize("early_tile", [False, True])
def test_fused_merge_from_qkv_matches_the_merge_kernel(early_tile):
    """The qkv kernel (rotary, the new token stored by its piece) merging in its last pieces."""
    hq, hkv, d = 4, 2, 32
    kv_lens = [1, 37, 64, 100, 0]
    outs = []
    for fused in (False, True):
        qkv, k_buf, v_buf, kv_indices, indptr, rope = make_step(kv_lens, hq, hkv, d, torch.float32, True, seed=9)
        splits = plan_kv_splits(torch.tensor(kv_lens, device=DEVICE), 4, 16)
        outs.append((decode_attention_qkv(qkv, hq, rope, k_buf, v_buf, kv_indices, *runs_from_indptr(indptr),
                                          d**-0.5, splits, 4, early_tile=early_tile, fused_merge=fused), k_buf))
    (kernel, k_kernel), (fused, k_fused) = outs
    torch.testing.assert_close(fused, kernel, rtol=1e-6, atol=1e-6)
    assert torch.equal(k_fused, k_kernel)
    assert torch.equal(fused[-1], torch.zeros_like(fused[-1]))  # the empty padding row
    assert _counts_zero(len(kv_lens) * hkv)


def test_a_count_left_behind_would_show():
    """The counts decide which piece merges: with stale counts past every piece count no piece
    merges, and the output is whatever ``out`` held. This is what the kernel's reset prevents; checked here so that the
    tests above would notice a kernel that stopped resetting."""
    requests = [(40, 1), (99, 1)]
    q, k_buf, v_buf, _, kv_indptr, kv_indices, kv_lens = make_case(requests, 1, 2, 32, torch.float32, 0, seed=2)
    num_splits = plan_kv_splits(torch.tensor(kv_lens, device=DEVICE), 4, 16)
    counts = merge_counts(torch.device(DEVICE), 4)
    counts[:4] = 100  # as if earlier launches had not reset them
    out = torch.full((2, q.shape[1], 32), 7.0, device=DEVICE)
    decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), 0.2, num_splits, 4, out=out,
                     block_n=16, fused_merge=True)
    assert (out == 7.0).all()
    counts.zero_()
    decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), 0.2, num_splits, 4, out=out,
                     block_n=16, fused_merge=True)
    want = decode_attention_reference(q, k_buf, v_buf, kv_indptr, kv_indices, 0.2)
    assert_close(out, want, torch.float32)


def test_merge_counts_grow_and_the_switch_reads_the_environment(monkeypatch):
    small = merge_counts(torch.device(DEVICE), 8)
    big = merge_counts(torch.device(DEVICE), small.numel() + 1)
    assert big.numel() > small.numel() and not big.any()
    assert merge_counts(torch.device(DEVICE), 8) is big  # kept: launches leave it zeroed
    monkeypatch.setenv("ROLLOUT_FUSED_MERGE", "0")
    assert not fused_merge_enabled()
    monkeypatch.setenv("ROLLOUT_FUSED_MERGE", "1")
    assert fused_merge_enabled()
