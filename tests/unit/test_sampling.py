"""Batched sampling: distributions, logprobs, greedy rows, banned ids, per-row reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from rollout.errors import InvalidArgumentError
from rollout.sampling.noise import mix_seed, uniform_draws
from rollout.sampling.sampler import Sampler
from rollout.sampling.sampling_batch import SamplingBatch
from rollout.types import SamplingParams

LOGITS = [0.5, 2.0, -1.0, 1.4, 0.0, 1.0, -0.3, -2.0]  # no ties, unsorted on purpose
V = len(LOGITS)
N_ROWS = 20_000


def expected_probs(
    logits: list[float],
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    min_p: float = 0.0,
    banned: tuple[int, ...] = (),
) -> np.ndarray:
    """The distribution the sampler must draw from, computed independently in float64."""
    x = [(-math.inf if i in banned else v / temperature) for i, v in enumerate(logits)]
    m = max(x)
    z = sum(math.exp(v - m) for v in x)
    p = [math.exp(v - m) / z for v in x]
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    kept = [0.0] * len(p)
    mass_before = 0.0
    for rank, i in enumerate(order):
        ok = (top_k <= 0 or rank < top_k) and mass_before < top_p and p[i] >= min_p * p[order[0]]
        if ok:
            kept[i] = p[i]
        mass_before += p[i]
    total = sum(kept)
    return np.array([q / total for q in kept])


def run(
    params: list[SamplingParams],
    logits: torch.Tensor,
    seeds: list[int],
    steps: list[int] | None = None,
    banned: list[list[int]] | None = None,
    top_logprobs_num: int = 0,
):
    batch = SamplingBatch.build(params, seeds, steps or [0] * len(params), banned, logits.device)
    return Sampler().sample(
        logits, batch, return_logprob=True, return_raw_logprob=True, top_logprobs_num=top_logprobs_num
    )


CASES = {
    "temperature": {"temperature": 0.7},
    "top_k": {"temperature": 1.0, "top_k": 3},
    "top_p": {"temperature": 1.0, "top_p": 0.85},
    "min_p": {"temperature": 1.3, "min_p": 0.2},
    "combo_top_p_binds": {"temperature": 1.3, "top_k": 5, "top_p": 0.8, "min_p": 0.1},
    "combo_min_p_binds": {"temperature": 1.3, "top_k": 6, "top_p": 0.97, "min_p": 0.3},
    "combo_top_k_binds": {"temperature": 0.9, "top_k": 2, "top_p": 0.95, "min_p": 0.01},
}


@pytest.mark.parametrize("name", list(CASES))
def test_distribution_and_logprobs(name: str) -> None:
    kw = CASES[name]
    logits = torch.tensor([LOGITS] * N_ROWS)  # (N, V)
    params = [SamplingParams(**kw)] * N_ROWS
    out = run(params, logits, seeds=list(range(1000, 1000 + N_ROWS)), top_logprobs_num=3)
    expected = expected_probs(LOGITS, **kw)

    tokens = out.token_ids.numpy()
    counts = np.bincount(tokens, minlength=V)
    support = expected > 0
    assert counts[~support].sum() == 0, f"filtered tokens were sampled: {counts}"
    assert support.sum() < V or name == "temperature"  # each filter case really filters something
    res = chisquare(counts[support], expected[support] * N_ROWS)
    assert res.pvalue > 1e-3, (counts, expected * N_ROWS)

    np.testing.assert_allclose(out.logprobs.numpy(), np.log(expected[tokens]), atol=1e-5)
    raw = torch.log_softmax(torch.tensor(LOGITS), dim=-1)
    np.testing.assert_allclose(out.raw_logprobs.numpy(), raw[out.token_ids].numpy(), atol=1e-6)
    top_vals, top_ids = torch.topk(raw, 3)
    assert torch.equal(out.top_ids, top_ids.expand(N_ROWS, 3))
    torch.testing.assert_close(out.top_logprobs, top_vals.expand(N_ROWS, 3))
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32


def test_banned_ids_are_part_of_the_sampled_distribution() -> None:
    n = 10_000
    logits = torch.tensor([LOGITS] * n)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * n
    out = run(params, logits, seeds=list(range(n)), banned=[[1, 5]] * n)
    expected = expected_probs(LOGITS, top_p=0.9, banned=(1, 5))
    counts = np.bincount(out.token_ids.numpy(), minlength=V)
    assert counts[1] == 0 and counts[5] == 0
    support = expected > 0
    assert counts[~support].sum() == 0
    assert chisquare(counts[support], expected[support] * n).pvalue > 1e-3
    np.testing.assert_allclose(out.logprobs.numpy(), np.log(expected[out.token_ids.numpy()]), atol=1e-5)
    # Raw logprobs ignore the ban: they are the model's own log-softmax.
    raw = torch.log_softmax(torch.tensor(LOGITS), dim=-1)
    torch.testing.assert_close(out.raw_logprobs, raw[out.token_ids])


def test_greedy_rows_mixed_with_sampling_rows() -> None:
    g = torch.Generator().manual_seed(0)
    b, v = 64, 50
    logits = torch.randn(b, v, generator=g) * 3  # (B, V)
    greedy = SamplingParams(temperature=0.0, top_k=5, top_p=0.5)  # filters must not touch greedy rows
    sampling = SamplingParams(temperature=1.0, top_k=10)
    params = [greedy if i % 2 == 0 else sampling for i in range(b)]
    argmax = logits.argmax(dim=-1)
    second = logits.topk(2, dim=-1).indices[:, 1]
    # Ban the argmax on every fourth row: its greedy token must be the runner-up.
    banned = [[int(argmax[i])] if i % 4 == 0 else [] for i in range(b)]
    out = run(params, logits, seeds=list(range(b)), banned=banned)

    lsm = torch.log_softmax(logits, dim=-1)  # (B, V)
    for i in range(b):
        if i % 2:
            continue
        want = int(second[i]) if i % 4 == 0 else int(argmax[i])
        assert int(out.token_ids[i]) == want
        masked = logits[i].clone()
        masked[banned[i]] = -math.inf
        torch.testing.assert_close(out.logprobs[i], torch.log_softmax(masked, dim=-1)[want])
        torch.testing.assert_close(out.raw_logprobs[i], lsm[i, want])
    assert torch.all(out.logprobs <= 0)
    # Sampling rows stay within their top 10.
    top10 = logits.topk(10, dim=-1).indices
    for i in range(1, b, 2):
        assert int(out.token_ids[i]) in top10[i].tolist()


def test_all_greedy_batch_with_banned_ids() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 30, generator=g)
    before = logits.clone()
    argmax = logits.argmax(dim=-1)
    banned = [[int(argmax[i]), 29, 10_000] for i in range(8)]  # ids past the vocabulary are ignored
    out = run([SamplingParams(temperature=0.0)] * 8, logits, seeds=[0] * 8, banned=banned)
    masked = logits.clone()
    for i, ids in enumerate(banned):
        masked[i, ids[:2]] = -math.inf
    torch.testing.assert_close(out.token_ids, masked.argmax(dim=-1))
    torch.testing.assert_close(
        out.logprobs, torch.log_softmax(masked, dim=-1).gather(1, out.token_ids[:, None])[:, 0]
    )
    assert torch.equal(logits, before), "the sampler modified the caller's logits in place"


def test_banned_ids_never_sampled_even_when_likely() -> None:
    n = 4000
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]] * n)
    out = run([SamplingParams(temperature=2.0)] * n, logits, seeds=list(range(n)), banned=[[0]] * n)
    assert not torch.any(out.token_ids == 0)
    assert set(out.token_ids.tolist()) == {1, 2, 3}


def test_a_row_with_every_id_banned_ignores_the_ban() -> None:
    # An unsatisfiable ban (request validation refuses one; this is the last line of defence) must not
    # turn the row into NaN: the row is sampled as if nothing were banned.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=g)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=0.0)]
    banned = [list(range(V)), list(range(V)) + [V + 3], list(reversed(range(V))), [1, 2]]
    out = run(params, logits, seeds=[0, 1, 2, 3], banned=banned)
    assert torch.isfinite(out.logprobs).all()
    lsm = torch.log_softmax(logits, dim=-1)
    assert int(out.token_ids[0]) == int(logits[0].argmax())
    torch.testing.assert_close(out.logprobs[0], lsm[0, out.token_ids[0]])
    torch.testing.assert_close(out.logprobs[1], lsm[1, out.token_ids[1]])
    masked = logits[3].clone()
    masked[[1, 2]] = -math.inf
    assert int(out.token_ids[3]) == int(masked.argmax())  # other rows keep their bans


def test_zero_probability_tokens_never_sampled() -> None:
    n = 4000
    logits = torch.tensor([[0.0, -math.inf, 0.0, -math.inf, -30.0]] * n)
    out = run([SamplingParams(temperature=5.0)] * n, logits, seeds=list(range(n)))
    assert set(out.token_ids.tolist()) <= {0, 2, 4}
    assert torch.isfinite(out.logprobs).all()


def test_same_seed_and_step_same_token_whatever_the_batch() -> None:
    g = torch.Generator().manual_seed(2)
    b, v = 12, 40
    logits = torch.randn(b, v, generator=g)
    params = [SamplingParams(temperature=1.0 + 0.1 * (i % 3), top_p=0.9 if i % 2 else 1.0) for i in range(b)]
    seeds = [100 + i for i in range(b)]
    steps = [i % 4 for i in range(b)]
    first = run(params, logits, seeds, steps)

    # Reversed order, interleaved with unrelated rows (greedy, filtered, other seeds).
    perm = list(reversed(range(b)))
    extra_logits = torch.randn(b, v, generator=g)
    rows, p2, s2, t2 = [], [], [], []
    for j, i in enumerate(perm):
        rows += [logits[i], extra_logits[j]]
        p2 += [params[i], SamplingParams(temperature=0.0) if j % 2 else SamplingParams(top_k=3)]
        s2 += [seeds[i], 7 + j]
        t2 += [steps[i], j]
    second = run(p2, torch.stack(rows), s2, t2)
    assert second.token_ids[0::2].tolist() == [first.token_ids[i].item() for i in perm]
    torch.testing.assert_close(second.logprobs[0::2], first.logprobs[perm])


def test_different_steps_and_seeds_give_different_draws() -> None:
    n = 4000
    logits = torch.tensor([LOGITS] * n)
    params = [SamplingParams(temperature=1.0)] * n
    p = expected_probs(LOGITS)
    collide = float((p**2).sum())  # chance two independent draws agree

    base = run(params, logits, seeds=list(range(n)), steps=[0] * n).token_ids
    next_step = run(params, logits, seeds=list(range(n)), steps=[1] * n).token_ids
    next_seed = run(params, logits, seeds=list(range(1, n + 1)), steps=[0] * n).token_ids
    for other in (next_step, next_seed):
        agree = float((base == other).float().mean())
        assert abs(agree - collide) < 0.04, (agree, collide)

    # One seed over many steps still follows the distribution.
    walk = run(params, logits, seeds=[42] * n, steps=list(range(n))).token_ids
    counts = np.bincount(walk.numpy(), minlength=V)
    assert chisquare(counts, p * n).pvalue > 1e-3


@pytest.mark.parametrize("kw", [
    {"top_p": 1e-6}, {"top_k": 1}, {"top_k": 1, "temperature": 3.0},
    # Below float32's range these round to 0 on the device; the limit is still the argmax.
    {"top_p": 1e-46}, {"top_p": 1e-300}, {"top_p": 5e-324}, {"top_p": 1e-300, "min_p": 1.0},
])
def test_degenerate_filters_act_like_greedy(kw: dict) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(256, 20, generator=g)
    out = run([SamplingParams(**kw)] * 256, logits, seeds=list(range(256)))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    torch.testing.assert_close(out.logprobs, torch.zeros(256))


def test_ties_at_the_top_k_boundary_keep_exactly_k() -> None:
    n = 3000
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]] * n)
    out = run([SamplingParams(top_k=2)] * n, logits, seeds=list(range(n)))
    # The stable sort breaks the tie toward lower ids.
    assert set(out.token_ids.tolist()) == {0, 1}
    torch.testing.assert_close(out.logprobs, torch.full((n,), math.log(0.5)))


def test_low_precision_logits_and_optional_outputs() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 25, generator=g).to(torch.bfloat16)
    batch = SamplingBatch.build([SamplingParams(temperature=0.8)] * 6, list(range(6)), [0] * 6, None, "cpu")
    out = Sampler().sample(logits, batch, return_logprob=False, return_raw_logprob=False, top_logprobs_num=0)
    assert (
        out.logprobs is None and out.raw_logprobs is None and out.top_ids is None and out.top_logprobs is None
    )
    assert out.token_ids.shape == (6,)
    full = Sampler().sample(logits, batch, return_logprob=True, return_raw_logprob=False, top_logprobs_num=99)
    assert torch.equal(full.token_ids, out.token_ids)
    assert full.top_ids.shape == (6, 25) and full.logprobs.dtype == torch.float32
    with pytest.raises(InvalidArgumentError) as err:
        Sampler().sample(logits, batch, return_logprob=True, return_raw_logprob=False, top_logprobs_num=-1)
    assert err.value.field == "top_logprobs_num"


def test_build_flags_and_validation() -> None:
    greedy, plain, filt = (
        SamplingParams(temperature=0.0, top_k=3),
        SamplingParams(),
        SamplingParams(min_p=0.1),
    )
    b = SamplingBatch.build([greedy, plain], [2**70, -1], [0, 5], [[], []], "cpu")
    assert not b.all_greedy and not b.need_filter and b.banned_token_ids is None
    assert b.uniforms.dtype == torch.float64 and b.uniforms.tolist() == uniform_draws([2**70, -1], [0, 5])
    assert b.temperatures.tolist() == [0.0, 1.0]
    assert SamplingBatch.build([greedy], [0], [0], None, "cpu").all_greedy
    assert SamplingBatch.build([greedy, filt], [0, 0], [0, 0], [[2], []], "cpu").need_filter
    assert SamplingBatch.build([SamplingParams(temperature=1e-9)], [0], [0], None, "cpu").all_greedy
    for args, name in [
        (([plain], [0, 1], [0], None), "seeds"),
        (([plain], [0], [], None), "steps"),
        (([plain], [0], [0], [[1], [2]]), "banned_token_ids"),
        (([plain], [0], [0], [[-1]]), "banned_token_ids"),
    ]:
        with pytest.raises(InvalidArgumentError) as err:
            SamplingBatch.build(*args, "cpu")
        assert err.value.field == name


def test_uniform_draws_are_per_row_and_uniform() -> None:
    u = uniform_draws([3, 3, 4, 3], [0, 0, 0, 1])
    assert u[0] == u[1] and u[0] != u[2] and u[0] != u[3]
    many = uniform_draws(range(20_000), [7] * 20_000)
    assert all(0.0 <= x < 1.0 for x in many)
    counts = np.histogram(many, bins=20, range=(0.0, 1.0))[0]
    assert chisquare(counts).pvalue > 1e-3
    # Neighbouring (seed, step) pairs must not share a draw.
    assert len({mix_seed(s, t) for s in range(50) for t in range(50)}) == 2500
    assert 0 <= mix_seed(-5, 2**80) < 2**64


def test_uniform_draws_of_a_large_batch_equal_the_row_formula() -> None:
    """Large batches draw in one numpy pass; every value is the per-row formula's, bit for bit."""
    rng = np.random.default_rng(0)
    seeds = [int(x) for x in rng.integers(0, 2**63, 40)] + [2**70, -1, -(2**65), 0, 2**64 - 1]
    steps = [int(x) for x in rng.integers(0, 10_000, len(seeds))]
    one_pass = uniform_draws(seeds, steps)
    assert one_pass == [(mix_seed(s, t) >> 11) * 2.0**-53 for s, t in zip(seeds, steps)]
    assert one_pass[:3] == uniform_draws(seeds[:3], steps[:3])


def test_sampling_batch_cache_keeps_rows_only_for_the_same_params() -> None:
    """A step's rows are built again whenever any row's params object differs (same count included);
    the batch is then what ``SamplingBatch.build`` gives."""
    from rollout.sampling.batch_cache import SamplingBatchCache

    greedy, hot, filt = SamplingParams(temperature=0.0), SamplingParams(temperature=1.5), SamplingParams(top_k=3)
    cache = SamplingBatchCache("cpu")
    for params, builds in [([greedy, hot], 1), ([greedy, hot], 1), ([hot, greedy], 2), ([hot, filt], 3),
                           ([hot], 4), ([hot, filt, greedy], 5), ([hot, filt, SamplingParams(top_k=3)], 6)]:
        seeds, steps = list(range(len(params))), [7] * len(params)
        banned = [[2]] + [None] * (len(params) - 1)
        uniforms = torch.tensor(uniform_draws(seeds, steps), dtype=torch.float64)
        got = cache.batch(params, uniforms, banned)
        want = SamplingBatch.build(params, seeds, steps, [b or [] for b in banned], "cpu")
        assert cache.builds == builds
        for name in ("temperatures", "top_ks", "top_ps", "min_ps", "uniforms", "filtered"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        for name in ("banned_token_ids", "all_greedy", "need_filter", "filtered_rows", "greedy_rows"):
            assert getattr(got, name) == getattr(want, name), name
    assert cache.batch([hot], torch.zeros(1, dtype=torch.float64), [None]).banned_token_ids is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_distribution() -> None:
    n = 20_000
    logits = torch.tensor([LOGITS] * n, device="cuda")
    kw = CASES["combo_top_p_binds"]
    out = run([SamplingParams(**kw)] * n, logits, seeds=list(range(n)))
    assert out.token_ids.device.type == "cuda"
    expected = expected_probs(LOGITS, **kw)
    counts = np.bincount(out.token_ids.cpu().numpy(), minlength=V)
    support = expected > 0
    assert counts[~support].sum() == 0
    assert chisquare(counts[support], expected[support] * n).pvalue > 1e-3
    again = run([SamplingParams(**kw)] * n, logits, seeds=list(range(n)))
    assert torch.equal(out.token_ids, again.token_ids)
