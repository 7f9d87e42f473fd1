"""Batched sampling with logprobs.

Semantics, per row of the ``(B, V)`` logits (upcast to float32):

1. Banned ids (stop tokens before ``min_new_tokens``) are masked to ``-inf`` first; this mask is
   part of the distribution sampled from. Ids ``>= V`` cannot be produced and are ignored.
2. Greedy rows (temperature 0): the token is the argmax of the masked logits; its ``logprobs`` entry
   is the log-softmax of the masked logits at temperature 1, i.e. the model's own log-probability.
3. Sampling rows without filters: ``p = softmax(logits / T)``, drawn by inverse-CDF sampling: the
   first token whose cumulative probability (float64, in vocab order) exceeds ``u * total``, with
   one uniform ``u`` per row that depends only on the row's (seed, step) (see ``noise.py``). A row's
   token therefore does not depend on the rest of the batch, and a token of zero probability never
   starts a bin, so it is never drawn. Its ``logprobs`` entry is ``log p(token)``.
4. Sampling rows with top-k, top-p or min-p: the filters are judged on the temperature-scaled
   distribution, each keeps a prefix of the tokens ranked by probability (ties to the lower id),
   the kept set is their intersection (never empty: the most probable token stays), and the draw
   (same uniform) is from the kept tokens renormalised; its ``logprobs`` entry is the log of the
   token's renormalised probability. ``filtered.py`` states the exact rules: integer weights make
   every sum exact, so the fused kernel reproduces the torch code token for token.

``raw_logprobs`` and the top alternatives are taken from the log-softmax of the logits as given,
before banning, temperature and filtering. Everything is batched tensor work; greedy-only batches
skip the draw and filtering, and batches without filters skip the sort.

On GPU the fused kernels of ``kernels.sampling`` take every batch (``sample_rows`` without filters,
``sample_rows_filtered`` with them: the same draws and logprobs, read straight from the model's
logits); the torch code here and in ``filtered.py`` is their reference.
``Sampler(deterministic=True)`` fixes the unfiltered kernel's vocabulary chunks and, in a batch that
mixes rows with and without filters, picks the path per row, so a row's bits never depend on the
batch (the filtered rules are exact integer sums, whatever the chunking).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.errors import InvalidArgumentError
from rollout.layers.fused_ops import use_fused
from rollout.sampling.filtered import filtered_rows, sample_filtered
from rollout.sampling.sampling_batch import SamplingBatch


@dataclass(slots=True)
class SampleResult:
    """The tokens chosen for one step and the logprobs asked for."""

    token_ids: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) float32: log p(token) under the distribution actually sampled from
    raw_logprobs: torch.Tensor | None  # (B,) float32: log_softmax(raw logits)[token]
    top_ids: torch.Tensor | None  # (B, k) int64 top-k alternatives of the raw log-softmax
    top_logprobs: torch.Tensor | None  # (B, k) float32, descending


class Sampler:
    """Turns a step's logits into tokens and logprobs; stateless, so one instance serves any batch.

    ``deterministic``: every row's token and logprobs are the same bits whatever the other rows are."""

    def __init__(self, deterministic: bool = False) -> None:
        self.deterministic = deterministic

    def sample(
        self,
        logits: torch.Tensor,
        batch: SamplingBatch,
        *,
        return_logprob: bool,
        return_raw_logprob: bool,
        top_logprobs_num: int,
    ) -> SampleResult:
        """Sample one token per row of ``logits`` (B, V) under ``batch``'s parameters.

        ``top_logprobs_num`` alternatives (clamped to V; 0: none) are returned per row.
        """
        if top_logprobs_num < 0:
            raise InvalidArgumentError(f"must be >= 0 (got {top_logprobs_num})", field="top_logprobs_num")
        assert logits.dim() == 2 and logits.shape[0] == batch.batch_size, "logits must be (B, V)"
        fused = use_fused(logits) and logits.stride(-1) == 1 and not (
            prefers_torch_filtering(batch) and not self.deterministic)
        if fused:
            if self.deterministic and batch.need_filter and not all(batch.filtered_rows):
                token_ids, logprobs = _sample_split(logits, batch)
            else:
                token_ids, logprobs = _sample_fused(logits, batch, self.deterministic)
            return self._with_raw(logits, token_ids, logprobs if return_logprob else None,
                                  return_raw_logprob, top_logprobs_num)
        raw = logits.float()  # (B, V); a no-op view when already float32, so never write into it
        masked = _apply_banned(raw, batch.banned_token_ids)  # (B, V)

        if batch.all_greedy:
            token_ids = masked.argmax(dim=-1)  # (B,)
            logprobs = None
            if return_logprob:
                logprobs = _gather(torch.log_softmax(masked, dim=-1), token_ids)
        else:
            token_ids, logprobs = _sample_mixed(masked, batch, return_logprob)
        return self._with_raw(raw, token_ids, logprobs, return_raw_logprob, top_logprobs_num)

    @staticmethod
    def _with_raw(
        logits: torch.Tensor, token_ids: torch.Tensor, logprobs: torch.Tensor | None, return_raw_logprob: bool,
        top_logprobs_num: int,
    ) -> SampleResult:
        """The result, with the raw log-softmax figures of ``logits`` (B, V) if asked for."""
        raw_logprobs = top_ids = top_logprobs = None
        if return_raw_logprob or top_logprobs_num > 0:
            raw_lsm = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
            if return_raw_logprob:
                raw_logprobs = _gather(raw_lsm, token_ids)
            if top_logprobs_num > 0:
                k = min(top_logprobs_num, raw_lsm.shape[-1])
                top_logprobs, top_ids = torch.topk(raw_lsm, k, dim=-1)  # (B, k), sorted descending
        return SampleResult(
            token_ids=token_ids,
            logprobs=logprobs,
            raw_logprobs=raw_logprobs,
            top_ids=top_ids,
            top_logprobs=top_logprobs,
        )


# Rows above which top-p alone samples faster on the torch path than in the fused filtered kernel
# (H200, vocab 151,936: 0.9x at 64 rows, 0.7x at 256; top-k and min-p rows stay faster fused).
FUSED_TOP_P_MAX_ROWS = 32


def prefers_torch_filtering(batch: SamplingBatch) -> bool:
    """Whether this batch samples faster on the torch path: a large batch whose filtering rows use
    top-p alone. Both paths follow the same exact integer rules (``filtered.py``): same tokens."""
    return batch.top_p_only and batch.batch_size > FUSED_TOP_P_MAX_ROWS


def _sample_fused(
    logits: torch.Tensor, batch: SamplingBatch, fixed_chunks: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and logprobs by the fused kernels, from logits in their own dtype.

    ``fixed_chunks``: split every row's vocabulary into as many chunks as it takes, not as many as
    fill the GPU at this batch size (the chunk edges set the unfiltered kernel's summation order)."""
    from kernels.sampling import sample_rows, sample_rows_filtered
    from kernels.sampling.inverse_cdf import BLOCK, MAX_CHUNKS

    masked = _apply_banned(logits, batch.banned_token_ids)  # -inf is exact in bf16 / fp16 too
    if batch.need_filter:
        return sample_rows_filtered(masked, batch.temperatures, batch.top_ks, batch.top_ps, batch.min_ps,
                                    batch.uniforms)
    chunks = min(-(-logits.shape[-1] // BLOCK), MAX_CHUNKS) if fixed_chunks else None
    return sample_rows(masked, batch.temperatures, batch.uniforms, chunks=chunks)


def _sample_split(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and logprobs (B,) of a batch mixing rows with and without filters: the rows without
    take the fused kernel, the others the torch code, so a row's path is its own choice."""
    plain = [i for i, f in enumerate(batch.filtered_rows) if not f]
    kept = [i for i, f in enumerate(batch.filtered_rows) if f]
    token_ids = torch.empty(batch.batch_size, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch.batch_size, dtype=torch.float32, device=logits.device)
    for rows, fused in ((plain, True), (kept, False)):
        sub = batch.select(rows)
        index = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        if fused:
            tok, lp = _sample_fused(logits[index], sub, fixed_chunks=True)
        else:
            tok, lp = _sample_mixed(_apply_banned(logits[index].float(), sub.banned_token_ids), sub, True)
        token_ids[index] = tok
        logprobs[index] = lp
    return token_ids, logprobs


def _gather(values: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    return values.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # (B,)


def _apply_banned(logits: torch.Tensor, banned: list[list[int]] | None) -> torch.Tensor:
    """Return a copy of ``logits`` with each row's banned ids at -inf (the input itself if none).

    A row whose ban covers every id keeps its logits as they are: masking it would leave nothing to
    draw and a NaN logprob. Request validation refuses such requests; this is the last line of defence.
    """
    if banned is None:
        return logits
    vocab = logits.shape[-1]
    # Positions in the flattened (B, V); ids past the vocabulary can never be produced anyway.
    flat = torch.tensor([r * vocab + c for r, ids in enumerate(banned) if not _bans_all(ids, vocab)
                         for c in ids if c < vocab], dtype=torch.int64)  # (N,)
    if logits.is_cuda:
        flat = flat.pin_memory()  # a queued copy: a pageable one would wait for the device
    flat = flat.to(logits.device, non_blocking=True)
    out = logits.contiguous().clone()
    # index_fill_ takes the value as a kernel argument; ``out[i, j] = -inf`` copies a host scalar
    # to the device with a blocking copy, which waits for the device's queue.
    out.view(-1).index_fill_(0, flat, float("-inf"))
    return out


def _bans_all(ids: list[int], vocab: int) -> bool:
    """Whether ``ids`` cover all of ``[0, vocab)`` (checked on the host, without touching the logits)."""
    return len(ids) >= vocab and len({c for c in ids if c < vocab}) >= vocab


def _sample_mixed(
    masked: torch.Tensor, batch: SamplingBatch, return_logprob: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw every row from its temperature-scaled distribution, then put greedy rows' argmax and
    filtered rows' draws (``filtered.py``) in their places."""
    greedy = batch.temperatures == 0  # (B,) bool
    # Greedy rows are divided by 1 so that their log-softmax is the model's own.
    temps = torch.where(greedy, torch.ones_like(batch.temperatures), batch.temperatures)  # (B,)
    logp = torch.log_softmax(masked / temps.unsqueeze(1), dim=-1)  # (B, V)
    token_ids = torch.where(greedy, masked.argmax(dim=-1), _inverse_cdf(logp, batch.uniforms))  # (B,)
    # Greedy rows report the temperature-1 log-softmax, unfiltered sampling rows the scaled one.
    logprobs = _gather(logp, token_ids) if return_logprob else None
    if batch.need_filter:
        rows = filtered_rows(batch)  # (B,) bool
        f_tokens, f_logprobs = sample_filtered(masked, batch)
        token_ids = torch.where(rows, f_tokens, token_ids)
        if logprobs is not None:
            logprobs = torch.where(rows, f_logprobs, logprobs)
    return token_ids, logprobs


def _inverse_cdf(logp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of ``logp`` (B, V) with the row's uniform (B,) float64.

    The CDF is summed in float64 so that even tail tokens get bins of the right width; ``right=True``
    picks the first token whose CDF exceeds the target, so empty bins (zero probability) are skipped.
    """
    cdf = logp.exp().double().cumsum_(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    # Keep the target strictly below the total so rounding can never fall past the last bin.
    target = torch.minimum(uniforms.unsqueeze(1) * total, total * (1.0 - 2.0**-52))  # (B, 1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logp.shape[-1] - 1)  # (B,)
