"""The exact rejection rule of speculative decoding, in isolation: emitted tokens follow the target.

Chi-square tests over many seeded sequences on an 8-token vocabulary: the first emitted token must
follow ``p_0`` (the target's distribution after temperature / top-k / top-p / min-p), and the token
emitted from row 1, among sequences that accepted their first draft, must follow ``p_1``. The same
tests run against two biased rules (patched in) and must fail them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from rollout.sampling import rejection
from rollout.sampling.rejection import (
    ACCEPT_SALT,
    RESIDUAL_SALT,
    DraftLayout,
    accepted_counts,
    rejection_sample,
    salted_uniforms,
    sampling_logprobs,
)
from rollout.sampling.sampler import Sampler
from rollout.sampling.sampling_batch import SamplingBatch
from rollout.types import SamplingParams

V = 8
K = 2
N = 20_000
GEN = torch.Generator().manual_seed(0)
TARGET = torch.randn(K + 1, V, generator=GEN) * 1.5  # (K+1, V): row j's target logits
DRAFT_Q = torch.softmax(torch.randn(K, V, generator=GEN) * 1.5, dim=-1)  # (K, V) the drafter's q

PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7_topk4": SamplingParams(temperature=0.7, top_k=4),
    "topp0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "minp0.1": SamplingParams(temperature=1.3, min_p=0.1),
}


def _batch(sp: SamplingParams) -> SamplingBatch:
    params = [sp] * (N * (K + 1))
    seeds = [i for i in range(N) for _ in range(K + 1)]
    steps = [j for _ in range(N) for j in range(K + 1)]
    return SamplingBatch.build(params, seeds, steps, None, "cpu")


def _target_probs(sp: SamplingParams) -> np.ndarray:
    batch = SamplingBatch.build([sp] * (K + 1), [0] * (K + 1), [0] * (K + 1), None, "cpu")
    sample_logp, _ = sampling_logprobs(TARGET, batch)
    return sample_logp.exp().double().numpy()  # (K+1, V)


def _run(sp: SamplingParams, point_mass: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (N, K+1) and accepted counts (N,) of N seeded verifications."""
    layout = DraftLayout([K] * N)
    q = DRAFT_Q if not point_mass else torch.softmax(torch.randn(K, V, generator=GEN), dim=-1)
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=GEN) for j in range(K)], 1)
    drafts = torch.cat([drafts, torch.zeros(N, 1, dtype=torch.int64)], 1)  # (N, K+1) bonus column unused
    logits = TARGET.repeat(N, 1)  # (N*(K+1), V)
    batch = _batch(sp)
    seeds = [i for i in range(N) for _ in range(K + 1)]
    steps = [j for _ in range(N) for j in range(K + 1)]
    u_acc = torch.tensor(salted_uniforms(seeds, steps, ACCEPT_SALT), dtype=torch.float64)
    u_res = torch.tensor(salted_uniforms(seeds, steps, RESIDUAL_SALT), dtype=torch.float64)
    probs = None if point_mass else torch.cat([DRAFT_Q, torch.full((1, V), 1.0 / V)]).repeat(N, 1)
    res = rejection_sample(logits, batch, drafts.reshape(-1), probs, u_acc, u_res, layout)
    return res.token_ids.reshape(N, K + 1).numpy(), res.accepted.numpy()


def _pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=V)
    support = probs > 0
    assert counts[~support].sum() == 0, f"tokens outside the support drawn: {counts}"
    expected = probs[support] / probs[support].sum() * len(tokens)
    return float(chisquare(counts[support], expected).pvalue)


def _check_rows(tokens: np.ndarray, accepted: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    first = _pvalue(tokens[:, 0], p[0])
    second = _pvalue(tokens[accepted >= 1, 1], p[1])
    return first, second


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("point_mass", [False, True], ids=["q", "point"])
def test_emitted_tokens_follow_the_target(name: str, point_mass: bool) -> None:
    sp = PARAMS[name]
    tokens, accepted = _run(sp, point_mass)
    first, second = _check_rows(tokens, accepted, _target_probs(sp))
    assert first > 1e-3 and second > 1e-3, (first, second)
    assert 0 < (accepted >= 1).mean() < 1  # both paths of the rule were exercised


def _biased_residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p  # resample from the target itself: over-weights what the drafter already proposed


def _biased_accept(p_d: torch.Tensor, q_d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return u < p_d  # accept with p(d), ignoring q


@pytest.mark.parametrize("patch", [("_residual", _biased_residual), ("_accept", _biased_accept)],
                         ids=["resample-from-p", "accept-with-p"])
def test_biased_rules_fail(monkeypatch: pytest.MonkeyPatch, patch) -> None:
    monkeypatch.setattr(rejection, *patch)
    sp = PARAMS["t1"]
    tokens, accepted = _run(sp, point_mass=False)
    first, _ = _check_rows(tokens, accepted, _target_probs(sp))
    assert first < 1e-6


def test_greedy_rows_accept_only_the_argmax() -> None:
    sp = SamplingParams(temperature=0.0)
    tokens, accepted = _run(sp, point_mass=False)
    best = TARGET.argmax(-1).numpy()
    assert (tokens[:, 0] == best[0]).all()
    assert (tokens[accepted >= 1, 1] == best[1]).all()
    assert (accepted >= 1).any() and (accepted == 0).any()


def test_sampler_draws_with_point_drafts_follow_the_target() -> None:
    """The form used for deterministic drafts: the sampler's own draw, accepted iff it equals the
    draft. It emits what plain sampling emits, so it is checked against the generic rule's counts."""
    sp = PARAMS["topp0.8"]
    batch = _batch(sp)
    out = Sampler().sample(TARGET.repeat(N, 1), batch, return_logprob=True, return_raw_logprob=False,
                           top_logprobs_num=0)
    tokens = out.token_ids.reshape(N, K + 1)
    drafts = torch.randint(0, V, (N, K + 1), generator=GEN)
    drafts[:, 0] = tokens[:, 0]  # every first draft right: row 1 is always reached
    accepted = accepted_counts((tokens == drafts).reshape(-1), DraftLayout([K] * N))
    assert (accepted >= 1).all()
    first, second = _check_rows(tokens.numpy(), accepted.numpy(), _target_probs(sp))
    assert first > 1e-3 and second > 1e-3


def test_accepted_counts_stop_at_the_first_rejection() -> None:
    layout = DraftLayout([2, 3, 0, 1])
    match = torch.tensor([1, 1, 1,  1, 0, 1, 1,  1,  0, 1], dtype=torch.bool)
    assert accepted_counts(match, layout).tolist() == [2, 1, 0, 0]


def test_logprobs_are_the_targets() -> None:
    sp = SamplingParams(temperature=0.7, top_k=4)
    batch = SamplingBatch.build([sp] * 3, [1, 1, 1], [0, 1, 2], None, "cpu")
    res = rejection_sample(TARGET, batch, torch.tensor([0, 1, 0]), DRAFT_Q.repeat(2, 1)[:3],
                           torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                           DraftLayout([2]))
    plain = Sampler().sample(TARGET, batch, return_logprob=True, return_raw_logprob=False, top_logprobs_num=0)
    sample_logp, _ = sampling_logprobs(TARGET, batch)
    want = sample_logp.gather(1, res.token_ids.unsqueeze(1)).squeeze(1)
    assert torch.allclose(res.logprobs, want)
    # For the plain draw of the same rows the sampler reports the same function of the token.
    assert torch.allclose(plain.logprobs, sample_logp.gather(1, plain.token_ids.unsqueeze(1)).squeeze(1))
