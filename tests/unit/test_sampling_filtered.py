"""The exact rules of filtered sampling (rollout/sampling/filtered.py): integer weights, boundaries
decided without rounding, ties to the lower id, and what the weights leave out."""

from __future__ import annotations

import math

import torch

from rollout.sampling.filtered import WEIGHT_SCALE, filtered_rows, sample_filtered, token_weights
from rollout.sampling.sampling_batch import SamplingBatch
from rollout.types import SamplingParams


def draw_all(logits: list[float], params: SamplingParams, n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and logprobs of one row under ``n`` evenly spread uniforms (every bin gets hit)."""
    x = torch.tensor([logits] * n)
    batch = SamplingBatch.build([params] * n, [0] * n, [0] * n, None, "cpu")
    batch.uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return sample_filtered(x, batch)


def test_top_p_boundary_is_exact() -> None:
    """Four equal tokens: top_p = 0.5 stops where the mass before reaches exactly half (2 kept), a
    hair more keeps a third. Float cumulative sums could land on either side; integers cannot."""
    tokens, logprobs = draw_all([0.0, 0.0, 0.0, 0.0], SamplingParams(top_p=0.5))
    assert set(tokens.tolist()) == {0, 1}
    assert torch.all(logprobs == math.log(0.5))
    tokens, _ = draw_all([0.0, 0.0, 0.0, 0.0], SamplingParams(top_p=0.5000001))
    assert set(tokens.tolist()) == {0, 1, 2}


def test_draws_follow_the_kept_weights_exactly() -> None:
    """Each kept token is drawn for a share of the uniforms equal to its weight's share."""
    logits = [1.0, 3.0, 2.0, -1.0, 0.5]
    n = 20_000
    tokens, logprobs = draw_all(logits, SamplingParams(top_k=3, temperature=0.9), n)
    _, _, w = token_weights(torch.tensor([logits]), torch.tensor([0.9]))
    kept = torch.tensor([1, 1, 1, 0, 0]).bool()
    share = torch.where(kept, w[0], 0).double() / torch.where(kept, w[0], 0).sum()
    counts = torch.bincount(tokens, minlength=5).double()
    assert torch.all((counts - share * n).abs() <= 1)
    torch.testing.assert_close(logprobs, share.log()[tokens].float())


def test_ties_go_to_the_lower_id_and_signed_zeros_tie() -> None:
    tokens, _ = draw_all([-1.0, -0.0, 0.0, -0.0, 0.0], SamplingParams(top_k=2), n=200)
    assert set(tokens.tolist()) == {1, 2}
    tokens, _ = draw_all([2.0, 5.0, 5.0, 5.0], SamplingParams(min_p=1.0), n=300)
    assert set(tokens.tolist()) == {1, 2, 3}  # min_p = 1 keeps every token tied with the best


def test_weights_and_what_they_leave_out() -> None:
    """The best token weighs 2^40; a token more than ~27.7 nats below it weighs 0 and is never drawn
    from a filtered row, even by a uniform just under 1."""
    y, e, w = token_weights(torch.tensor([[0.0, -27.0, -28.0, float("-inf")]]), torch.tensor([1.0]))
    assert w[0, 0] == int(WEIGHT_SCALE) and w[0, 1] > 0 and w[0, 2] == 0 and w[0, 3] == 0
    assert torch.equal(w, (e * WEIGHT_SCALE).floor().long())
    x = torch.tensor([[0.0, -28.0]] * 2)
    batch = SamplingBatch.build([SamplingParams(top_k=2)] * 2, [0, 0], [0, 0], None, "cpu")
    batch.uniforms = torch.tensor([0.5, 1.0 - 2.0**-53], dtype=torch.float64)
    tokens, logprobs = sample_filtered(x, batch)
    assert tokens.tolist() == [0, 0] and torch.all(logprobs == 0)


def test_which_rows_are_filtered() -> None:
    params = [SamplingParams(), SamplingParams(top_k=3, temperature=0.0), SamplingParams(top_k=3),
              SamplingParams(top_p=0.9), SamplingParams(min_p=0.1), SamplingParams(top_k=-1, top_p=1.0)]
    batch = SamplingBatch.build(params, [0] * 6, [0] * 6, None, "cpu")
    assert filtered_rows(batch).tolist() == [False, False, True, True, True, False]


def test_large_top_p_only_batches_take_the_torch_path() -> None:
    """Top-p alone on more than 32 rows samples on the torch path (faster there on the H200); any
    top-k or min-p row, or a small batch, keeps the fused kernel."""
    from rollout.sampling.sampler import FUSED_TOP_P_MAX_ROWS, prefers_torch_filtering
    from rollout.sampling.sampling_batch import SamplingBatch
    from rollout.types import SamplingParams

    def batch(rows: int, **extra) -> SamplingBatch:
        params = [SamplingParams(temperature=1.0, top_p=0.9)] * (rows - 1) + [SamplingParams(temperature=0.0, **extra)]
        return SamplingBatch.build(params, [0] * rows, [0] * rows, None, "cpu")

    big = FUSED_TOP_P_MAX_ROWS + 1
    assert prefers_torch_filtering(batch(big))
    assert not prefers_torch_filtering(batch(FUSED_TOP_P_MAX_ROWS))
    mixed = SamplingBatch.build([SamplingParams(temperature=1.0, top_p=0.9)] * (big - 1)
                                + [SamplingParams(temperature=1.0, top_k=5)], [0] * big, [0] * big, None, "cpu")
    assert not prefers_torch_filtering(mixed)
    plain = SamplingBatch.build([SamplingParams(temperature=1.0)] * big, [0] * big, [0] * big, None, "cpu")
    assert not prefers_torch_filtering(plain)
    assert prefers_torch_filtering(batch(big).select(list(range(big))))
