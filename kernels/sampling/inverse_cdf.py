"""Temperature sampling and greedy argmax with the sampled token's logprob, one program per row.

Replaces, for batches without top-k / top-p / min-p filters, the torch chain of the sampler
(upcast, divide by the temperature, log-softmax, exp, float64 cumulative sum over the vocabulary,
search, argmax, gathers: about ten kernels and 2 GB of traffic per step at batch 256 over a 152k
vocabulary) with one kernel that reads each row of logits twice and writes two numbers.

It implements the sampler's semantics (``rollout/sampling/sampler.py``) exactly, up to float
rounding: with ``y = logits / T`` (``T = 1`` for greedy rows) and ``p = exp(y - logsumexp(y))`` in
float32, a sampling row draws the first token whose float64 cumulative probability in vocab order
exceeds ``u * total`` (``u`` the row's uniform, ``total`` the sum of ``p``), and a greedy row takes
the first maximal logit. The logprob is ``y[token] - logsumexp(y)``. Per row:

    pass 1, every block of BLOCK ids:  running max and rescaled sum of exp (online softmax), argmax
    pass 2 (sampling rows):            float64 sum of p per block, kept in registers
    pass 3 (sampling rows):            the block where the cumulative sum crosses u * total, then
                                       the float64 cumulative sum inside that block only

so the search reads one block, not the row, and the result does not depend on the other rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096


@triton.jit
def _sample_rows_kernel(
    logits_ptr, stride_row, temps_ptr, uniforms_ptr, tokens_ptr, logprobs_ptr,
    vocab,
    BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    temp = tl.load(temps_ptr + row)
    greedy = temp == 0.0
    temp = tl.where(greedy, 1.0, temp)
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    # Pass 1: max, sum of exp(y - max) rescaled as the max grows, first index of the max.
    m = tl.full([], neg_inf, tl.float32)
    s = tl.zeros([], tl.float32)
    best_idx = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        ids = start + offs
        mask = ids < vocab
        y = tl.math.div_rn(tl.load(base + ids, mask=mask, other=neg_inf).to(tl.float32), temp)  # (BLOCK,)
        bm = tl.max(y, axis=0)
        # Ids are visited in increasing order, so only a strictly larger max moves the argmax.
        first = tl.min(tl.where(y == bm, ids, vocab), axis=0)
        best_idx = tl.where(bm > m, first, best_idx)
        new_m = tl.maximum(m, bm)
        # A block of -inf only (banned ids) must not turn the sum into NaN.
        alpha = tl.where(new_m == neg_inf, 1.0, tl.exp(m - new_m))
        e = tl.where(y == neg_inf, 0.0, tl.exp(y - new_m))
        s = s * alpha + tl.sum(e, axis=0)
        m = new_m
    lse = m + tl.log(s)

    token = best_idx
    if not greedy:
        # Pass 2: float64 mass of every block.
        blocks = tl.arange(0, NUM_BLOCKS)
        sums = tl.zeros([NUM_BLOCKS], tl.float64)
        for b in range(0, NUM_BLOCKS):
            ids = b * BLOCK + offs
            mask = ids < vocab
            y = tl.math.div_rn(tl.load(base + ids, mask=mask, other=neg_inf).to(tl.float32), temp)
            p = tl.where(mask, tl.exp(y - lse), 0.0).to(tl.float64)
            sums = tl.where(blocks == b, tl.sum(p, axis=0), sums)
        total = tl.sum(sums, axis=0)
        u = tl.load(uniforms_ptr + row)
        # Strictly below the total, so rounding can never carry the target past the last token.
        target = tl.minimum(u * total, total * (1.0 - 2.220446049250313e-16))
        # Pass 3: the first block whose cumulative mass exceeds the target, then the token inside it.
        cum = tl.cumsum(sums, axis=0)
        # (The scan's last value can round below the target: then the last block with mass.)
        last_blk = tl.max(tl.where(sums > 0.0, blocks, 0), axis=0)
        blk = tl.min(tl.where(cum > target, blocks, last_blk), axis=0)
        carry = tl.sum(tl.where(blocks < blk, sums, 0.0), axis=0)
        ids = blk * BLOCK + offs
        mask = ids < vocab
        y = tl.math.div_rn(tl.load(base + ids, mask=mask, other=neg_inf).to(tl.float32), temp)
        p = tl.where(mask, tl.exp(y - lse), 0.0).to(tl.float64)
        cdf = carry + tl.cumsum(p, axis=0)
        token = tl.min(tl.where((cdf > target) & mask, ids, vocab), axis=0)
        # The in-block sum can round differently from the block's total: then the target sits past
        # the block's last token of non-zero probability, which is the one to draw.
        last = tl.max(tl.where((p > 0.0) & mask, ids, -1), axis=0)
        token = tl.where(token == vocab, last, token)
        token = tl.maximum(token, 0)
    y_tok = tl.math.div_rn(tl.load(base + token).to(tl.float32), temp)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, y_tok - lse)


def sample_rows(
    logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B,) int64 and their logprobs (B,) float32 for the rows of ``logits`` (B, V).

    ``temperatures`` (B,) float32, 0 for greedy rows; ``uniforms`` (B,) float64 in [0, 1), the rows'
    draws. Banned ids are expected as ``-inf`` in ``logits`` already. ``block`` (a power of two)
    overrides the tile of ids per iteration (tests use small ones to cross block edges).
    """
    assert logits.dim() == 2 and logits.stride(-1) == 1, "logits must be (B, V) with unit stride"
    b, vocab = logits.shape
    assert temperatures.shape == (b,) and uniforms.shape == (b,) and uniforms.dtype == torch.float64
    block = block or min(MAX_BLOCK, triton.next_power_of_2(vocab))
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    if b == 0:
        return tokens, logprobs
    num_blocks = triton.next_power_of_2(triton.cdiv(vocab, block))
    _sample_rows_kernel[(b,)](
        logits, logits.stride(0), temperatures.to(torch.float32), uniforms, tokens, logprobs, vocab,
        BLOCK=block, NUM_BLOCKS=num_blocks, num_warps=8 if block >= 2048 else 4,
    )
    return tokens, logprobs
