"""Top-k / top-p / min-p sampling without a sort, token for token equal to ``rollout/sampling/filtered.py``.

The reference ranks tokens by ``y = logits / T`` (ties to the lower id), weighs each with the integer
``w = floor(exp(y - max) * 2^40)``, keeps the shortest of three rank prefixes (top-k; min-p as the
count of ``e >= min_p``; top-p as the first rank whose preceding weight reaches ``top_p * W_total``)
and draws from the kept weights in vocab order. Here the same values come from the same float
operations (IEEE division, libdevice ``expf`` as torch's CUDA ``exp``) and every sum is an exact
int64, so the order of addition does not matter and the tokens are the reference's.

Instead of sorting, the boundary of the kept prefix is found by a radix search over the float's
order-preserving 32-bit key, four bits a level. Every kernel but the last runs on a (row, chunk)
grid so small batches still fill the GPU::

    level 0..7, grid (B, C): merge the previous level's per-chunk histograms (each program, the same
                             way), pick the digit whose bucket holds the last kept rank, then count
                             the ids and sum the weights of this chunk per next digit, for the ids
                             whose key starts with the digits picked so far
    _prep, grid (B, C):      the last pick gives the boundary value v and how many of its ties stay;
                             per chunk, the weight above v and the count of ties
    _draw, grid (B,):        kept weight per chunk, the chunk where the running sum passes
                             floor(u * W), then a scan of that chunk alone

A bucket holds the last kept rank iff it is the lowest non-empty bucket whose first (best) id is
kept: the kept ranks are a prefix, and a bucket's first id has rank "ids in higher buckets" and
preceding weight "their weight", both exact. Greedy and unfiltered rows come from ``sample_rows``
(launched first, which also gives each chunk's maximum); these kernels skip them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.sampling.inverse_cdf import MAX_CHUNKS, default_block, filtered_num_chunks, launch

LEVELS = 8  # 4-bit digits of a 32-bit key
BINS = 16
LBLOCK = 256  # ids per load in the histogram passes: a (LBLOCK, BINS) one-hot tile stays in registers
CBLOCK = 16  # chunks per load when a program merges the per-chunk histograms
STATE = 4  # per row and level: key prefix, ids above the bucket, their weight, spare

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter has no libdevice; numpy's exp differs from torch's CPU exp in the last bit now
    # and then, so on CPU the match with the reference holds except at such knife edges.
    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _log(x):
        return tl.log(x)
else:
    from triton.language.extra import libdevice

    # libdevice's expf is what torch's CUDA exp calls: bit for bit the same e (checked on an H200
    # over every float32 in [-104, 0]); tl.exp is a faster approximation that is not.
    @triton.jit
    def _exp(x):
        return libdevice.exp(x)

    @triton.jit
    def _log(x):
        return libdevice.log(x)


@triton.jit
def _is_filtered(row, temps_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr):
    return (tl.load(temps_ptr + row) > 0.0) & (
        (tl.load(top_ks_ptr + row) > 0) | (tl.load(top_ps_ptr + row) < 1.0) | (tl.load(min_ps_ptr + row) > 0.0))


@triton.jit
def _load_y(base, ids, mask, temp):
    y = tl.math.div_rn(tl.load(base + ids, mask=mask, other=float("-inf")).to(tl.float32), temp)
    return tl.where(y == 0.0, 0.0, y)  # -0.0 -> +0.0, as the reference: equal values tie


@triton.jit
def _key(y):
    """Order-preserving key of a float32 in [0, 2^32), as int64."""
    bits = y.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648


@triton.jit
def _weight(y, m):
    return (_exp(y - m) * 1099511627776.0).to(tl.int64)  # floor(e * 2^40): exact scaling, truncation


@triton.jit
def _row_max(maxes_ptr, row, num_chunks, MAX_CHUNKS: tl.constexpr):
    cs = tl.arange(0, MAX_CHUNKS)
    return tl.max(tl.load(maxes_ptr + row * MAX_CHUNKS + cs, mask=cs < num_chunks, other=float("-inf")), axis=0)


@triton.jit
def _row_limits(row, vocab, num_chunks, top_ks_ptr, top_ps_ptr, rmin_ptr, wtot_ptr, MAX_CHUNKS: tl.constexpr):
    """The rank cap (top-k, min-p) and the top-p threshold on preceding weight (inf: off)."""
    cs = tl.arange(0, MAX_CHUNKS)
    valid = cs < num_chunks
    r_min = tl.sum(tl.load(rmin_ptr + row * num_chunks + cs, mask=valid, other=0).to(tl.int64), axis=0)
    w_total = tl.sum(tl.load(wtot_ptr + row * num_chunks + cs, mask=valid, other=0), axis=0)
    k = tl.load(top_ks_ptr + row)
    cap = tl.minimum(tl.where(k > 0, tl.minimum(k, vocab), vocab), r_min)
    top_p = tl.load(top_ps_ptr + row)
    thr = tl.where(top_p >= 1.0, float("inf"), top_p.to(tl.float64) * w_total.to(tl.float64))
    return cap, thr


@triton.jit
def _resolve(level, row, B, num_chunks, cnt_ptr, ws_ptr, state_ptr, cap, thr,
             BINS: tl.constexpr, CBLOCK: tl.constexpr):
    """Merge the histograms of ``level - 1`` and pick its digit: the state ``level`` histograms with."""
    prev = level - 1
    sp = state_ptr + (prev * B + row) * 4
    prefix = tl.load(sp)
    n_above = tl.load(sp + 1)
    w_above = tl.load(sp + 2)
    bins = tl.arange(0, BINS)
    cnt = tl.zeros([BINS], tl.int64)
    ws = tl.zeros([BINS], tl.int64)
    base = (prev * B + row) * num_chunks * BINS
    for c0 in range(0, num_chunks, CBLOCK):
        cs = c0 + tl.arange(0, CBLOCK)
        offs = base + cs[:, None] * BINS + bins[None, :]  # (CBLOCK, BINS)
        ok = (cs[:, None] < num_chunks) & (bins[None, :] < BINS)
        cnt += tl.sum(tl.load(cnt_ptr + offs, mask=ok, other=0).to(tl.int64), axis=0)
        ws += tl.sum(tl.load(ws_ptr + offs, mask=ok, other=0), axis=0)
    # The first id of bucket d has every id of the buckets above it (and above the prefix) before it.
    above_cnt = tl.sum(cnt, axis=0) - tl.cumsum(cnt, axis=0)  # (BINS,)
    above_ws = tl.sum(ws, axis=0) - tl.cumsum(ws, axis=0)
    rank = n_above + above_cnt
    kept = (cnt > 0) & (rank < cap) & ((rank == 0) | ((w_above + above_ws).to(tl.float64) < thr))
    sel = tl.min(tl.where(kept, bins, BINS), axis=0)
    pick = bins == sel
    prefix = prefix | (sel.to(tl.int64) << (28 - 4 * prev).to(tl.int64))
    n_above += tl.sum(tl.where(pick, above_cnt, 0), axis=0)
    w_above += tl.sum(tl.where(pick, above_ws, 0), axis=0)
    return prefix, n_above, w_above, tl.sum(tl.where(pick, cnt, 0), axis=0)


@triton.jit(do_not_specialize=["B", "chunk", "num_chunks", "level"])
def _level_kernel(
    logits_ptr, stride_row, temps_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr, maxes_ptr,
    cnt_ptr, ws_ptr, rmin_ptr, wtot_ptr, state_ptr,
    B, vocab, chunk, num_chunks, level,
    MAX_CHUNKS: tl.constexpr, BINS: tl.constexpr, LBLOCK: tl.constexpr, CBLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if _is_filtered(row, temps_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr) == 0:
        return
    temp = tl.load(temps_ptr + row)
    min_p = tl.load(min_ps_ptr + row)
    m = _row_max(maxes_ptr, row, num_chunks, MAX_CHUNKS)
    # Weights matter for top-p only, after level 0 (which also sums them for the threshold).
    need_w = (level == 0) | (tl.load(top_ps_ptr + row) < 1.0)
    prefix = tl.zeros([], tl.int64)
    if level > 0:
        cap, thr = _row_limits(row, vocab, num_chunks, top_ks_ptr, top_ps_ptr, rmin_ptr, wtot_ptr, MAX_CHUNKS)
        prefix, n_above, w_above, n_bucket = _resolve(level, row, B, num_chunks, cnt_ptr, ws_ptr, state_ptr,
                                                      cap, thr, BINS, CBLOCK)
        if c == 0:
            sp = state_ptr + (level * B + row) * 4
            tl.store(sp, prefix)
            tl.store(sp + 1, n_above)
            tl.store(sp + 2, w_above)
            tl.store(sp + 3, n_bucket)
    high = (32 - 4 * level).to(tl.int64)  # the bits picked so far (none at level 0: key >> 32 == 0)
    shift = (28 - 4 * level).to(tl.int64)  # this level's digit
    bins = tl.arange(0, BINS)
    offs = tl.arange(0, LBLOCK)
    base = logits_ptr + row * stride_row
    cnt = tl.zeros([BINS], tl.int32)
    ws = tl.zeros([BINS], tl.int64)
    r_min = tl.zeros([], tl.int32)
    w_total = tl.zeros([], tl.int64)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, vocab)
    for start in range(lo, hi, LBLOCK):
        ids = start + offs
        mask = ids < hi
        y = _load_y(base, ids, mask, temp)
        key = _key(y)
        match = mask & ((key >> high) == (prefix >> high))
        if tl.max(match.to(tl.int32), axis=0) > 0:  # deep levels: most blocks hold no id of the bucket
            digit = ((key >> shift) & 15).to(tl.int32)
            hot = (digit[:, None] == bins[None, :]) & match[:, None]  # (LBLOCK, BINS)
            cnt += tl.sum(hot.to(tl.int32), axis=0)
            if need_w:
                e = _exp(y - m)
                w = (e * 1099511627776.0).to(tl.int64)
                ws += tl.sum(tl.where(hot, w[:, None], 0), axis=0)
                if level == 0:
                    r_min += tl.sum(((e >= min_p) & mask).to(tl.int32), axis=0)
                    w_total += tl.sum(tl.where(mask, w, 0), axis=0)
    out = ((level * B + row) * num_chunks + c) * BINS + bins
    tl.store(cnt_ptr + out, cnt)
    tl.store(ws_ptr + out, ws)
    if level == 0:
        tl.store(rmin_ptr + row * num_chunks + c, r_min)
        tl.store(wtot_ptr + row * num_chunks + c, w_total)


@triton.jit(do_not_specialize=["B", "chunk", "num_chunks", "levels"])
def _prep_kernel(
    logits_ptr, stride_row, temps_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr, maxes_ptr,
    cnt_ptr, ws_ptr, rmin_ptr, wtot_ptr, state_ptr, fin_ptr, above_ptr, ties_ptr,
    B, vocab, chunk, num_chunks, levels,
    MAX_CHUNKS: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if _is_filtered(row, temps_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr) == 0:
        return
    temp = tl.load(temps_ptr + row)
    m = _row_max(maxes_ptr, row, num_chunks, MAX_CHUNKS)
    cap, thr = _row_limits(row, vocab, num_chunks, top_ks_ptr, top_ps_ptr, rmin_ptr, wtot_ptr, MAX_CHUNKS)
    vkey, n_gt, w_gt, n_ties = _resolve(levels, row, B, num_chunks, cnt_ptr, ws_ptr, state_ptr, cap, thr,
                                        BINS, CBLOCK)
    # The boundary value v back from its key, and the weight of each of its ties.
    k32 = (vkey - 2147483648).to(tl.int32)
    v = tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32).to(tl.float32, bitcast=True)
    w_v = _weight(v, m)
    # Ties of v kept: j = 0 is (that is how v was picked); tie j has rank n_gt + j and preceding
    # weight w_gt + j * w_v. Guess the top-p count, then step to it with the exact test.
    kept = tl.minimum(n_ties, cap - n_gt)
    if (thr < float("inf")) & (w_v > 0):
        g = ((thr - w_gt.to(tl.float64)) / w_v.to(tl.float64)).to(tl.int64) + 1
        g = tl.maximum(tl.minimum(g, n_ties), 1)
        while (g < n_ties) & ((w_gt + g * w_v).to(tl.float64) < thr):
            g += 1
        while (g > 1) & ((w_gt + (g - 1) * w_v).to(tl.float64) >= thr):
            g -= 1
        kept = tl.minimum(kept, g)
    kept = tl.maximum(kept, 1)
    if c == 0:
        tl.store(fin_ptr + row * 4, vkey)
        tl.store(fin_ptr + row * 4 + 1, kept)
        tl.store(fin_ptr + row * 4 + 2, w_v)
    offs = tl.arange(0, BLOCK)
    base = logits_ptr + row * stride_row
    above = tl.zeros([], tl.int64)
    ties = tl.zeros([], tl.int64)
    lo = c * chunk
    hi = tl.minimum(lo + chunk, vocab)
    for start in range(lo, hi, BLOCK):
        ids = start + offs
        mask = ids < hi
        y = _load_y(base, ids, mask, temp)
        key = _key(y)
        above += tl.sum(tl.where(mask & (key > vkey), _weight(y, m), 0), axis=0)
        ties += tl.sum((mask & (key == vkey)).to(tl.int64), axis=0)
    tl.store(above_ptr + row * num_chunks + c, above)
    tl.store(ties_ptr + row * num_chunks + c, ties)


@triton.jit(do_not_specialize=["chunk", "num_chunks"])
def _draw_kernel(
    logits_ptr, stride_row, temps_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr, uniforms_ptr, maxes_ptr,
    fin_ptr, above_ptr, ties_ptr, tokens_ptr, logprobs_ptr,
    vocab, chunk, num_chunks,
    MAX_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if _is_filtered(row, temps_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr) == 0:
        return
    temp = tl.load(temps_ptr + row)
    m = _row_max(maxes_ptr, row, num_chunks, MAX_CHUNKS)
    vkey = tl.load(fin_ptr + row * 4)
    kept_ties = tl.load(fin_ptr + row * 4 + 1)
    w_v = tl.load(fin_ptr + row * 4 + 2)
    cs = tl.arange(0, MAX_CHUNKS)
    valid = cs < num_chunks
    above = tl.load(above_ptr + row * num_chunks + cs, mask=valid, other=0)  # (MAX_CHUNKS,) int64
    ties = tl.load(ties_ptr + row * num_chunks + cs, mask=valid, other=0)
    ties_before = tl.cumsum(ties, axis=0) - ties
    mass = above + w_v * tl.minimum(tl.maximum(kept_ties - ties_before, 0), ties)  # kept weight per chunk
    total = tl.sum(mass, axis=0)
    target = (tl.load(uniforms_ptr + row) * total.to(tl.float64)).to(tl.int64)
    target = tl.minimum(target, total - 1)
    k = tl.min(tl.where(tl.cumsum(mass, axis=0) > target, cs, MAX_CHUNKS), axis=0)
    carry = tl.sum(tl.where(cs < k, mass, 0), axis=0)
    tie_carry = tl.sum(tl.where(cs < k, ties, 0), axis=0)
    # Scan chunk k block by block until the running kept weight passes the target.
    offs = tl.arange(0, BLOCK)
    base = logits_ptr + row * stride_row
    pos = k * chunk
    hi = tl.minimum(pos + chunk, vocab)
    found = tl.full([], -1, tl.int32)
    while (pos < hi) & (found < 0):
        ids = pos + offs
        mask = ids < hi
        y = _load_y(base, ids, mask, temp)
        key = _key(y)
        tie = (mask & (key == vkey)).to(tl.int64)
        tie_rank = tie_carry + tl.cumsum(tie, axis=0) - tie
        keep = mask & ((key > vkey) | ((tie > 0) & (tie_rank < kept_ties)))
        w = tl.where(keep, _weight(y, m), 0)
        cum = carry + tl.cumsum(w, axis=0)
        hit = tl.min(tl.where((cum > target) & mask, ids, vocab), axis=0)
        found = tl.where(hit < vocab, hit, -1)
        carry += tl.sum(w, axis=0)
        tie_carry += tl.sum(tie, axis=0)
        pos += BLOCK
    # Exact sums put the target inside chunk k; the clamp only keeps a broken invariant in range.
    token = tl.maximum(found, 0)
    w_tok = _weight(_load_y(base, token, token < vocab, temp), m)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, (_log(w_tok.to(tl.float64)) - _log(total.to(tl.float64))).to(tl.float32))


def sample_rows_filtered(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
    min_ps: torch.Tensor, uniforms: torch.Tensor, block: int | None = None, chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B,) int64 and logprobs (B,) float32 of a batch with top-k / top-p / min-p rows.

    As ``sample_rows``, plus per-row ``top_ks`` (B,) int (<= 0: off), ``top_ps`` (B,) float32 (>= 1:
    off) and ``min_ps`` (B,) float32 (0: off). Rows with a filter on are drawn as in
    ``rollout/sampling/filtered.py``, the others (greedy, plain temperature) as ``sample_rows``.
    """
    b, vocab = logits.shape
    block = block or default_block(vocab)
    chunks = chunks or filtered_num_chunks(b, vocab, logits.device, block)
    run = launch(logits, temperatures, uniforms, block, chunks)  # every row, and the chunk maxima
    if b == 0:
        return run.tokens, run.logprobs
    assert top_ks.shape == top_ps.shape == min_ps.shape == (b,)
    assert vocab <= 1 << 23, "weights are summed in int64: V * 2^40 must stay below 2^63"
    dev, n = logits.device, run.num_chunks
    temps, ks = temperatures.to(torch.float32), top_ks.to(torch.int64)
    ps, mps = top_ps.to(torch.float32), min_ps.to(torch.float32)
    cnt = torch.empty(LEVELS, b, n, BINS, dtype=torch.int32, device=dev)
    ws = torch.empty(LEVELS, b, n, BINS, dtype=torch.int64, device=dev)
    rmin = torch.empty(b, n, dtype=torch.int32, device=dev)
    wtot = torch.empty(b, n, dtype=torch.int64, device=dev)
    state = torch.zeros(LEVELS, b, STATE, dtype=torch.int64, device=dev)  # level 0: no digit picked yet
    fin = torch.empty(b, 4, dtype=torch.int64, device=dev)
    above = torch.empty(b, n, dtype=torch.int64, device=dev)
    ties = torch.empty(b, n, dtype=torch.int64, device=dev)
    common = (logits, logits.stride(0), temps, ks, ps, mps, run.maxes)
    lblock = min(LBLOCK, run.block)
    for level in range(LEVELS):
        _level_kernel[(b, n)](*common, cnt, ws, rmin, wtot, state, b, vocab, run.chunk, n, level,
                              MAX_CHUNKS=MAX_CHUNKS, BINS=BINS, LBLOCK=lblock, CBLOCK=CBLOCK, num_warps=4)
    _prep_kernel[(b, n)](*common, cnt, ws, rmin, wtot, state, fin, above, ties, b, vocab, run.chunk, n,
                         LEVELS, MAX_CHUNKS=MAX_CHUNKS, BINS=BINS, BLOCK=run.block, CBLOCK=CBLOCK,
                         num_warps=4)
    _draw_kernel[(b,)](*common[:6], uniforms, run.maxes, fin, above, ties, run.tokens, run.logprobs,
                       vocab, run.chunk, n, MAX_CHUNKS=MAX_CHUNKS, BLOCK=run.block, num_warps=4)
    return run.tokens, run.logprobs
