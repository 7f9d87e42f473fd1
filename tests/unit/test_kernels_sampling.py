"""The fused sampling kernel against the sampler's torch formulation, on random inputs.

Without CUDA the kernels run in Triton's interpreter. Tokens must be identical: for plain rows the
two differ only in float rounding, which moves a token only when a row's draw falls within about
1e-7 of a bin edge; for filtered rows every sum is exact and the values summed are the same (on CPU
up to numpy's exp against torch's, which differ in the last bit now and then: a knife edge that
random inputs do not meet; tests/gpu checks the bit-exact case). Logprobs agree to float32 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
pytest.importorskip("triton")

from kernels.sampling import sample_rows, sample_rows_filtered  # noqa: E402
from rollout.layers import fused_ops  # noqa: E402
from rollout.sampling.sampler import Sampler  # noqa: E402
from rollout.sampling.sampling_batch import SamplingBatch  # noqa: E402
from rollout.types import SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEMPS = [0.0, 0.05, 0.6, 1.0, 1.7]


def reference(logits: torch.Tensor, batch: SamplingBatch, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path of the sampler (fused kernels off)."""
    with monkeypatch.context() as m:
        m.setattr(fused_ops, "MODE", "0")
        out = Sampler().sample(logits, batch, return_logprob=True, return_raw_logprob=False, top_logprobs_num=0)
    return out.token_ids, out.logprobs


def make_batch(rows: int, seed: int, banned=None, temps=None) -> SamplingBatch:
    temps = temps or [TEMPS[i % len(TEMPS)] for i in range(rows)]
    params = [SamplingParams(temperature=t) for t in temps]
    return SamplingBatch.build(params, [seed + i for i in range(rows)], [7] * rows, banned, DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab, block, chunks", [(3000, 512, 1), (3000, 256, 3), (3000, None, None), (700, 64, 5)])
def test_matches_the_torch_sampler(dtype, vocab, block, chunks, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(vocab + (block or 0))
    rows = 40
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    batch = make_batch(rows, seed=vocab)
    tokens, logprobs = sample_rows(logits, batch.temperatures, batch.uniforms, block=block, chunks=chunks)
    want_tokens, want_logprobs = reference(logits, batch, monkeypatch)
    assert torch.equal(tokens.cpu(), want_tokens.cpu())
    torch.testing.assert_close(logprobs.cpu(), want_logprobs.cpu(), rtol=1e-5, atol=1e-4)


def test_banned_ids_and_blocks_of_minus_infinity(monkeypatch) -> None:
    """Banned ids (the row's argmax among them) are never drawn; whole blocks of -inf are harmless."""
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 20, 1000
    logits = torch.randn(rows, vocab, generator=gen)
    logits[:, :256] = float("-inf")  # the first four 64-id blocks hold no mass at all
    logits[:, 900:] = float("-inf")  # nor does the tail
    top = logits.argmax(dim=-1)
    logits[torch.arange(rows), top] += 10.0  # one very likely token per row...
    banned = [[int(top[i]), 300 + i] for i in range(rows)]  # ...which is banned
    logits = logits.to(DEVICE)
    batch = make_batch(rows, seed=3, banned=banned)
    want_tokens, want_logprobs = reference(logits, batch, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(fused_ops, "MODE", "all")  # through the sampler: it applies the ban before the kernel
        out = Sampler().sample(logits, batch, return_logprob=True, return_raw_logprob=False, top_logprobs_num=0)
    assert torch.equal(out.token_ids.cpu(), want_tokens.cpu())
    torch.testing.assert_close(out.logprobs.cpu(), want_logprobs.cpu(), rtol=1e-5, atol=1e-4)
    tokens = out.token_ids.cpu()
    assert all(256 <= int(t) < 900 and int(t) not in banned[i] for i, t in enumerate(tokens))
    # Four chunks of 256 ids: the first holds -inf only.
    masked = logits.clone()
    for i, ids in enumerate(banned):
        masked[i, ids] = float("-inf")
    direct, direct_logprobs = sample_rows(masked, batch.temperatures, batch.uniforms, block=64, chunks=4)
    assert torch.equal(direct.cpu(), tokens)
    torch.testing.assert_close(direct_logprobs.cpu(), want_logprobs.cpu(), rtol=1e-5, atol=1e-4)


def test_draws_follow_the_cumulative_distribution() -> None:
    """Evenly spread uniforms land in each token's bin in proportion to its probability, zero-probability
    tokens (also at the very end of the vocabulary) are never drawn, and u -> 1 gives the last likely token."""
    probs = torch.tensor([0.1, 0.0, 0.25, 0.05, 0.3, 0.3, 0.0, 0.0])
    n = 2000 if DEVICE == "cuda" else 200  # the interpreter runs one program at a time
    logits = probs.log().expand(n, -1).contiguous().to(DEVICE)
    temps = torch.ones(n, device=DEVICE)
    uniforms = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).to(DEVICE)
    uniforms[-1] = 1.0 - 2.0**-53
    tokens, logprobs = sample_rows(logits, temps, uniforms, block=2, chunks=3)
    counts = torch.bincount(tokens.cpu(), minlength=len(probs))
    assert counts[1] == counts[6] == counts[7] == 0
    assert (counts.double() - probs.double() * n).abs().max() <= 1
    assert int(tokens[-1]) == 5 and int(tokens[0]) == 0
    torch.testing.assert_close(logprobs.cpu(), probs.log()[tokens.cpu()], rtol=1e-6, atol=1e-6)


def test_greedy_rows_take_the_first_maximum_and_report_the_model_logprob() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    tokens, logprobs = sample_rows(logits, torch.zeros(2, device=DEVICE),
                                   torch.full((2,), 0.99, dtype=torch.float64, device=DEVICE), block=2, chunks=2)
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logprobs.cpu(), torch.log_softmax(logits.cpu(), dim=-1)[[0, 1], [1, 0]])


def filtered_batch(params: list[SamplingParams], seed: int, banned=None) -> SamplingBatch:
    return SamplingBatch.build(params, [seed * 1000 + i for i in range(len(params))], [seed] * len(params), banned,
                               DEVICE)


FILTER_MIX = [
    SamplingParams(temperature=1.0, top_k=5), SamplingParams(top_p=0.8), SamplingParams(min_p=0.1),
    SamplingParams(temperature=0.0, top_k=3), SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=4, top_p=0.5, min_p=0.05), SamplingParams(top_p=1e-46),
    SamplingParams(top_k=1, temperature=2.0), SamplingParams(min_p=1.0), SamplingParams(top_p=0.999),
]


@pytest.mark.parametrize("dtype, vocab, block, chunks", [
    (torch.float32, 600, 64, 3), (torch.bfloat16, 600, None, None), (torch.float32, 333, 16, 1),
])
def test_filtered_kernel_matches_the_torch_sampler(dtype, vocab, block, chunks, monkeypatch) -> None:
    """Filtered rows (every filter, alone and together), greedy and plain rows in one batch."""
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(len(FILTER_MIX), vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    batch = filtered_batch(FILTER_MIX, seed=vocab)
    tokens, logprobs = sample_rows_filtered(logits, batch.temperatures, batch.top_ks, batch.top_ps, batch.min_ps,
                                            batch.uniforms, block=block, chunks=chunks)
    want_tokens, want_logprobs = reference(logits, batch, monkeypatch)
    assert torch.equal(tokens.cpu(), want_tokens.cpu())
    torch.testing.assert_close(logprobs.cpu(), want_logprobs.cpu(), rtol=1e-5, atol=1e-5)


def test_filtered_kernel_ties_signed_zeros_and_bans(monkeypatch) -> None:
    """Ties at the top-k and top-p boundaries (straddling chunks), -0.0 beside +0.0 (equal values: a
    tie), banned ids applied by the sampler before the kernel."""
    rows, vocab = 8, 300
    logits = torch.zeros(rows, vocab)
    logits[:, ::2] = -0.0
    logits[:, 100:140] = 2.0  # 40 tied best tokens over a chunk edge (chunks of 64 ids)
    logits[:, 250:] = float("-inf")
    params = [SamplingParams(top_k=k, top_p=p) for k, p in
              zip([1, 3, 39, 40, 41, 200, 0, 0], [1.0, 1.0, 0.5, 1.0, 0.3, 0.99, 0.6, 1e-9])]
    banned = [[100 + i] for i in range(rows)]
    batch = filtered_batch(params, seed=2, banned=banned)
    want_tokens, want_logprobs = reference(logits.to(DEVICE), batch, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(fused_ops, "MODE", "all")  # through the sampler: bans, then the filtered kernel
        out = Sampler().sample(logits.to(DEVICE), batch, return_logprob=True, return_raw_logprob=False,
                               top_logprobs_num=0)
    assert torch.equal(out.token_ids.cpu(), want_tokens.cpu())
    torch.testing.assert_close(out.logprobs.cpu(), want_logprobs.cpu(), rtol=1e-5, atol=1e-5)
    tokens = want_tokens.cpu().tolist()
    assert tokens[0] == 101 and tokens[7] == 100  # the first best id left after the row's ban
    assert all(100 <= t < 140 and t != 100 + i for i, t in enumerate(tokens[:4]))
    # Kept ties of the boundary value come before better tokens in vocab order, in the same chunk:
    # the ties left out (ids 3.. here) must not count in the running sum.
    row = torch.full((vocab,), -2.0)
    row[:20], row[20:25] = 2.5, 3.0
    tb = filtered_batch([SamplingParams(top_k=8)] * 12 + [SamplingParams(top_k=8, top_p=0.97)] * 4, seed=3)
    got, got_lp = sample_rows_filtered(row.expand(16, -1).contiguous().to(DEVICE), tb.temperatures, tb.top_ks,
                                       tb.top_ps, tb.min_ps, tb.uniforms, block=64, chunks=2)
    want, want_lp = reference(row.expand(16, -1).contiguous().to(DEVICE), tb, monkeypatch)
    assert torch.equal(got.cpu(), want.cpu()) and set(want.cpu().tolist()) <= {0, 1, 2, 20, 21, 22, 23, 24}
    torch.testing.assert_close(got_lp.cpu(), want_lp.cpu(), rtol=1e-5, atol=1e-5)
    # Zeros of both signs tie: a row whose best values are 0.0 and -0.0 keeps them in id order.
    zeros = torch.full((2, 8), -1.0)
    zeros[:, 2], zeros[:, 3], zeros[:, 5] = -0.0, 0.0, -0.0
    zb = filtered_batch([SamplingParams(top_k=2)] * 2, seed=4)
    got, _ = sample_rows_filtered(zeros.to(DEVICE), zb.temperatures, zb.top_ks, zb.top_ps, zb.min_ps, zb.uniforms,
                                  block=4, chunks=2)
    assert set(got.cpu().tolist()) <= {2, 3} and torch.equal(got.cpu(), reference(zeros.to(DEVICE), zb,
                                                                                    monkeypatch)[0].cpu())


def test_chunk_rules_of_the_plain_and_filtered_kernels() -> None:
    """Plain sampling cuts rows into one-block chunks until that gives more than PROGRAMS_PER_SM
    programs per SM, then two-block chunks; the filtered kernels keep few, long chunks (their
    programs merge every chunk's histogram)."""
    from kernels.sampling.inverse_cdf import (
        FILTERED_PROGRAMS_PER_SM,
        PROGRAMS_PER_SM,
        _sm_count,
        filtered_num_chunks,
        num_chunks,
    )

    cpu, vocab, block = torch.device("cpu"), 151936, 1024
    blocks = -(-vocab // block)  # 149
    most = PROGRAMS_PER_SM * _sm_count(cpu) // blocks  # rows that still get one-block chunks
    assert num_chunks(1, vocab, cpu, block) == blocks
    assert num_chunks(most, vocab, cpu, block) == blocks
    assert num_chunks(most + 1, vocab, cpu, block) == -(-blocks // 2)
    assert num_chunks(1, 500, cpu, block) == 1
    assert filtered_num_chunks(1, vocab, cpu, block) == FILTERED_PROGRAMS_PER_SM * _sm_count(cpu)
    assert filtered_num_chunks(10_000, vocab, cpu, block) == 1
