"""Deterministic mode on a GPU: bf16, Triton attention, CUDA graphs (padding rows included)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from rollout import Engine, SamplingParams

pytestmark = pytest.mark.gpu

TARGET_SP = SamplingParams(temperature=1.0, max_new_tokens=24, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3_dir(tiny_model_dir):
    # Qwen3-shaped (qk-norm, GQA 2:1, head_dim 128), small enough to test quickly.
    return tiny_model_dir("qwen3", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=1024,
                          init_std=0.08)


def _runs(path: str, deterministic: bool) -> dict[str, tuple[list[int], list[float]]]:
    """The target's (tokens, logprobs): alone, in a batch of 32 mixed requests (decode batches of
    odd sizes replay padded graphs), after a prefix hit, and with chunks of 7 prompt tokens."""
    rng = random.Random(0)
    target = [rng.randrange(3, 1000) for _ in range(300)]
    others = [[rng.randrange(3, 1000) for _ in range(rng.randint(2, 400))] for _ in range(31)]
    params = [SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_p=rng.choice([1.0, 0.9]),
                             max_new_tokens=rng.randint(1, 40), seed=i, ignore_eos=True) for i in range(31)]
    opts = dict(device="cuda", dtype="bfloat16", attention_backend="triton", deterministic=deterministic,
                max_total_tokens=1 << 15)
    with Engine(path, **opts) as engine:
        alone = engine.generate(target, TARGET_SP, return_logprob=True)[0]
        batch = engine.generate([target] + others, [TARGET_SP] + params, return_logprob=True)[0]
        cached = engine.generate(target, TARGET_SP, return_logprob=True)[0]
        assert cached.cached_tokens == len(target) - 1
        engine.check_integrity()
    with Engine(path, chunked_prefill_size=7, enable_prefix_cache=False, **opts) as engine:
        chunked = engine.generate(target, TARGET_SP, return_logprob=True)[0]
    return {name: (o.output_ids, o.output_logprobs)
            for name, o in (("alone", alone), ("batch", batch), ("cached", cached), ("chunked", chunked))}


def test_deterministic_mode_gives_the_same_bits_on_gpu(qwen3_dir) -> None:
    runs = _runs(qwen3_dir, deterministic=True)
    for name in ("batch", "cached", "chunked"):
        assert runs[name][0] == runs["alone"][0], name
        assert runs[name][1] == runs["alone"][1], name


def test_without_the_mode_the_bits_differ_on_gpu(qwen3_dir) -> None:
    """Not vacuous: the default kernels (cuBLAS by row count, split-KV decode, the skinny GEMV, the
    sampler's chunking) give the same request other bits in a batch or in other chunks."""
    runs = _runs(qwen3_dir, deterministic=False)
    assert any(runs[name][1] != runs["alone"][1] for name in ("batch", "chunked"))


def test_invariant_matmul_rows_on_gpu() -> None:
    from kernels.invariant_matmul import invariant_matmul

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    x = torch.randn(300, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    full = invariant_matmul(x, w)
    for m in (1, 2, 3, 16, 17, 64, 65, 257):
        assert torch.equal(invariant_matmul(x[:m], w)[m - 1], full[m - 1]), m
    # Past 512 rows the kernel takes larger tiles: the rows keep their bits.
    big = torch.randn(1100, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    big[:300] = x
    assert torch.equal(invariant_matmul(big, w)[:300], full)
    assert torch.allclose(full.float(), F.linear(x, w).float(), atol=0.1, rtol=0.02)
    # float32 x under the bf16 weight (the fp32 LM head): the same rows at any count, close to fp32.
    full32 = invariant_matmul(x.float(), w)
    assert full32.dtype == torch.float32
    assert torch.equal(invariant_matmul(x[:5].float(), w)[4], full32[4])
    assert torch.allclose(full32, F.linear(x.float(), w.float()), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("n,k", [(1024, 2048), (151936, 1024), (1000, 1000), (96, 4160)])
def test_invariant_matmul_tiles_share_bits_on_gpu(n: int, k: int) -> None:
    """The tiles the kernel chooses by row count sum K in the same order: same bits (module doc)."""
    from kernels.invariant_matmul import FEW_ROWS, MANY_ROWS, MatmulConfig, invariant_matmul

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = torch.randn(n, k, generator=gen, device="cuda").to(torch.bfloat16)
    x = torch.randn(333, k, generator=gen, device="cuda").to(torch.bfloat16)
    first = invariant_matmul(x, w, config=MatmulConfig(64, 128, 64, 4, 4))
    for config in (FEW_ROWS, MANY_ROWS):
        assert torch.equal(invariant_matmul(x, w, config=config), first), config


def test_packed_extend_rows_do_not_depend_on_their_tile_offset_on_gpu() -> None:
    """Deterministic attention packs (query, q head) rows of one kv head into 16-row tiles: a query's
    bits are the same in a whole-prompt extend (at every offset of its tile) and in a decode step."""
    from kernels.attention import extend_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    hq, hkv, d = 16, 4, 128
    k = torch.randn(600, hkv, d, generator=gen, device="cuda").to(torch.bfloat16)
    v = torch.randn(600, hkv, d, generator=gen, device="cuda").to(torch.bfloat16)
    q = torch.randn(600, hq, d, generator=gen, device="cuda").to(torch.bfloat16)
    slots = torch.arange(600, device="cuda")

    def run(first: int, n: int) -> torch.Tensor:
        qo = torch.tensor([0, n - first], device="cuda")
        starts = torch.zeros(1, dtype=torch.int64, device="cuda")
        lens = torch.tensor([n], device="cuda")
        return extend_attention(q[first:n], k, v, qo, slots, starts, lens, d**-0.5, n - first, deterministic=True)

    for n in (1, 2, 3, 5, 8, 77, 300, 513):
        assert torch.equal(run(0, n)[-1], run(n - 1, n)[0]), n
