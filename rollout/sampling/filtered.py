"""Top-k / top-p / min-p sampling in exact integer arithmetic: the reference of the fused kernel.

Rows that sample (temperature > 0) with any filter on (``top_k > 0``, ``top_p < 1`` or ``min_p > 0``)
are drawn here. Every decision is a function of values that torch and the Triton kernel
(``kernels/sampling/filtered.py``) compute bit for bit alike, and every sum is exact, so the two
pick the same token for the same logits and uniform, whatever order they add in:

1. ``y = logits / T`` in float32 (IEEE division; ``-0.0`` is made ``+0.0`` so that equal values tie),
   ``m = max(y)``, ``e = exp(y - m)`` in float32 (CUDA's ``expf``; the kernel calls the same
   libdevice function), and the token's weight ``w = floor(e * 2^40)``, an int64. Sums of weights
   are exact (at most ``V * 2^40 < 2^63``), so they do not depend on the order of addition.
2. Tokens are ranked by ``y`` descending, ties to the lower id. Each filter keeps a prefix of ranks:

   - top-k keeps ranks ``< k``;
   - min-p keeps ranks ``< #{e >= min_p}`` (``e >= min_p`` is ``p >= min_p * p_max``);
   - top-p keeps rank ``r`` iff ``float64(W_before(r)) < float64(top_p) * float64(W_total)``, with
     ``W_before(r)`` the weight of the ranks before ``r``: the smallest prefix that reaches ``top_p``
     of the mass (``top_p >= 1``: off).

   The kept set is the shortest of the three prefixes, never empty (rank 0 always stays).
3. The draw: with ``C`` the running sum of kept weights in vocab order and ``W`` its total, the token
   is the first whose ``C`` exceeds ``min(floor(u * float64(W)), W - 1)``. Its logprob is
   ``log(w / W)``: the log-probability under the distribution actually sampled from.

Weights below one unit (``e < 2^-40``: tokens more than 27.7 nats under the best) are 0, so such
tokens are never drawn from a filtered row; their total probability is below ``V * 2^-40`` (1.4e-7
for a 152k vocabulary). Everything else is drawn with its probability to within 2^-40 of the best
token's.
"""

from __future__ import annotations

import torch

from rollout.sampling.sampling_batch import SamplingBatch

WEIGHT_SCALE = 2.0**40  # e = 1 (the best token) weighs 2^40 units


def filtered_rows(batch: SamplingBatch) -> torch.Tensor:
    """(B,) bool: the rows drawn here (sampling, with at least one filter on)."""
    return (batch.temperatures > 0) & ((batch.top_ks > 0) | (batch.top_ps < 1.0) | (batch.min_ps > 0.0))


def token_weights(logits: torch.Tensor, temperatures: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y`` and ``e`` (B, V) float32 and the weights ``w`` (B, V) int64 of step 1 (greedy rows: T = 1)."""
    temps = torch.where(temperatures == 0, torch.ones_like(temperatures), temperatures)  # (B,)
    y = logits.float() / temps.unsqueeze(1)  # (B, V)
    y = torch.where(y == 0, torch.zeros_like(y), y)  # -0.0 -> +0.0: a tie, as the kernel's keys see it
    e = torch.exp(y - y.max(dim=-1, keepdim=True).values)  # (B, V) in [0, 1]
    return y, e, (e * WEIGHT_SCALE).to(torch.int64)  # exact scaling, then truncation: floor


def _kept_weights(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1 and 2: every token's weight ``w`` (B, V) int64 and whether it is kept (B, V) bool,
    both in vocab order."""
    vocab = logits.shape[-1]
    y, e, w = token_weights(logits, batch.temperatures)  # (B, V) each
    _, order = torch.sort(y, dim=-1, descending=True, stable=True)  # (B, V): rank -> id
    w_sorted = w.gather(1, order)  # (B, V)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)  # (1, V)

    r_k = torch.where(batch.top_ks > 0, batch.top_ks.clamp(max=vocab), vocab)  # (B,)
    r_min = (e >= batch.min_ps.unsqueeze(1)).sum(dim=-1)  # (B,): min-p as a count of ranks
    keep = rank < torch.minimum(r_k, r_min).unsqueeze(1)  # (B, V) in rank order

    w_total = w.sum(dim=-1)  # (B,) exact
    w_before = w_sorted.cumsum(dim=-1) - w_sorted  # (B, V) exact exclusive prefix sums
    threshold = batch.top_ps.double() * w_total.double()  # (B,)
    keep &= (batch.top_ps >= 1.0).unsqueeze(1) | (w_before.double() < threshold.unsqueeze(1))
    keep[:, 0] = True
    return w, torch.empty_like(keep).scatter_(1, order, keep)  # kept, in vocab order


def sample_filtered(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B,) int64 and logprobs (B,) float32 of every row under the rules above.

    ``logits`` (B, V) carry banned ids as ``-inf`` already. Rows without filters are computed too
    (every filter off keeps every token); the caller takes only the rows of ``filtered_rows``.
    """
    w, kept = _kept_weights(logits, batch)
    cum = torch.where(kept, w, 0).cumsum(dim=-1)  # (B, V) exact
    total = cum[:, -1]  # (B,) >= 2^40: rank 0 has e = 1
    target = torch.minimum((batch.uniforms * total.double()).to(torch.int64), total - 1)  # (B,)
    tokens = torch.searchsorted(cum, target.unsqueeze(1), right=True).squeeze(1)  # first C > target
    w_tok = w.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (B,)
    logprobs = (torch.log(w_tok.double()) - torch.log(total.double())).float()
    return tokens, logprobs


def filtered_logprobs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """(B, V) float32: the log-probabilities ``log(w / W)`` of the distribution each row is drawn from
    under the rules above (-inf for tokens it never draws); what speculative decoding verifies against."""
    w, kept = _kept_weights(logits, batch)
    w = torch.where(kept, w, 0)
    total = w.sum(dim=-1, keepdim=True)  # (B, 1)
    return (torch.log(w.double()) - torch.log(total.double())).float()
