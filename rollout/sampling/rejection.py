"""Exact verification of drafted tokens (speculative decoding), on the distribution actually sampled from.

A sequence that drafted ``k`` tokens ``d_1 .. d_k`` is verified by one target forward over its last
known token and the drafts, which gives ``k + 1`` rows of target logits. Row ``j`` is the target's
next-token distribution after ``d_1 .. d_j``; ``p_j`` is that row after banning, temperature,
top-k, top-p and min-p (greedy: the point mass on the argmax), i.e. exactly what the sampler would
draw from at that position without speculation. The drafter proposed ``d_{j+1}`` from ``q_j``.

The standard rule (Leviathan et al., Chen et al.), one row at a time from ``j = 0``:

- accept ``d_{j+1}`` with probability ``min(1, p_j(d) / q_j(d))`` and go on to the next row;
- on the first rejection emit a token drawn from ``max(0, p_j - q_j)`` normalised, and stop;
- when all ``k`` drafts are accepted, emit a bonus token drawn from ``p_k``.

Each emitted token then has exactly the target's distribution given the tokens before it, whatever
``q`` is, so the output distribution equals that of plain sampling. A row layout sketch for two
sequences drafting 2 and 3 tokens::

    rows        | s0: r0 r1 r2 | s1: r0 r1 r2 r3 |
    verifies    |     d1 d2 -  |     d1 d2 d3 -  |   (- : the bonus row, no draft)

Deterministic drafters (n-gram lookup, the draft model at temperature 0) propose a point mass
``q = delta_d``. The rule then reads: accept with probability ``p(d)``, else draw from ``p`` with
``d`` removed. Drawing ``t ~ p`` by the row's usual inverse-CDF draw and accepting iff ``t == d``
is that rule exactly (the accept event is the draw landing in ``d``'s bin; otherwise ``t`` is
distributed as ``p`` without ``d``). ``accepted_counts`` applied to the sampler's own tokens is
this form: it needs no second draw, and with the same seeds it emits the very tokens plain
sampling would.

The reported logprob of every emitted token is the target's, as without speculation: the log of
``p_j`` at the token for sampled rows, the temperature-1 log-softmax for greedy rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rollout.sampling.filtered import filtered_logprobs, filtered_rows
from rollout.sampling.noise import mix_seed, uniform_draws
from rollout.sampling.sampler import _apply_banned, _inverse_cdf
from rollout.sampling.sampling_batch import SamplingBatch

# Salts that give the accept test and the residual draw random streams of their own, independent
# of the row's sampling draw (which stays (seed, step)).
ACCEPT_SALT = 0x5EC_ACC
RESIDUAL_SALT = 0x5EC_2E5


@dataclass(slots=True)
class DraftLayout:
    """Where each verified sequence's rows are: ``num_drafts[i] + 1`` consecutive rows each."""

    num_drafts: list[int]

    @property
    def num_rows(self) -> int:
        return sum(self.num_drafts) + len(self.num_drafts)

    def row_index(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(entry of each row, position of the row inside its entry), (R,) int64 each."""
        counts = torch.tensor([k + 1 for k in self.num_drafts], dtype=torch.int64)
        entry = torch.repeat_interleave(torch.arange(len(self.num_drafts)), counts)  # (R,)
        start = torch.cumsum(counts, 0) - counts  # (N,)
        pos = torch.arange(int(counts.sum())) - start[entry]  # (R,)
        return entry.to(device), pos.to(device)


@dataclass(slots=True)
class VerifyResult:
    """Per row: the token emitted if the row is reached and its target logprob; per sequence: how
    many drafts were accepted (rows ``0 .. accepted[i]`` of sequence ``i`` are its new tokens)."""

    token_ids: torch.Tensor  # (R,) int64
    logprobs: torch.Tensor  # (R,) float32
    accepted: torch.Tensor  # (N,) int64, in [0, num_drafts[i]]


def salted_uniforms(seeds: Sequence[int], steps: Sequence[int], salt: int) -> list[float]:
    """Uniform draws from the stream ``salt`` of each (seed, step): independent of the plain draw."""
    return uniform_draws([mix_seed(int(s), salt) for s in seeds], steps)


def sampling_logprobs(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution each row is drawn from and the logprobs reported for it, (R, V) float32 each.

    Sampled rows: both are the log of the banned, tempered, filtered and renormalised
    probabilities (the sampler's semantics). Greedy rows: the draw is the point mass on the argmax
    of the masked logits, the report is their temperature-1 log-softmax.
    """
    masked = _apply_banned(logits.float(), batch.banned_token_ids)  # (R, V)
    greedy = batch.temperatures == 0  # (R,)
    temps = torch.where(greedy, torch.ones_like(batch.temperatures), batch.temperatures)  # (R,)
    report = torch.log_softmax(masked / temps.unsqueeze(1), dim=-1)  # (R, V)
    sample = report
    if batch.need_filter:
        # Filtered rows: the sampler's exact integer rules (sampling/filtered.py), renormalised.
        rows = filtered_rows(batch).unsqueeze(1)  # (R, 1)
        sample = torch.where(rows, filtered_logprobs(masked, batch), report)
        report = torch.where(greedy.unsqueeze(1), report, sample)
    if bool(greedy.any()):
        point = torch.full_like(sample, float("-inf"))
        point.scatter_(1, masked.argmax(dim=-1, keepdim=True), 0.0)
        sample = torch.where(greedy.unsqueeze(1), point, sample)
    return sample, report


def accepted_counts(match: torch.Tensor, layout: DraftLayout) -> torch.Tensor:
    """Per sequence, the number of leading rows whose draft was accepted; (N,) int64.

    ``match`` (R,) bool says per row whether its draft was accepted; the bonus rows' entries are
    ignored. The count stops at the first rejection.
    """
    entry, pos = layout.row_index(match.device)
    k = torch.tensor(layout.num_drafts, dtype=torch.int64, device=match.device)  # (N,)
    stop = (~match) | (pos == k[entry])  # (R,) the bonus row always stops
    first = torch.where(stop, pos, torch.full_like(pos, 1 << 30))  # (R,)
    out = torch.full((len(layout.num_drafts),), 1 << 30, dtype=torch.int64, device=match.device)
    return out.scatter_reduce_(0, entry, first, reduce="amin")


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised distribution drawn from after a rejection: the positive part of ``p - q``.

    Where it is all zero (``p == q``) a rejection has probability zero; ``p`` stands in so the
    draw stays defined.
    """
    r = (p - q).clamp_(min=0.0)  # (R, V)
    empty = r.sum(dim=-1, keepdim=True) <= 0  # (R, 1)
    return torch.where(empty, p, r)


def _accept(p_d: torch.Tensor, q_d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept with probability ``min(1, p(d) / q(d))``: ``u * q(d) < p(d)`` (no division by zero)."""
    return u * q_d < p_d


def rejection_sample(
    logits: torch.Tensor,  # (R, V) target logits, rows laid out by ``layout``
    batch: SamplingBatch,  # (R rows) each row's sampling parameters and plain draw
    drafts: torch.Tensor,  # (R,) int64: the draft each row verifies (anything on bonus rows)
    draft_probs: torch.Tensor | None,  # (R, V) the q each draft was drawn from; None: point masses
    accept_uniforms: torch.Tensor,  # (R,) float64
    residual_uniforms: torch.Tensor,  # (R,) float64
    layout: DraftLayout,
) -> VerifyResult:
    """The standard rule for drafts drawn from ``draft_probs`` (point masses when None)."""
    sample_logp, report_logp = sampling_logprobs(logits, batch)  # (R, V) each
    entry, pos = layout.row_index(logits.device)
    k = torch.tensor(layout.num_drafts, dtype=torch.int64, device=logits.device)
    bonus = pos == k[entry]  # (R,)
    safe = torch.where(bonus, torch.zeros_like(drafts), drafts).unsqueeze(1)  # (R, 1)
    p = sample_logp.exp()  # (R, V)
    if draft_probs is None:
        q = torch.zeros_like(p).scatter_(1, safe, 1.0)
    else:
        q = draft_probs.float()
    accept = _accept(p.gather(1, safe).squeeze(1), q.gather(1, safe).squeeze(1), accept_uniforms)  # (R,)
    accept &= ~bonus
    resampled = _inverse_cdf(_residual(p, q).log(), residual_uniforms)  # (R,)
    plain = _inverse_cdf(sample_logp, batch.uniforms)  # (R,) the bonus rows' draw
    tokens = torch.where(bonus, plain, torch.where(accept, safe.squeeze(1), resampled))  # (R,)
    logprobs = report_logp.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (R,)
    return VerifyResult(tokens, logprobs, accepted_counts(accept, layout))
