"""Decode attention straight from the qkv projection (q/k norm and rotary in the split kernel)
against the two kernels it replaces: ``qk_norm_rope_`` storing k and v, then ``decode_attention``.

Without CUDA the kernels run in Triton's interpreter; with CUDA the same tests compile them.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
pytest.importorskip("triton")

from kernels.attention import (  # noqa: E402
    NewTokenRope,
    balanced_splits,
    cut_pieces,
    decode_attention,
    decode_attention_qkv,
    plan_kv_splits,
    runs_from_indptr,
    uniform_pieces,
)
from kernels.fused import qk_norm_rope_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_step(kv_lens, hq, hkv, d, dtype, norm, seed):
    """A decode step: caches holding every position but each request's last, whose slot is free."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(kv_lens) + 7
    perm = torch.randperm(num_slots - 1, generator=gen) + 1
    runs = [perm[sum(kv_lens[:i]) : sum(kv_lens[: i + 1])] for i in range(len(kv_lens))]
    kv_indices = torch.cat(runs).to(DEVICE)
    indptr = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    k_buf = torch.randn(num_slots, hkv, d, generator=gen).to(DEVICE, dtype)
    v_buf = torch.randn(num_slots, hkv, d, generator=gen).to(DEVICE, dtype)
    qkv = (torch.randn(len(kv_lens), (hq + 2 * hkv) * d, generator=gen) * 2).to(DEVICE, dtype)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.arange(4096).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)  # (P, D), rotate_half layout
    weights = [(torch.rand(d, generator=gen) + 0.5).to(DEVICE, dtype) for _ in range(2)] if norm else [None, None]
    slots = torch.stack([r[-1] if len(r) else torch.tensor(0) for r in runs]).to(DEVICE)
    positions = torch.tensor([max(n - 1, 0) for n in kv_lens], device=DEVICE)
    rope = NewTokenRope(positions, angles.cos().to(DEVICE), angles.sin().to(DEVICE), *weights, 1e-6, slots)
    return qkv, k_buf, v_buf, kv_indices, indptr, rope


def two_kernels(qkv, hq, rope, k_buf, v_buf, kv_indices, indptr, scale, splits, max_splits):
    """The path replaced: rotate in place and store k, v; then attend from the cache."""
    hkv, d = k_buf.shape[1], k_buf.shape[2]
    qkv = qkv.clone()
    qk_norm_rope_(qkv, rope.positions, rope.cos_cache, rope.sin_cache, hq, hkv, d, rope.q_norm_weight,
                  rope.k_norm_weight, rope.eps, kv_cache=(k_buf, v_buf, rope.slots))
    q = qkv[:, : hq * d].reshape(-1, hq, d)
    return decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(indptr), scale,
                            uniform_pieces(splits, max_splits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("max_splits", [1, 4])
@pytest.mark.parametrize("early_tile", [False, True])
def test_qkv_decode_is_rotary_then_decode(dtype, norm, max_splits, early_tile):
    """Same output, same cache rows written (the same bits in the interpreter), qkv left as it was;
    requests of one token, of a last position in any piece, and an empty padding row (no KV:
    zeros, nothing stored). ``early_tile``: each piece's first KV tile loaded ahead of the loop
    (before the PDL wait, on a GPU that takes PDL launches)."""
    hq, hkv, d = 4, 2, 32
    kv_lens = [1, 37, 64, 100, 0]
    qkv, k_buf, v_buf, kv_indices, indptr, rope = make_step(kv_lens, hq, hkv, d, dtype, norm, seed=max_splits)
    splits = plan_kv_splits(torch.tensor(kv_lens, device=DEVICE), max_splits, 16)
    k_ref, v_ref, k_orig = k_buf.clone(), v_buf.clone(), k_buf.clone()
    want = two_kernels(qkv, hq, rope, k_ref, v_ref, kv_indices, indptr, d**-0.5, splits, max_splits)
    before = qkv.clone()
    got = decode_attention_qkv(qkv, hq, rope, k_buf, v_buf, kv_indices, *runs_from_indptr(indptr), d**-0.5,
                               uniform_pieces(splits, max_splits), early_tile=early_tile)
    assert torch.equal(qkv, before)
    live = rope.slots[:-1]  # the padding row (kv_len 0) stores nothing
    assert torch.equal(v_buf[live], v_ref[live])
    if DEVICE == "cpu":
        assert torch.equal(k_buf[live], k_ref[live])
    else:  # compiled, the two kernels may round a product of the rotation differently (H200, bf16:
        # 3 of 256 elements off by 0.006, a cancelling difference of products of magnitude ~2)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(k_buf[live], k_ref[live], rtol=tol, atol=tol)
    untouched = torch.ones(k_buf.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[live] = False
    assert torch.equal(k_buf[untouched], k_orig[untouched])  # slot 0 too, where the padding row's would go
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * max(1.0, want.float().abs().max().item()), err
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))


@pytest.mark.parametrize("max_splits,tiles", [(1, (128, 4, 3)), (2, (32, 4, 5)), (2, (64, 4, 5))])
def test_qkv_decode_at_the_tiles_decode_tiles_picks(max_splits, tiles):
    """The tiles ``decode_tiles`` picks for some batch sizes: a tile longer than every request's KV,
    and tiles of 32 over pieces of several tiles, against rotary-then-decode."""
    hq, hkv, d = 4, 2, 32
    kv_lens = [1, 37, 64, 100, 0]
    qkv, k_buf, v_buf, kv_indices, indptr, rope = make_step(kv_lens, hq, hkv, d, torch.float32, True, seed=3)
    splits = plan_kv_splits(torch.tensor(kv_lens, device=DEVICE), max_splits, 16)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    want = two_kernels(qkv, hq, rope, k_ref, v_ref, kv_indices, indptr, d**-0.5, splits, max_splits)
    got = decode_attention_qkv(qkv, hq, rope, k_buf, v_buf, kv_indices, *runs_from_indptr(indptr), d**-0.5,
                               uniform_pieces(splits, max_splits), tiles=tiles)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    live = rope.slots[:-1]  # the padding row (kv_len 0) stores nothing
    assert torch.equal(v_buf[live], v_ref[live])


@pytest.mark.parametrize("grid,early_tile", [(5, False), (12, False), (12, True), (30, True)])
def test_qkv_decode_with_a_balanced_cut_is_rotary_then_decode(grid, early_tile):
    """A balanced cut (``balanced_splits``): the new token's k / v stored by whichever piece holds
    it, requests in one piece written directly, the others merged (over 16 pieces: in chunks)."""
    hq, hkv, d = 4, 2, 32
    kv_lens = [1, 37, 64, 300, 0]
    qkv, k_buf, v_buf, kv_indices, indptr, rope = make_step(kv_lens, hq, hkv, d, torch.float32, True, seed=5)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    pieces = cut_pieces(balanced_splits(torch.tensor(kv_lens, device=DEVICE), grid, 8), grid, depth=2)
    assert int(pieces.counts.max()) > (16 if grid == 30 else 1) or grid == 5
    uniform = torch.ones(len(kv_lens), dtype=torch.int32, device=DEVICE)
    want = two_kernels(qkv, hq, rope, k_ref, v_ref, kv_indices, indptr, d**-0.5, uniform, 1)
    got = decode_attention_qkv(qkv, hq, rope, k_buf, v_buf, kv_indices, *runs_from_indptr(indptr), d**-0.5,
                               pieces, early_tile=early_tile)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    live = rope.slots[:-1]  # the padding row (kv_len 0) stores nothing
    assert torch.equal(v_buf[live], v_ref[live])
    if DEVICE == "cpu":
        assert torch.equal(k_buf[live], k_ref[live])
    else:  # compiled, the rotation's products may round apart (test_qkv_decode_is_rotary_then_decode)
        torch.testing.assert_close(k_buf[live], k_ref[live], rtol=1e-5, atol=1e-5)


def test_qkv_decode_refuses_small_or_odd_heads():
    qkv, k_buf, v_buf, kv_indices, indptr, rope = make_step([5], 2, 1, 16, torch.float32, False, seed=0)
    splits = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(AssertionError, match="head_dim"):
        decode_attention_qkv(qkv, 2, rope, k_buf, v_buf, kv_indices, *runs_from_indptr(indptr), 0.25,
                             uniform_pieces(splits, 1))


def test_engine_decodes_from_qkv_as_the_torch_backend(tiny_model_dir, monkeypatch):
    """With the fused kernels on (the interpreter on CPU) the Triton backend's decode steps take
    ``decode_attention_qkv``; prompt chunks, shared prefixes and decode give the torch backend's
    tokens, and the cache stays whole."""
    from rollout import Engine, SamplingParams
    from rollout.attention import triton_backend
    from rollout.layers import fused_ops

    calls = []
    real = triton_backend.decode_attention_qkv
    monkeypatch.setattr(triton_backend, "decode_attention_qkv", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = tiny_model_dir("qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=300)
    gen = torch.Generator().manual_seed(2)
    shared = torch.randint(3, 290, (13,), generator=gen).tolist()
    prompts = [(shared if i % 2 else []) + torch.randint(3, 290, (4 + 5 * i,), generator=gen).tolist()
               for i in range(4)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
    outs = {}
    for backend in ("triton", "torch"):
        monkeypatch.setattr(fused_ops, "MODE", "all" if backend == "triton" else "0")
        with Engine(path, device=DEVICE, dtype="float32", attention_backend=backend, chunked_prefill_size=16,
                    page_size=4) as engine:
            outs[backend] = engine.generate(prompts, sp, return_logprob=True)
            engine.check_integrity()
    assert calls  # the decode steps went through the fused path
    for o, r in zip(outs["triton"], outs["torch"]):
        assert o.output_ids == r.output_ids
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-4
