"""Temperature sampling and greedy argmax with the sampled token's logprob, split over the vocabulary.

Replaces, for batches without top-k / top-p / min-p filters, the torch chain of the sampler
(upcast, divide by the temperature, log-softmax, exp, float64 cumulative sum over the vocabulary,
search, argmax, gathers: about ten kernels and 2 GB of traffic per step at batch 256 over a 152k
vocabulary) with two kernels that read each row of logits about one and a half times.

It implements the sampler's semantics (``rollout/sampling/sampler.py``) up to float rounding: with
``y = logits / T`` (``T = 1`` for greedy rows) and ``p = exp(y - logsumexp(y))``, a sampling row
draws the first token whose float64 cumulative probability in vocab order exceeds ``u * total``
(``u`` the row's uniform, ``total`` the sum of ``p``), and a greedy row takes the first maximal
logit. The logprob is ``y[token] - logsumexp(y)``. Each row is cut into ``C`` chunks so that small
batches still spread over the GPU::

    _chunk_stats_kernel, grid (B, C):  per chunk: max of y, float64 sum of exp(y - max), first argmax
    _draw_kernel, grid (B,):           logsumexp and the float64 mass of every chunk from those,
                                       the chunk where the cumulative mass crosses u * total, then a
                                       scan of that chunk alone (stopping at the crossing)

The chunk masses are ``sum exp(y - max_c) * exp(max_c - lse)`` while the scan sums ``exp(y - lse)``;
the two differ in the last bits, which moves a draw only when it falls within about 1e-7 of a
token's bin edge (the torch reference differs from both by as much).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK = 1024  # ids per load
# Chunks are one block of ids each until the first kernel would have more than this many programs
# per SM, then two blocks (``num_chunks``).
PROGRAMS_PER_SM = 80
# The filtered kernels (``filtered.py``) merge every chunk's histogram in each program, so their
# cost grows with the chunk count: they keep fewer, longer chunks, about this many programs per SM
# (more chunks made them 1.2-1.9x slower at 16-256 rows on an H200).
FILTERED_PROGRAMS_PER_SM = 4
# Chunks per row at most; also the width of the per-row statistics, fixed so that the kernels
# compile once whatever the batch size (a width per batch size meant a compile in the middle of
# serving each time the batch crossed a power of two).
MAX_CHUNKS = 256


@triton.jit(do_not_specialize=["chunk"])
def _chunk_stats_kernel(
    logits_ptr, stride_row, temps_ptr, max_ptr, sum_ptr, arg_ptr,
    vocab, chunk,
    NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    base = logits_ptr + row * stride_row
    temp = tl.load(temps_ptr + row)
    temp = tl.where(temp == 0.0, 1.0, temp)
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    lo = c * chunk
    hi = tl.minimum(lo + chunk, vocab)
    m = tl.full([], neg_inf, tl.float32)
    s = tl.zeros([], tl.float64)
    arg = tl.zeros([], tl.int32) + lo
    for start in range(lo, hi, BLOCK):
        ids = start + offs
        mask = ids < hi
        y = tl.math.div_rn(tl.load(base + ids, mask=mask, other=neg_inf).to(tl.float32), temp)  # (BLOCK,)
        bm = tl.max(y, axis=0)
        # Ids are visited in increasing order, so only a strictly larger max moves the argmax.
        first = tl.min(tl.where(y == bm, ids, vocab), axis=0)
        arg = tl.where(bm > m, first, arg)
        new_m = tl.maximum(m, bm)
        # Blocks of -inf only (banned ids) must not turn the sum into NaN.
        shift = tl.where(new_m == neg_inf, 0.0, new_m)
        alpha = tl.exp(tl.where(new_m == neg_inf, 0.0, m - shift)).to(tl.float64)
        e = tl.exp(y - shift).to(tl.float64)  # exp(-inf) = 0 for banned ids
        s = s * alpha + tl.sum(e, axis=0)
        m = new_m
    out = row * NUM_CHUNKS + c
    tl.store(max_ptr + out, m)
    tl.store(sum_ptr + out, s)
    tl.store(arg_ptr + out, arg)


@triton.jit(do_not_specialize=["chunk", "num_chunks"])
def _draw_kernel(
    logits_ptr, stride_row, temps_ptr, uniforms_ptr, max_ptr, sum_ptr, arg_ptr, tokens_ptr, logprobs_ptr,
    vocab, chunk, num_chunks,
    NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    temp = tl.load(temps_ptr + row)
    greedy = temp == 0.0
    temp = tl.where(greedy, 1.0, temp)
    neg_inf = float("-inf")
    cs = tl.arange(0, NUM_CHUNKS)
    valid = cs < num_chunks
    maxes = tl.load(max_ptr + row * NUM_CHUNKS + cs, mask=valid, other=neg_inf)  # (NUM_CHUNKS,) f32
    sums = tl.load(sum_ptr + row * NUM_CHUNKS + cs, mask=valid, other=0.0)  # (NUM_CHUNKS,) f64
    m = tl.max(maxes, axis=0)
    scale = tl.where(maxes == neg_inf, 0.0, tl.exp(maxes - m)).to(tl.float64)
    lse = m + tl.log(tl.sum(sums * scale, axis=0).to(tl.float32))
    # Greedy: the first chunk holding the maximum has the first maximal id.
    best = tl.min(tl.where(maxes == m, cs, NUM_CHUNKS), axis=0)
    token = tl.load(arg_ptr + row * NUM_CHUNKS + best)
    if not greedy:
        mass = tl.where(maxes == neg_inf, 0.0, sums * tl.exp(maxes - lse).to(tl.float64))  # (NUM_CHUNKS,) f64
        total = tl.sum(mass, axis=0)
        u = tl.load(uniforms_ptr + row)
        # Strictly below the total, so rounding can never carry the target past the last token.
        target = tl.minimum(u * total, total * (1.0 - 2.220446049250313e-16))
        cum = tl.cumsum(mass, axis=0)
        last_chunk = tl.max(tl.where(mass > 0.0, cs, 0), axis=0)
        k = tl.min(tl.where(cum > target, cs, last_chunk), axis=0)
        carry = tl.sum(tl.where(cs < k, mass, 0.0), axis=0)
        # Scan chunk k block by block until the cumulative mass passes the target.
        offs = tl.arange(0, BLOCK)
        pos = k * chunk
        hi = tl.minimum(pos + chunk, vocab)
        found = tl.full([], -1, tl.int32)
        last = tl.full([], -1, tl.int32)
        while (pos < hi) & (found < 0):
            ids = pos + offs
            mask = ids < hi
            y = tl.math.div_rn(tl.load(base + ids, mask=mask, other=neg_inf).to(tl.float32), temp)
            p = tl.where(mask, tl.exp(y - lse), 0.0).to(tl.float64)
            cdf = carry + tl.cumsum(p, axis=0)
            hit = tl.min(tl.where((cdf > target) & mask, ids, vocab), axis=0)
            found = tl.where(hit < vocab, hit, -1)
            last = tl.maximum(last, tl.max(tl.where((p > 0.0) & mask, ids, -1), axis=0))
            carry += tl.sum(p, axis=0)
            pos += BLOCK
        # The scan's sum can round differently from the chunk's mass: then the target sits past the
        # chunk's last token of non-zero probability, which is the one to draw.
        token = tl.where(found >= 0, found, tl.maximum(last, 0))
    y_tok = tl.math.div_rn(tl.load(base + token).to(tl.float32), temp)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, y_tok - lse)


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter: a few chunks, so the tests cross chunk edges
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_chunks(batch: int, vocab: int, device: torch.device, block: int = BLOCK) -> int:
    """Chunks per row: one block of ids each, or two where one-block chunks would give the first
    kernel more than ``PROGRAMS_PER_SM`` programs per SM.

    Short chunks make the second kernel's scan short (it walks one chunk per row, serially) and
    give the first kernel many programs. Timed on an H200 in CUDA graphs over a 151,936-id
    vocabulary (``python -m kernels.bench_sampling --only-chunks``), one-block chunks were fastest
    up to 64 rows (32 rows: 15.1 us against 30.2 for the earlier rule of four programs per SM) and
    two-block chunks from 128 rows (256 rows: 70.5 us against 188.0)."""
    blocks = triton.cdiv(vocab, block)
    per_chunk = 1 if max(batch, 1) * blocks <= PROGRAMS_PER_SM * _sm_count(device) else 2
    return max(1, min(triton.cdiv(blocks, per_chunk), MAX_CHUNKS))


def filtered_num_chunks(batch: int, vocab: int, device: torch.device, block: int = BLOCK) -> int:
    """Chunks per row for the filtered kernels: about ``FILTERED_PROGRAMS_PER_SM`` programs per SM,
    none smaller than one block of ids."""
    want = triton.cdiv(FILTERED_PROGRAMS_PER_SM * _sm_count(device), max(batch, 1))
    return max(1, min(want, triton.cdiv(vocab, block), MAX_CHUNKS))


def default_block(vocab: int) -> int:
    """Ids per load: ``BLOCK``, or the vocabulary rounded up to a power of two where smaller."""
    return min(BLOCK, triton.next_power_of_2(vocab))


def sample_rows(
    logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor,
    block: int | None = None, chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B,) int64 and their logprobs (B,) float32 for the rows of ``logits`` (B, V).

    ``temperatures`` (B,) float32, 0 for greedy rows; ``uniforms`` (B,) float64 in [0, 1), the rows'
    draws. Banned ids are expected as ``-inf`` in ``logits`` already. ``block`` (a power of two) and
    ``chunks`` override the ids per load and the chunks per row (tests use them to cross edges).
    """
    run = launch(logits, temperatures, uniforms, block, chunks)
    return run.tokens, run.logprobs


@dataclass(slots=True)
class SampleRun:
    """The outputs of one launch and the per-chunk figures that later kernels (filters) reuse."""

    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) float32
    maxes: torch.Tensor  # (B, MAX_CHUNKS) float32: max of logits / T per chunk (first num_chunks valid)
    num_chunks: int
    chunk: int  # ids per chunk, a multiple of block
    block: int


def launch(
    logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor,
    block: int | None = None, chunks: int | None = None,
) -> SampleRun:
    """``sample_rows``, also returning the chunk layout and the per-chunk maxima."""
    assert logits.dim() == 2 and logits.stride(-1) == 1, "logits must be (B, V) with unit stride"
    b, vocab = logits.shape
    assert temperatures.shape == (b,) and uniforms.shape == (b,) and uniforms.dtype == torch.float64
    dev = logits.device
    tokens = torch.empty(b, dtype=torch.int64, device=dev)
    logprobs = torch.empty(b, dtype=torch.float32, device=dev)
    block = block or default_block(vocab)
    width = MAX_CHUNKS
    maxes = torch.empty(b, width, dtype=torch.float32, device=dev)
    if b == 0:
        return SampleRun(tokens, logprobs, maxes, 1, vocab, block)
    n = min(chunks or num_chunks(b, vocab, dev, block), MAX_CHUNKS)
    chunk = triton.cdiv(triton.cdiv(vocab, n), block) * block  # a whole number of blocks
    n = triton.cdiv(vocab, chunk)
    sums = torch.empty(b, width, dtype=torch.float64, device=dev)
    args = torch.empty(b, width, dtype=torch.int32, device=dev)
    temps = temperatures.to(torch.float32)
    _chunk_stats_kernel[(b, n)](logits, logits.stride(0), temps, maxes, sums, args, vocab, chunk,
                                NUM_CHUNKS=width, BLOCK=block, num_warps=4)
    _draw_kernel[(b,)](logits, logits.stride(0), temps, uniforms, maxes, sums, args, tokens, logprobs,
                       vocab, chunk, n, NUM_CHUNKS=width, BLOCK=block, num_warps=4)
    return SampleRun(tokens, logprobs, maxes, n, chunk, block)
