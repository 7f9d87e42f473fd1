"""The fused top-k / top-p / min-p kernel against the torch reference on a GPU: same tokens, always.

The two agree by construction only if the device computes the same ``exp`` in both (checked first,
over every float32 the kernel can meet) and the integer sums are exact; then every token must be
equal, on realistic vocabularies, many seeds and the edge cases (tiny top_p, top_k = 1, min_p near
1, ties in bf16 logits, nearly flat rows where top-p boundaries sit between tiny weights).
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels.sampling import filtered as kf  # noqa: E402
from kernels.sampling import sample_rows_filtered  # noqa: E402
from rollout.layers import fused_ops  # noqa: E402
from rollout.sampling.filtered import filtered_rows  # noqa: E402
from rollout.sampling.sampler import Sampler  # noqa: E402
from rollout.sampling.sampling_batch import SamplingBatch  # noqa: E402
from rollout.types import SamplingParams  # noqa: E402

DEVICE = "cuda"
VOCAB = 151936  # Qwen3's


@triton.jit
def _exp_probe(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, kf._exp(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def test_kernel_exp_is_torch_exp_bit_for_bit() -> None:
    """Every float32 in [-104, 0] (exp underflows to 0 below): the kernel's e is torch's e."""
    lo, hi, step = 0x80000000, 0xC2D00000, 1 << 27
    for start in range(lo, hi + 1, step):
        bits = torch.arange(start, min(start + step, hi + 1), dtype=torch.int64, device=DEVICE).to(torch.int32)
        x = bits.view(torch.float32)
        out = torch.empty_like(x)
        _exp_probe[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
        bad = (out.view(torch.int32) != torch.exp(x).view(torch.int32)).nonzero()
        assert bad.numel() == 0, f"exp differs at {x[bad[:5, 0]].tolist()}"


def reference(logits: torch.Tensor, batch: SamplingBatch, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    with monkeypatch.context() as m:
        m.setattr(fused_ops, "MODE", "0")
        out = Sampler().sample(logits, batch, return_logprob=True, return_raw_logprob=False, top_logprobs_num=0)
    return out.token_ids, out.logprobs


def fused(logits: torch.Tensor, batch: SamplingBatch, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_rows_filtered(logits, batch.temperatures, batch.top_ks, batch.top_ps, batch.min_ps,
                                batch.uniforms, **kw)


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    kw: dict = {"temperature": rng.choice([0.0, 0.3, 0.7, 1.0, 1.0, 1.3])}
    if rng.random() < 0.6:
        kw["top_k"] = rng.choice([1, 2, 5, 20, 50, 1000, vocab, vocab + 7])
    if rng.random() < 0.6:
        kw["top_p"] = rng.choice([1e-46, 1e-9, 0.05, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0])
    if rng.random() < 0.4:
        kw["min_p"] = rng.choice([0.0, 1e-4, 0.05, 0.3, 0.999, 1.0])
    return SamplingParams(**kw)


def logits_of(kind: str, rows: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "peaked":  # a trained model's shape: a few likely tokens, a long tail
        x = torch.randn(rows, vocab, device=DEVICE, generator=gen) * 2.5
        x[:, :50] += 6 * torch.rand(rows, 50, device=DEVICE, generator=gen)
        return x.to(torch.bfloat16)
    if kind == "flat":  # a random-weight model's: ~1/V each, top-p boundaries between tiny weights
        return (torch.randn(rows, vocab, device=DEVICE, generator=gen) * 0.05).float()
    if kind == "ties":  # bf16 with few distinct values: ties at every boundary
        return torch.randint(-4, 4, (rows, vocab), device=DEVICE, generator=gen).to(torch.bfloat16)
    return torch.randn(rows, vocab, device=DEVICE, generator=gen).float()  # "normal"


@pytest.mark.parametrize("rows", [1, 7, 64, 256])
@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "normal"])
def test_same_tokens_as_the_reference(rows, kind, monkeypatch) -> None:
    rng = random.Random(rows * 31 + len(kind))
    gen = torch.Generator(device=DEVICE).manual_seed(rows)
    for rep in range(3):
        logits = logits_of(kind, rows, VOCAB, gen)
        params = [random_params(rng, VOCAB) for _ in range(rows)]
        params[0] = SamplingParams(temperature=1.0, top_p=0.9)  # at least one filtered row
        seeds = [rng.randrange(1 << 40) for _ in range(rows)]
        batch = SamplingBatch.build(params, seeds, [rep] * rows, None, DEVICE)
        tokens, logprobs = fused(logits, batch)
        want_tokens, want_logprobs = reference(logits, batch, monkeypatch)
        # The filtered rows are this kernel's: token for token. Rows without a filter go to the
        # unfiltered kernel, whose float CDF may land one bin off the reference's at a bin edge
        # (tests/unit/test_kernels_sampling.py holds it to its own standard).
        filtered = filtered_rows(batch)
        diff = ((tokens != want_tokens) & filtered).nonzero().flatten().tolist()
        assert not diff, [(i, params[i], int(tokens[i]), int(want_tokens[i])) for i in diff[:5]]
        # log(w / W) rounds to float32 in both; the H200 run saw differences up to 1.7e-6.
        torch.testing.assert_close(logprobs[filtered], want_logprobs[filtered], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [
    {"top_p": 1e-46}, {"top_p": 1e-9}, {"top_k": 1}, {"min_p": 1.0}, {"min_p": 0.999},
    {"min_p": 0.999999}, {"top_k": 1, "temperature": 3.0}, {"top_p": 0.5, "min_p": 0.5, "top_k": 2},
])
@pytest.mark.parametrize("kind", ["peaked", "ties", "normal"])
def test_edge_parameters(kw, kind, monkeypatch) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    rows = 128
    logits = logits_of(kind, rows, VOCAB, gen)
    batch = SamplingBatch.build([SamplingParams(**kw)] * rows, list(range(rows)), [1] * rows, None, DEVICE)
    tokens, logprobs = fused(logits, batch)
    want_tokens, want_logprobs = reference(logits, batch, monkeypatch)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
    if kw in ({"top_p": 1e-46}, {"top_p": 1e-9}, {"top_k": 1}, {"top_k": 1, "temperature": 3.0}):
        # The argmax (first of equal maxima), with probability 1.
        assert torch.equal(tokens, logits.float().argmax(dim=-1))
        assert torch.all(logprobs == 0)


def test_many_seeds_one_row(monkeypatch) -> None:
    """One flat row drawn under 2048 seeds: every draw equal, across the whole kept set."""
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    row = (torch.randn(1, VOCAB, device=DEVICE, generator=gen) * 0.05)
    logits = row.expand(2048, -1).contiguous()
    for kw in ({"top_p": 0.9}, {"top_k": 40000, "top_p": 0.95}, {"min_p": 0.8}):
        batch = SamplingBatch.build([SamplingParams(**kw)] * 2048, list(range(2048)), [0] * 2048, None, DEVICE)
        tokens, _ = fused(logits, batch)
        want, _ = reference(logits, batch, monkeypatch)
        assert torch.equal(tokens, want)
        assert tokens.unique().numel() > 1500  # a wide kept set, really sampled


def test_ties_negative_zero_banned_and_chunking(monkeypatch) -> None:
    """Ties across chunk edges, -0.0 beside +0.0, banned ids through the sampler, any chunk count."""
    rows, vocab = 32, 5000
    logits = torch.zeros(rows, vocab, device=DEVICE)
    logits[:, ::2] = -0.0
    logits[:, 1000:1100] = 1.0  # 100 tied best tokens straddling chunk edges
    logits[:, 4000:] = float("-inf")
    banned = [[1000 + i, 1001 + i] for i in range(rows)]
    params = [SamplingParams(top_k=k, top_p=p) for k, p in zip([1, 3, 50, 99, 100, 101, 3000, 0] * 4,
                                                                 [1.0, 0.5, 0.9, 0.05] * 8)]
    batch = SamplingBatch.build(params, list(range(rows)), [0] * rows, banned, DEVICE)
    want, want_lp = reference(logits, batch, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(fused_ops, "MODE", "1")
        out = Sampler().sample(logits, batch, return_logprob=True, return_raw_logprob=False, top_logprobs_num=0)
    assert torch.equal(out.token_ids, want)
    torch.testing.assert_close(out.logprobs, want_lp, rtol=1e-6, atol=1e-6)
    masked = logits.clone()
    for i, ids in enumerate(banned):
        masked[i, ids] = float("-inf")
    for block, chunks in ((64, 1), (64, 7), (256, 3), (None, None)):
        tokens, _ = fused(masked, batch, block=block, chunks=chunks)
        assert torch.equal(tokens, want), (block, chunks)
    assert all(int(t) not in banned[i] and int(t) < 4000 for i, t in enumerate(want.tolist()))
