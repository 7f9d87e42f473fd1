"""A decode step's pieces: the balanced cut, the piece list and the one-kernel cut against their
torch references, and decode attention over balanced cuts against the reference attention.

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
    balanced_splits,
    cut_pieces,
    decode_attention,
    decode_attention_reference,
    plan_kv_splits,
    runs_from_indptr,
    uniform_pieces,
)
from kernels.attention.decode_cut import cut_step  # noqa: E402
from tests.unit.test_kernels_attention import DEVICE, assert_close, make_case  # noqa: E402


@pytest.mark.parametrize("grid,min_tokens", [(5, 8), (9, 8), (40, 4), (64, 1), (7, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_a_balanced_cut_matches_reference(grid, min_tokens, dtype):
    """Balanced cuts (``balanced_splits``): no spare piece (one each, written directly), a few
    spare pieces for the longest runs (some requests merged, the others written directly), more
    than 16 pieces for one request (merged in several chunks), pieces of one token, and grid slots
    left past the last piece (their programs exit)."""
    requests = [(0, 1), (40, 1), (150, 1), (7, 1), (99, 1)]
    q, k_buf, v_buf, _, kv_indptr, kv_indices, kv_lens = make_case(requests, 1, 2, 32, dtype, 0, seed=8)
    lens = torch.tensor(kv_lens, device=DEVICE)
    pieces = cut_pieces(balanced_splits(lens, grid, min_tokens), grid)
    counts = pieces.counts.tolist()
    assert sum(counts) <= grid and min(counts) >= 1
    out = decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), 0.2, pieces,
                           tiles=(16, 8, 2))
    assert_close(out, decode_attention_reference(q, k_buf, v_buf, kv_indptr, kv_indices, 0.2), dtype)


def test_balanced_splits_share_the_spare_pieces_by_length():
    lens = torch.tensor([0, 10, 100, 1000, 3000], device=DEVICE)
    # 20 spare pieces over 4,110 tokens: at most 206 tokens a piece, none under 64.
    assert balanced_splits(lens, 25, 64).tolist() == [1, 1, 1, 5, 15]
    assert balanced_splits(lens, 25, 1000).tolist() == [1, 1, 1, 1, 3]  # pieces of 1,000 tokens or more
    assert balanced_splits(lens, 5, 1).tolist() == [1] * 5  # no spare piece
    buf = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    assert balanced_splits(lens, 25, 64, out=buf) is buf and buf.tolist() == [1, 1, 1, 5, 15]
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # the counts never outgrow the grid, and no piece is longer than the bound
        b = int(torch.randint(1, 40, (1,), generator=gen))
        lens = torch.randint(0, 5000, (b,), generator=gen)
        grid = b + int(torch.randint(0, 3 * b, (1,), generator=gen))
        n = balanced_splits(lens, grid, 1)
        assert int(n.sum()) <= grid and int(n.min()) >= 1
        if grid > b:
            assert int(((lens + n - 1) // n).max()) <= -(-int(lens.sum()) // (grid - b)) + 1


def test_uniform_pieces_clamp_the_counts_to_the_depth():
    """The uniform cut: counts clamped to [1, max_splits], a grid B * max_splits deep, that depth
    kept for the tiles; a launch with a cut of another batch is refused."""
    pieces = uniform_pieces(torch.tensor([0, 3, 9], dtype=torch.int32, device=DEVICE), 4)
    assert pieces.counts.tolist() == [1, 3, 4] and pieces.grid == 12 and pieces.depth == 4
    assert pieces.first.tolist() == [0, 0, 2]
    assert cut_pieces(pieces.counts, 9).depth == 3  # by default the uniform cut's depth, grid // B
    requests = [(4, 1), (9, 1)]
    q, k_buf, v_buf, _, kv_indptr, kv_indices, _ = make_case(requests, 1, 2, 32, torch.float32, 0, seed=2)
    with pytest.raises(AssertionError, match="a cut of this batch"):
        decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), 0.2, pieces)


def test_cut_pieces_numbers_the_pieces_request_by_request():
    """Pieces 0..B-1 are the requests' first; the others follow request by request past them."""
    counts = torch.tensor([2, 1, 3], dtype=torch.int32, device=DEVICE)
    pieces = cut_pieces(counts, 8)
    # Request 0: pieces 0, 3; request 1: piece 1; request 2: pieces 2, 4, 5; 6 and 7 unused.
    assert pieces.first.tolist() == [0, 1, 1] and pieces.grid == 8
    assert pieces.owner.tolist() == [0, 2, 2, 3, 3]  # of pieces 3..7; the batch size past the last
    own = cut_pieces(torch.ones(3, dtype=torch.int32, device=DEVICE), 8)
    buffers = own._replace(counts=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    assert cut_pieces(counts, 8, out=buffers) is buffers
    assert buffers.counts.tolist() == [2, 1, 3] and buffers.first.tolist() == [0, 1, 1]
    assert buffers.owner.tolist() == pieces.owner.tolist()
    assert cut_pieces(torch.ones(3, dtype=torch.int32, device=DEVICE), 3).owner.numel() == 1  # one slot, unread


@pytest.mark.parametrize("balanced", [True, False])
def test_cut_step_is_the_torch_cut(balanced):
    """The one-kernel cut of a step gives ``balanced_splits`` / ``plan_kv_splits`` + ``cut_pieces``,
    over random lengths (zeros included), grids with and without spare pieces and owner lists
    longer than one chunk of the kernel."""
    gen = torch.Generator().manual_seed(11)
    for batch, extra in ((1, 15), (3, 0), (5, 40), (24, 24), (37, 5), (200, 300)):
        lens = torch.randint(0, 3000, (batch,), generator=gen).to(DEVICE)
        lens[0] = 0
        grid = batch + extra
        max_splits = max(1, grid // batch)
        if balanced:
            counts = balanced_splits(lens, grid, 64)
        else:
            grid = batch * max_splits
            counts = plan_kv_splits(lens, max_splits, 64)
        want = cut_pieces(counts, grid)
        out = cut_pieces(torch.zeros(batch, dtype=torch.int32, device=DEVICE), grid, depth=max_splits)
        got = cut_step(lens, 64, out, balanced=balanced)
        assert got is out
        for name in ("counts", "first", "owner"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (batch, extra, name)
