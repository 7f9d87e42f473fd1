"""Deterministic mode: a request's tokens and logprob bits do not depend on the batch, the chunking
or a prefix hit; without the mode they do (so the equal-bits checks are not vacuous)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from rollout import Engine, SamplingParams
from rollout.errors import InvalidArgumentError
from rollout.layers.batch_invariant import TILE_ROWS, invariant_linear

TARGET_SP = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11, ignore_eos=True)


def _workload() -> tuple[list[int], list[list[int]], list[SamplingParams]]:
    """The target prompt and 31 others: greedy, sampled and filtered rows of many lengths."""
    rng = random.Random(0)
    target = [rng.randrange(3, 300) for _ in range(25)]
    others = [[rng.randrange(3, 300) for _ in range(rng.randint(2, 40))] for _ in range(31)]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
                             max_new_tokens=rng.randint(1, 12), seed=i, ignore_eos=True) for i in range(31)]
    return target, others, params


def _runs(path: str, deterministic: bool) -> dict[str, tuple[list[int], list[float]]]:
    """The target's (tokens, logprobs) served alone, in a batch of 32, after a prefix hit, and with
    another chunk size."""
    target, others, params = _workload()
    out = {}
    with Engine(path, deterministic=deterministic) as engine:
        alone = engine.generate(target, TARGET_SP, return_logprob=True)[0]
        batch = engine.generate([target] + others, [TARGET_SP] + params, return_logprob=True)[0]
        cached = engine.generate(target, TARGET_SP, return_logprob=True)[0]
        assert cached.cached_tokens == len(target) - 1  # the prompt came from the prefix cache
        engine.check_integrity()
    with Engine(path, deterministic=deterministic, chunked_prefill_size=7, enable_prefix_cache=False) as engine:
        chunked = engine.generate(target, TARGET_SP, return_logprob=True)[0]
    for name, o in (("alone", alone), ("batch", batch), ("cached", cached), ("chunked", chunked)):
        out[name] = (o.output_ids, o.output_logprobs)
    return out


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3")


def test_deterministic_mode_gives_the_same_bits(model_path) -> None:
    runs = _runs(model_path, deterministic=True)
    for name in ("batch", "cached", "chunked"):
        assert runs[name][0] == runs["alone"][0], name
        # Python floats from float32 tensors: == is equality of the bits (no NaN here).
        assert runs[name][1] == runs["alone"][1], name


def test_without_the_mode_the_batch_and_chunking_change_the_bits(model_path) -> None:
    """The same cases differ without the mode: on CPU, MKL sums one row in another order than
    several, and the reference attention's kernels follow the chunk's shape. (A prefix hit alone
    gave the same bits here without the mode, so it is not asserted to differ.)"""
    runs = _runs(model_path, deterministic=False)
    assert runs["batch"][1] != runs["alone"][1]
    assert runs["chunked"][1] != runs["alone"][1]


def test_cpu_row_tiles_are_position_free() -> None:
    """What the CPU path rests on: a row of ``F.linear`` over a fixed-shape tile has the same bits
    wherever it sits in the tile and whatever the other rows hold; ``invariant_linear`` therefore
    gives a row the same bits at any row count, where plain ``F.linear`` does not."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen)
    x = torch.randn(40, 64, generator=gen)
    row = x[5:6]
    ref = F.linear(torch.cat([row, torch.zeros(TILE_ROWS - 1, 64)]), w)[0]
    for pos in range(TILE_ROWS):
        tile = torch.randn(TILE_ROWS, 64, generator=gen)
        tile[pos] = row[0]
        assert torch.equal(F.linear(tile, w)[pos], ref)
    alone = invariant_linear(row, w)[0]
    for m in (6, 7, 16, 17, 40):
        assert torch.equal(invariant_linear(x[:m], w)[5], alone)
    assert not all(torch.equal(F.linear(x[:m], w)[0], F.linear(x[:1], w)[0]) for m in (2, 7, 16, 40))


def test_invariant_matmul_kernel_rows_do_not_depend_on_the_batch() -> None:
    """The GPU matmul (Triton, interpreted here): a row's bits are the same at every row count, and
    the values match ``F.linear``; also with a float32 input under a bfloat16 weight (fp32 LM head)."""
    from kernels.invariant_matmul import invariant_matmul

    gen = torch.Generator().manual_seed(1)
    for x_dtype, w_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                             (torch.float32, torch.bfloat16)):
        w = torch.randn(80, 48, generator=gen).to(w_dtype)
        bias = torch.randn(80, generator=gen).to(w_dtype)
        x = torch.randn(70, 48, generator=gen).to(x_dtype)
        full = invariant_matmul(x, w, bias)
        assert torch.equal(invariant_matmul(x[5:6], w, bias)[0], full[5])
        for m in (1, 3, 33):
            assert torch.equal(invariant_matmul(x[:m], w, bias)[m - 1], full[m - 1])
        ref = F.linear(x.float(), w.float(), bias.float())
        assert torch.allclose(full.float(), ref, atol=0.05 if x_dtype == torch.bfloat16 else 1e-4, rtol=0.02)


def test_deterministic_extend_kernel_rows_do_not_depend_on_the_chunk() -> None:
    """The Triton attention of deterministic mode (interpreted): the last query of a request gets
    the same bits in a whole-prompt extend, in a one-token step after the prefix, and beside another
    request."""
    from kernels.attention import extend_attention

    gen = torch.Generator().manual_seed(2)
    # n = 35: the last query's rows (68, 69 of the packed (query, head) rows) sit at offsets 4-5 of
    # their 16-row tile, as the one-token step's rows sit at 0-1. The interpreter's matmul is numpy's
    # BLAS, whose bits for a row depend on its offset in the tile (offsets 6-11 of a 16-row product
    # round differently), unlike the GPU's tensor-core rows; the GPU test covers every offset.
    hq, hkv, d, n = 4, 2, 16, 35
    k = torch.randn(64, hkv, d, generator=gen)
    v = torch.randn(64, hkv, d, generator=gen)
    q = torch.randn(n + 5, hq, d, generator=gen)
    slots = torch.arange(n)

    def run(q_rows: torch.Tensor, lens: list[tuple[int, int]], kv_lists: list[torch.Tensor]) -> torch.Tensor:
        qo = torch.tensor([0, *torch.tensor([e for e, _ in lens]).cumsum(0).tolist()])
        flat = torch.cat(kv_lists)
        starts = torch.tensor([0, *torch.tensor([len(s) for s in kv_lists]).cumsum(0).tolist()[:-1]])
        kv_lens = torch.tensor([s for _, s in lens])
        return extend_attention(q_rows, k, v, qo, flat, starts, kv_lens, 0.25, max(e for e, _ in lens),
                                deterministic=True)

    whole = run(q[:n], [(n, n)], [slots])[n - 1]
    one = run(q[n - 1: n], [(1, n)], [slots])[0]
    beside = run(torch.cat([q[n:n + 5], q[n - 1: n]]), [(5, 5), (1, n)], [torch.arange(40, 45), slots])[5]
    assert torch.equal(whole, one)
    assert torch.equal(whole, beside)


def test_deterministic_refuses_what_it_does_not_cover(tiny_model_dir) -> None:
    with pytest.raises(InvalidArgumentError, match="deterministic"):
        Engine(tiny_model_dir("qwen3_moe"), deterministic=True)
    with pytest.raises(InvalidArgumentError, match="deterministic"):
        Engine(tiny_model_dir("qwen3"), deterministic=True, attention_backend="flashinfer")


def test_fp32_lm_head_logprobs_are_closer_to_float32(model_path) -> None:
    """bfloat16 engine: the float32 LM head brings the sampled tokens' logprobs closer to a float32
    engine's (the logits no longer round to bfloat16)."""
    target, _, _ = _workload()
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    with Engine(model_path) as engine:
        ref = engine.generate(target, sp, return_logprob=True)[0]
    errs = {}
    for fp32 in (False, True):
        with Engine(model_path, dtype="bfloat16", fp32_lm_head=fp32) as engine:
            out = engine.generate(target, sp, return_logprob=True)[0]
        n = min(len(out.output_ids), len(ref.output_ids))
        errs[fp32] = sum(abs(a - b) for a, b in zip(out.output_logprobs[:n], ref.output_logprobs[:n])) / n
    assert errs[True] < errs[False]
