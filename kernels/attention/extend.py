"""Paged extend / prefill attention: ragged query lengths, causal within each request, after a prefix.

Request ``b`` has ``q_len`` new tokens (rows ``qo_indptr[b]..``) and ``kv_len = prefix + q_len`` KV
positions, all already in the pool, their slots at ``kv_indices[kv_starts[b]:][:kv_lens[b]]`` (see
``decode.py`` for the two layouts). Query ``j`` sits at kv position ``prefix + j`` and sees kv
positions ``0..prefix + j``. One program takes ``BLOCK_M`` queries of one (request, q head) and
walks the KV in ``BLOCK_N`` tiles with an online softmax::

    kv positions   0 ..................... prefix+m0 | prefix+m0 .. prefix+m0+BLOCK_M
    tile rows m0.. all visible (no mask)             | causal diagonal (masked)

Heads vary fastest in the grid, so the q heads of one kv head run together and share K/V tiles
in L2.

Batch invariance: a query row's result depends only on its own KV and on the tile shape. KV tiles
start at position 0 whatever the row's chunk, and tiles past the row's position are fully masked
(they leave its running max, sum and output unchanged), so the same query gives the same bits in
a long prompt, in a chunk after a cached prefix, or alone in a decode step, as long as the tiles
are the same: ``deterministic=True`` fixes them (``deterministic_tiles``) and sends every tile
through the masked path, so no row's tile takes the unmasked code in one split and not another.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.decode import LOG2E, NEG
from kernels.triton_utils import dot_precision, mma, upcast_dot


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, k_ptr, v_ptr, kv_indices_ptr, kv_start, start, kv_end, q_pos, kv_head, scale_log2,
    stride_kn, stride_kh, stride_vn, stride_vh, offs_n, offs_d, mask_d,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One KV tile of the online softmax; ``CAUSAL`` tiles mask by position and by ``kv_end``."""
    pos = start + offs_n  # (BLOCK_N,)
    mask_n = pos < kv_end
    slots = tl.load(kv_indices_ptr + kv_start + pos, mask=mask_n, other=0).to(tl.int64)
    k = tl.load(
        k_ptr + slots[None, :] * stride_kn + kv_head * stride_kh + offs_d[:, None],
        mask=mask_n[None, :] & mask_d[:, None], other=0.0,
    )  # (BLOCK_D, BLOCK_N)
    s = mma(q, k, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION, UPCAST) * scale_log2
    if CAUSAL:
        visible = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        s = tl.where(visible, s, float("-inf"))  # (BLOCK_M, BLOCK_N)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_ptr + slots[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
        mask=mask_n[:, None] & mask_d[None, :], other=0.0,
    )  # (BLOCK_N, BLOCK_D)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qo_indptr_ptr, kv_indices_ptr, kv_starts_ptr, kv_lens_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALL_MASKED: tl.constexpr,
    PACK_GQA: tl.constexpr,
):
    b = tl.program_id(2)
    q_start = tl.load(qo_indptr_ptr + b)
    q_len = tl.load(qo_indptr_ptr + b + 1) - q_start
    if PACK_GQA:
        # Tile rows are (query, q head) pairs of one kv head, heads fastest: row r is query r // GROUP
        # of head kv_head * GROUP + r % GROUP, so the kv head's K/V tiles are read once for all of them.
        kv_head = tl.program_id(0)
        r0 = tl.program_id(1) * BLOCK_M
        offs_r = r0 + tl.arange(0, BLOCK_M)
        offs_m = offs_r // GROUP  # query of each row
        heads = kv_head * GROUP + offs_r % GROUP  # (BLOCK_M,)
        m0 = r0 // GROUP
        m_last = (r0 + BLOCK_M - 1) // GROUP
    else:
        head = tl.program_id(0)
        kv_head = head // GROUP
        m0 = tl.program_id(1) * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        heads = tl.zeros([BLOCK_M], tl.int32) + head
        m_last = m0 + BLOCK_M - 1
    if m0 >= q_len:
        return
    kv_start = tl.load(kv_starts_ptr + b).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + b).to(tl.int32)
    prefix = kv_len - q_len

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)  # (BLOCK_M,) token-axis rows
    q_offs = rows[:, None] * stride_qt + heads.to(tl.int64)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    q_pos = prefix + offs_m  # kv position of each query row

    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Positions before prefix + m0 are visible to every row of the tile: whole tiles there skip masking.
    full_end = 0 if ALL_MASKED else (prefix + m0) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(kv_len, prefix + m_last + 1)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_ptr, v_ptr, kv_indices_ptr, kv_start, start, kv_end, q_pos, kv_head, scale_log2,
            stride_kn, stride_kh, stride_vn, stride_vh, offs_n, offs_d, mask_d,
            False, BLOCK_M, BLOCK_N, PRECISION, UPCAST,
        )
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_ptr, v_ptr, kv_indices_ptr, kv_start, start, kv_end, q_pos, kv_head, scale_log2,
            stride_kn, stride_kh, stride_vn, stride_vh, offs_n, offs_d, mask_d,
            True, BLOCK_M, BLOCK_N, PRECISION, UPCAST,
        )
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + heads.to(tl.int64)[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :],
    )


def default_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(block_m, block_n, num_warps, num_stages)``. 16-bit inputs up to head_dim 128: 64 query rows
    by 32 keys over one warpgroup, three loads in flight (176 us vs 204 us for 128 x 64 over two
    warpgroups with two stages, H100, 8 x 1024 new tokens; 128 x 64 over one warpgroup was faster
    still there but spills registers). fp32 takes the exact FMA path, whose operands need far more
    registers: 16 x 16 tiles are the largest that do not spill."""
    if dtype == torch.float32:
        return 16, 16, 4, 2
    if head_dim <= 128:
        return 64, 32, 4, 3
    return 64, 32, 4, 2


def deterministic_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(block_m, block_n, num_warps, num_stages)`` of deterministic mode, for decode steps and
    prompts alike (they depend on nothing a batch changes): 16 rows, the fewest a tensor-core tile
    takes, holding (query, q head) pairs of one kv head (``pack_gqa``), so that a decode step wastes
    little and reads each kv head's K/V once. Up to head_dim 128, 128 keys per tile with three loads
    in flight (H200, Qwen3-0.6B heads: a decode step at 256 x 600 tokens 218 -> 165 us, under the
    split-KV decode's 176; a prompt step of 8 x 1024 tokens 416 -> 344 us, against 64 keys and two)."""
    if dtype == torch.float32:
        return 16, 16, 4, 2
    if head_dim <= 128:
        return 16, 128, 4, 3
    return 16, 64, 4, 2


def extend_attention(
    q: torch.Tensor,  # (T, Hq, D)
    k_buf: torch.Tensor,  # (num_slots, Hkv, D)
    v_buf: torch.Tensor,  # (num_slots, Hkv, D)
    qo_indptr: torch.Tensor,  # (B+1,) int32
    kv_indices: torch.Tensor,  # (N,) int slots; request b's run starts at kv_starts[b]
    kv_starts: torch.Tensor,  # (B,) int offsets into kv_indices
    kv_lens: torch.Tensor,  # (B,) int KV length (prefix + new) of each request
    scale: float,
    max_extend_len: int,
    *,
    out: torch.Tensor | None = None,  # (T, Hq, D)
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    deterministic: bool = False,
    pack_gqa: bool | None = None,
) -> torch.Tensor:  # (T, Hq, D)
    """Causal attention of every request's new tokens over its prefix and themselves.

    ``max_extend_len`` (>= every request's new-token count, a host-side number) sizes the grid.
    Tile options left ``None`` take ``default_tiles`` (``deterministic_tiles`` when ``deterministic``:
    a row's bits then depend on nothing but its own query and KV).

    ``pack_gqa`` (default: ``deterministic``): a tile's rows are (query, q head) pairs of one kv head
    instead of queries of one q head, so the q heads sharing a kv head read its K/V tiles once;
    what pays off when a request has few new tokens (decode steps through this kernel). A row's
    arithmetic is the same either way."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buf.shape[1]
    assert num_q_heads % num_kv_heads == 0, "q heads must be a multiple of kv heads"
    assert k_buf.stride(-1) == 1 and v_buf.stride(-1) == 1, "pool rows must be contiguous"
    if q.dtype != k_buf.dtype or q.stride(-1) != 1:
        q = q.to(k_buf.dtype).contiguous()
    if out is None:
        out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    batch = qo_indptr.shape[0] - 1
    if batch == 0 or num_tokens == 0 or max_extend_len <= 0:
        return out
    dm, dn, dw, ds = (deterministic_tiles if deterministic else default_tiles)(head_dim, q.dtype)
    block_m, block_n, num_warps = block_m or dm, block_n or dn, num_warps or dw
    num_stages = num_stages or ds
    group = num_q_heads // num_kv_heads
    pack = deterministic if pack_gqa is None else pack_gqa
    if pack:
        grid = (num_kv_heads, triton.cdiv(max_extend_len * group, block_m), batch)
    else:
        grid = (num_q_heads, triton.cdiv(max_extend_len, block_m), batch)
    _extend_kernel[grid](
        q, k_buf, v_buf, out, qo_indptr, kv_indices, kv_starts, kv_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim), PRECISION=dot_precision(q.dtype), UPCAST=upcast_dot(q),
        ALL_MASKED=deterministic, PACK_GQA=pack, num_warps=num_warps, num_stages=num_stages,
    )
    return out
