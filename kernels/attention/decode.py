"""Paged decode attention (one query token per request), split over the KV length.

Flash-decoding in two kernels. The first gives each (kv head, piece) a contiguous piece of a
request's KV run and computes, for all ``G = Hq / Hkv`` query heads of that kv head at once (so
each K/V tile is loaded once for the whole group), a partial output normalised by its own softmax
sum plus the log-sum-exp of the piece. The second (``kernels.attention.decode_merge``) merges the
pieces of each (request, q head); a request in one piece has its output written by the first::

    kv run of request b   | split 0 | split 1 | ... | split n_b-1 |     n_b = pieces.counts[b]
    pieces                first[b]  first[b] + 1 ...                   (DecodePieces)
    partial               (o_0, lse_0) (o_1, lse_1)  ...
    out                   sum_s exp2(lse_s - m) o_s / sum_s exp2(lse_s - m),   m = max_s lse_s

The grid holds a fixed number of pieces (``DecodePieces.grid``: ``B * max_splits`` for a uniform
cut); the counts, each request's first piece and each piece's request are device tensors, so the
cut follows the requests' lengths without a host sync, which keeps the launch CUDA-graph safe.

Request ``b``'s KV slots are ``kv_indices[kv_starts[b] : kv_starts[b] + kv_lens[b]]``. With a flat
per-step index array that is ``kv_starts = kv_indptr[:-1]`` (``runs_from_indptr``); the engine
instead passes its request table flattened, ``kv_starts[b] = row_b * max_context`` and ``kv_lens =
seq_lens``, so a decode step needs no per-step index array at all.
Scores are kept in base 2 (``scale * log2(e)`` folded in) so the softmax uses ``exp2``.

``decode_attention_qkv`` takes the fused qkv projection instead of q: each program normalises
(Qwen3's per-head q/k norm) and rotates its q heads itself, and the program whose piece holds the
request's last position, the token being decoded, does the same to that token's k head, attends
to it from registers and stores it and its v head in the cache. That is the work of
``kernels.fused.qk_norm_rope_`` for a decode step, without its kernel and its round trip::

    qkv row of request b  | q heads (Hq) | k heads (Hkv) | v heads (Hkv) |
    program (h, piece)    | q heads of kv head h, rotated | ... last piece only: k / v head h -> cache
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.attention.decode_merge import NEG, launch_merge
from kernels.attention.decode_plan import DecodePieces, decode_tiles, decode_workspace
from kernels.fused.rope import rms_norm_heads, rotate_halves
from kernels.triton_utils import dot_precision, mma, num_sms, pdl_launch, pdl_trigger, pdl_wait, upcast_dot

LOG2E = 1.4426950408889634


@triton.jit
def _norm_rope_heads(rows, mask, w_ptr, cos_row, sin_row, eps, offs_half, HEAD_DIM: tl.constexpr,
                     HAS_NORM: tl.constexpr):
    """Heads at ``rows`` (rows, 1) of pointers (``mask``ed), RMS-normalised (``HAS_NORM``) and rotated:
    halves (rows, HEAD_DIM / 2) as ``kernels.fused.qk_norm_rope_`` computes them."""
    half: tl.constexpr = HEAD_DIM // 2
    x1 = tl.load(rows + offs_half, mask=mask, other=0.0)
    x2 = tl.load(rows + half + offs_half, mask=mask, other=0.0)
    if HAS_NORM:
        x1, x2 = rms_norm_heads(x1, x2, tl.load(w_ptr + offs_half).to(tl.float32),
                                tl.load(w_ptr + half + offs_half).to(tl.float32), eps, HEAD_DIM)
    return rotate_halves(x1, x2, tl.load(cos_row + offs_half), tl.load(cos_row + half + offs_half),
                         tl.load(sin_row + offs_half), tl.load(sin_row + half + offs_half))


@triton.jit
def _v_tile(v_ptr, slots, mask_n, kv_head, stride_vn, stride_vh, offs_d, mask_d):
    """The V rows (BLOCK_N, BLOCK_D) of a KV tile's ``slots``."""
    return tl.load(v_ptr + slots[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
                   mask=mask_n[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _softmax_tile(s, m_i, l_i, acc, v, mask_n, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One KV tile's online-softmax step: scores ``s`` (BLOCK_H, BLOCK_N, base 2) and the tile's V
    rows ``v``; returns the updated ``(acc, m_i, l_i)``."""
    s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _attend_tile(s, m_i, l_i, acc, v_ptr, slots, mask_n, kv_head, stride_vn, stride_vh, offs_d, mask_d,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``_softmax_tile`` with the tile's V rows loaded here."""
    v = _v_tile(v_ptr, slots, mask_n, kv_head, stride_vn, stride_vh, offs_d, mask_d)
    return _softmax_tile(s, m_i, l_i, acc, v, mask_n, PRECISION, UPCAST)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, kv_indices_ptr, kv_starts_ptr, kv_lens_ptr, counts_ptr, first_ptr, owner_ptr, out_ptr,
    mid_o_ptr, mid_lse_ptr, pos_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slot_ptr, batch, scale_log2, eps,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_outb, stride_outh, stride_og, stride_oh, stride_lg, stride_lh, stride_cos,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, DIRECT: tl.constexpr,
    ROPE: tl.constexpr, HAS_NORM: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
):
    # The grid is (kv head, piece), the head fastest: the programs of one piece start together and
    # read neighbouring rows of the same slots. Pieces 0..B-1 are the requests' first, the rest
    # belong to request owner[piece - B] (DecodePieces). DIRECT: one piece per request, no merge.
    # A request in one piece writes its output itself; the others' pieces leave a partial output
    # and its lse for the merge kernel.
    # ROPE: q_ptr is the qkv projection (see decode_attention_qkv); q and the new k are rotated here.
    # With PDL (pdl_launch(kind="decode")) everything up to pdl_wait runs while the qkv matmul
    # before this kernel still does: the step's scalars (written before its first kernel) and, on
    # the ROPE path with EARLY, the piece's first KV tile, whose positions earlier steps stored.
    # Only the token being decoded comes from the matmul, and it is read after the wait. EARLY is
    # for split steps (small batches, where that latency is the kernel's time); with one piece per
    # request the tile held across the wait costs registers, hence occupancy, on long runs.
    pdl_trigger(PDL)
    kv_head = tl.program_id(0)
    num_kv_heads = tl.num_programs(0)
    piece = tl.program_id(1)
    if DIRECT:
        b = piece
        n_split = 1
        split = 0
    else:
        # First pieces need no lookup: their scalars load in one round with the request's others.
        extra = piece - batch
        b = piece
        if extra >= 0:
            b = tl.load(owner_ptr + extra)
        # Slots of the grid past the last piece exit. Piece 0 is request 0's: programs (h, 0)
        # always reach pdl_wait, so this kernel never ends before the one it follows (the order
        # every later PDL kernel's early reads rely on).
        if b >= batch:
            return
        n_split = tl.maximum(tl.load(counts_ptr + b), 1)
        split = extra * 0
        if extra >= 0:
            split = extra - tl.load(first_ptr + b) + 1
    kv_start = tl.load(kv_starts_ptr + b).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    if ROPE:
        pos = tl.load(pos_ptr + b)
        slot = tl.load(slot_ptr + b).to(tl.int64)
    split_len = tl.cdiv(kv_len, n_split)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_h  # (BLOCK_H,) q heads of this kv head; rows >= GROUP are padding
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_H], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    if ROPE:
        # q as halves (BLOCK_H, HEAD_DIM / 2), normalised and rotated; K tiles read as halves too.
        half: tl.constexpr = HEAD_DIM // 2
        offs_x = tl.arange(0, half)[None, :]
        offs_kd = tl.arange(0, half)
        # The cache holds every position but the last. With EARLY its first tile in this piece is
        # loaded before the wait (see above), the rest in the loop below.
        hi_cached = tl.minimum(hi, kv_len - 1)
        if EARLY:
            mask_0 = lo + offs_n < hi_cached
            slots_0 = tl.load(kv_indices_ptr + kv_start + lo + offs_n, mask=mask_0, other=0).to(tl.int64)
            k_cols_0 = k_ptr + slots_0[None, :] * stride_kn + kv_head * stride_kh + offs_kd[:, None]  # (half, BLOCK_N)
            k1_0 = tl.load(k_cols_0, mask=mask_0[None, :], other=0.0)
            k2_0 = tl.load(k_cols_0 + half, mask=mask_0[None, :], other=0.0)
            v_0 = _v_tile(v_ptr, slots_0, mask_0, kv_head, stride_vn, stride_vh, offs_d, mask_d)
        pdl_wait(PDL)
        cos_row = cos_ptr + pos * stride_cos
        sin_row = sin_ptr + pos * stride_cos
        q_rows = q_ptr + b * stride_qb + heads[:, None] * HEAD_DIM
        q1, q2 = _norm_rope_heads(q_rows, mask_h[:, None], qw_ptr, cos_row, sin_row, eps, offs_x, HEAD_DIM, HAS_NORM)
        # The token being decoded, in this piece when its position kv_len - 1 is (else masked out):
        # its k head rotated, stored with its v head (no program reads that slot from the cache),
        # and its score, all before the loop so that these loads overlap the loop's first ones.
        own = (lo <= kv_len - 1) & (kv_len - 1 < hi)
        num_q_heads = GROUP * num_kv_heads
        k_row = q_ptr + b * stride_qb + (num_q_heads + kv_head) * HEAD_DIM
        v_row = q_ptr + b * stride_qb + (num_q_heads + num_kv_heads + kv_head) * HEAD_DIM
        kn1, kn2 = _norm_rope_heads(k_row, offs_x < half, kw_ptr, cos_row, sin_row, eps, offs_x, HEAD_DIM,
                                    HAS_NORM)  # (1, half)
        vn = tl.load(v_row + offs_d, mask=mask_d, other=0.0)  # (BLOCK_D,)
        k_dst = k_ptr + slot * stride_kn + kv_head * stride_kh + offs_x
        stored = tl.where(own, HEAD_DIM, 0)  # the masks as bounds (the interpreter takes no scalar & block)
        tl.store(k_dst, kn1, mask=offs_x < stored)
        tl.store(k_dst + half, kn2, mask=offs_x < stored)
        tl.store(v_ptr + slot * stride_vn + kv_head * stride_vh + offs_d, vn, mask=offs_d < stored)
        s_new = (tl.sum(q1.to(tl.float32) * kn1.to(tl.float32), 1)
                 + tl.sum(q2.to(tl.float32) * kn2.to(tl.float32), 1)) * scale_log2  # (BLOCK_H,)
        s_new = tl.where(own, s_new, float("-inf"))
        first = lo
        if EARLY:
            s = mma(q2, k2_0, mma(q1, k1_0, tl.zeros([BLOCK_H, BLOCK_N], tl.float32), PRECISION, UPCAST),
                    PRECISION, UPCAST) * scale_log2
            acc, m_i, l_i = _softmax_tile(s, m_i, l_i, acc, v_0, mask_0, PRECISION, UPCAST)
            first = lo + BLOCK_N
        for start in range(first, hi_cached, BLOCK_N):
            pos_n = start + offs_n
            mask_n = pos_n < hi_cached
            slots = tl.load(kv_indices_ptr + kv_start + pos_n, mask=mask_n, other=0).to(tl.int64)
            k_cols = k_ptr + slots[None, :] * stride_kn + kv_head * stride_kh + offs_kd[:, None]  # (half, BLOCK_N)
            k1 = tl.load(k_cols, mask=mask_n[None, :], other=0.0)
            k2 = tl.load(k_cols + half, mask=mask_n[None, :], other=0.0)
            s = mma(q2, k2, mma(q1, k1, tl.zeros([BLOCK_H, BLOCK_N], tl.float32), PRECISION, UPCAST),
                    PRECISION, UPCAST) * scale_log2
            acc, m_i, l_i = _attend_tile(s, m_i, l_i, acc, v_ptr, slots, mask_n, kv_head, stride_vn, stride_vh,
                                         offs_d, mask_d, PRECISION, UPCAST)
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp2(m_i - m_new)
        p_new = tl.exp2(s_new - m_new)
        l_i = l_i * alpha + p_new
        p_new = p_new.to(vn.dtype).to(tl.float32)  # rounded for the product with v, as the tiles' p is
        acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)[None, :]
        m_i = m_new
    else:
        pdl_wait(PDL)  # the new token's K and V are in the cache: a kernel before this one stored them
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_h[:, None] & mask_d[None, :], other=0.0,
        )  # (BLOCK_H, BLOCK_D)
        for start in range(lo, hi, BLOCK_N):
            pos_n = start + offs_n
            mask_n = pos_n < hi
            slots = tl.load(kv_indices_ptr + kv_start + pos_n, mask=mask_n, other=0).to(tl.int64)  # (BLOCK_N,)
            k = tl.load(
                k_ptr + slots[None, :] * stride_kn + kv_head * stride_kh + offs_d[:, None],
                mask=mask_n[None, :] & mask_d[:, None], other=0.0,
            )  # (BLOCK_D, BLOCK_N)
            s = mma(q, k, tl.zeros([BLOCK_H, BLOCK_N], tl.float32), PRECISION, UPCAST) * scale_log2
            acc, m_i, l_i = _attend_tile(s, m_i, l_i, acc, v_ptr, slots, mask_n, kv_head, stride_vn, stride_vh,
                                         offs_d, mask_d, PRECISION, UPCAST)

    # An empty piece (kv_len not divisible into n_split nonempty ones, or kv_len 0) has l_i = 0:
    # it gets lse = -inf and weight 0 in the merge.
    nonempty = l_i > 0
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if n_split == 1:
        tl.store(out_ptr + b * stride_outb + heads[:, None] * stride_outh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    else:  # piece: b for the first piece, past the B first ones for the others (DecodePieces)
        tl.store(mid_o_ptr + piece * stride_og + heads[:, None] * stride_oh + offs_d[None, :], out,
                 mask=mask_h[:, None] & mask_d[None, :])
        tl.store(mid_lse_ptr + piece * stride_lg + heads * stride_lh, lse, mask=mask_h)


class NewTokenRope(NamedTuple):
    """What ``decode_attention_qkv`` needs to finish the qkv projection of the token being decoded:
    its rotary position, the tables, Qwen3's per-head q / k norm weights (None: no norm) and the
    cache slot its k and v go to."""

    positions: torch.Tensor  # (B,) int
    cos_cache: torch.Tensor  # (P, D) float32, rotate_half layout
    sin_cache: torch.Tensor
    q_norm_weight: torch.Tensor | None  # (D,)
    k_norm_weight: torch.Tensor | None
    eps: float
    slots: torch.Tensor  # (B,) int


def decode_attention(
    q: torch.Tensor,  # (B, Hq, D)
    k_buf: torch.Tensor,  # (num_slots, Hkv, D)
    v_buf: torch.Tensor,  # (num_slots, Hkv, D)
    kv_indices: torch.Tensor,  # (N,) int slots; request b's run starts at kv_starts[b]
    kv_starts: torch.Tensor,  # (B,) int offsets into kv_indices
    kv_lens: torch.Tensor,  # (B,) int KV length of each request
    scale: float,
    pieces: DecodePieces,
    *,
    out: torch.Tensor | None = None,  # (B, Hq, D)
    mid_o: torch.Tensor | None = None,  # (>= grid, Hq, D) fp32
    mid_lse: torch.Tensor | None = None,  # (>= grid, Hq) fp32
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:  # (B, Hq, D)
    """Attention of each request's single query over its whole KV run in the paged pool.

    ``pieces``: the step's cut of the runs (``uniform_pieces`` of ``plan_kv_splits`` counts, or the
    engine's ``cut_step``). ``tiles``: ``(block_n, num_warps, num_stages)`` (default:
    ``decode_tiles`` for the batch size and the cut's depth and grid)."""
    num_q_heads = q.shape[1]
    assert k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1, "pool rows must be contiguous"
    if q.dtype != k_buf.dtype or q.stride(-1) != 1:
        q = q.to(k_buf.dtype).contiguous()
    return _launch(q, num_q_heads, None, k_buf, v_buf, kv_indices, kv_starts, kv_lens, scale, pieces,
                   out, mid_o, mid_lse, tiles, None)


def decode_attention_qkv(
    qkv: torch.Tensor,  # (B, (Hq + 2 Hkv) * D), the new tokens' q, k and v heads before norm / rotary
    num_q_heads: int,
    rope: NewTokenRope,
    k_buf: torch.Tensor,  # (num_slots, Hkv, D), qkv's dtype
    v_buf: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_starts: torch.Tensor,
    kv_lens: torch.Tensor,  # (B,) KV length including the token being decoded
    scale: float,
    pieces: DecodePieces,
    *,
    out: torch.Tensor | None = None,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    early_tile: bool | None = None,
    tiles: tuple[int, int, int] | None = None,
) -> torch.Tensor:  # (B, Hq, D)
    """``qk_norm_rope_`` of the decoded tokens (storing their k and v at ``rope.slots``), then
    ``decode_attention``, in the split kernel (module doc). Each request's last KV position is the
    token being decoded; its slot in ``kv_indices`` is ``rope.slots[b]`` and is read from registers.
    ``early_tile``: load each piece's first KV tile before the PDL wait (default: with PDL, in
    split steps); the result is the same either way. ``pieces`` and ``tiles``: as in
    ``decode_attention``."""
    batch, width = qkv.shape
    num_kv_heads, head_dim = k_buf.shape[1], k_buf.shape[2]
    assert width == (num_q_heads + 2 * num_kv_heads) * head_dim and qkv.stride(-1) == 1, "qkv rows [q | k | v]"
    assert head_dim >= 32 and head_dim & (head_dim - 1) == 0, "head_dim: a power of two, at least 32"
    for c in (k_buf, v_buf):
        assert c.dtype == qkv.dtype and c.stride(2) == 1 and c.stride(1) == head_dim, "cache rows (N, Hkv, D)"
    assert rope.cos_cache.stride() == rope.sin_cache.stride() and rope.cos_cache.stride(-1) == 1
    assert rope.positions.shape == (batch,) and rope.slots.shape == (batch,)
    return _launch(qkv, num_q_heads, rope, k_buf, v_buf, kv_indices, kv_starts, kv_lens, scale, pieces,
                   out, mid_o, mid_lse, tiles, early_tile)


def _launch(
    q: torch.Tensor, num_q_heads: int, rope: NewTokenRope | None, k_buf: torch.Tensor, v_buf: torch.Tensor,
    kv_indices: torch.Tensor, kv_starts: torch.Tensor, kv_lens: torch.Tensor, scale: float,
    pieces: DecodePieces, out: torch.Tensor | None, mid_o: torch.Tensor | None, mid_lse: torch.Tensor | None,
    tiles: tuple[int, int, int] | None, early_tile: bool | None,
) -> torch.Tensor:
    """The split kernel (and the merge kernel where requests are split) over ``q`` (B, Hq, D) or,
    with ``rope``, the qkv rows (B, (Hq + 2 Hkv) * D)."""
    batch = q.shape[0]
    num_kv_heads, head_dim = k_buf.shape[1], k_buf.shape[2]
    assert num_q_heads % num_kv_heads == 0, "q heads must be a multiple of kv heads"
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    assert pieces.counts.numel() == batch and pieces.grid >= batch, "pieces: a cut of this batch's requests"
    assert pieces.grid < 65536, "at most 65,535 pieces: the grid's second axis (a smaller batch or spare)"
    direct = pieces.grid == batch  # each request in one piece: normalise and write the output at once
    if direct:
        mid_o = mid_lse = out  # not read
    else:
        if mid_o is None or mid_lse is None:
            mid_o, mid_lse = decode_workspace(pieces.grid, num_q_heads, head_dim, q.device)
        assert mid_o.dim() == 3 and mid_lse.dim() == 2 and min(mid_o.shape[0], mid_lse.shape[0]) >= pieces.grid, \
            "workspace: mid_o (>= grid, Hq, D) and mid_lse (>= grid, Hq) (decode_workspace)"
    block_d = triton.next_power_of_2(head_dim)
    block_n, num_warps, num_stages = tiles or decode_tiles(q.dtype, head_dim, batch, num_kv_heads,
                                                           num_sms(q.device), pieces.depth, pieces.grid)
    r = rope
    has_norm = r is not None and r.q_norm_weight is not None
    pdl = pdl_launch(q, kind="decode")
    if early_tile is None:
        early_tile = pdl["PDL"] and pieces.depth > 1
    _decode_split_kernel[(num_kv_heads, pieces.grid)](
        q, k_buf, v_buf, kv_indices, kv_starts, kv_lens, pieces.counts, pieces.first, pieces.owner, out,
        mid_o, mid_lse,
        *((r.positions, r.cos_cache, r.sin_cache) if r is not None else (kv_lens,) * 3),
        *((r.q_norm_weight, r.k_norm_weight) if has_norm else (kv_lens,) * 2),
        r.slots if r is not None else kv_lens, batch, scale * LOG2E, r.eps if r is not None else 0.0,
        q.stride(0), q.stride(1) if r is None else head_dim, k_buf.stride(0), k_buf.stride(1), v_buf.stride(0),
        v_buf.stride(1), out.stride(0), out.stride(1), mid_o.stride(0), mid_o.stride(1), mid_lse.stride(0),
        mid_lse.stride(1), r.cos_cache.stride(0) if r is not None else 0,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q), DIRECT=direct,
        ROPE=r is not None, HAS_NORM=has_norm, EARLY=early_tile,
        num_warps=num_warps, num_stages=num_stages, **pdl,
    )
    if not direct:
        launch_merge(mid_o, mid_lse, pieces, out, pdl_launch(q, kind="decode"))
    return out
