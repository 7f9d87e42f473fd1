"""Triton paged attention kernels and backend against the torch references, on random inputs.

Without CUDA the kernels run in Triton's interpreter (shapes are kept small for it); with CUDA the
same tests compile them for the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: before import
pytest.importorskip("triton")

from kernels.attention import (  # noqa: E402
    choose_max_splits,
    decode_attention,
    decode_attention_reference,
    decode_grid,
    extend_attention,
    paged_attention_reference,
    plan_kv_splits,
    runs_from_indptr,
    uniform_pieces,
)
from kernels.attention.decode_plan import decode_tiles, default_tiles  # noqa: E402
from rollout.attention.registry import create_attention_backend  # noqa: E402
from rollout.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from rollout.batch import ForwardBatch  # noqa: E402
from rollout.cache.kv_pool import KVPool  # noqa: E402
from rollout.errors import InvalidArgumentError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tolerance(dtype: torch.dtype) -> float:
    """Max abs error allowed, relative to the largest reference value. The interpreter truncates
    fp32 -> bf16 (the GPU rounds to nearest), hence the wider bf16 bound on CPU."""
    if dtype == torch.float32:
        return 1e-4
    return 1e-2 if DEVICE == "cuda" else 2e-2


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tolerance(dtype) * max(1.0, ref.float().abs().max().item()), err


def paged_slots(
    requests: list[tuple[int, int]], page_size: int, num_pages: int, share: int, gen: torch.Generator
) -> list[list[int]]:
    """KV slots of each (prefix_len, new_len) request on shuffled pages (page 0 reserved). Request 1
    reuses request 0's first ``share`` slots (a shared prefix; page-aligned by construction)."""
    pages = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    out: list[list[int]] = []
    for i, (prefix, new) in enumerate(requests):
        shared = out[0][:share] if i == 1 and share else []
        need = prefix + new - len(shared)
        own: list[int] = []
        while len(own) < need:
            page = pages.pop()
            own += range(page * page_size, (page + 1) * page_size)
        out.append(shared + own[:need])
    return out


def make_case(requests, page_size, group, head_dim, dtype, share, seed=0):
    """Pool buffers filled with random K/V, random queries, and the flashinfer-style index tensors."""
    gen = torch.Generator().manual_seed(seed)
    num_kv_heads = 2
    num_pages = 2 + sum(p + n for p, n in requests) // page_size + len(requests)
    slots = paged_slots(requests, page_size, num_pages, share, gen)
    num_slots = num_pages * page_size
    k_buf = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v_buf = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    new_lens = [n for _, n in requests]
    q = torch.randn(sum(new_lens), num_kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)

    def indptr(lens: list[int]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    kv_indices = torch.tensor(sum(slots, []), dtype=torch.int64, device=DEVICE)
    kv_lens = [len(s) for s in slots]
    return q, k_buf, v_buf, indptr(new_lens), indptr(kv_lens), kv_indices, kv_lens


# (page_size, q heads per kv head, head_dim, dtype): every value of each axis appears.
CASES = [
    (1, 1, 64, torch.float32),
    (16, 2, 32, torch.float32),
    (16, 4, 128, torch.float32),
    (1, 4, 64, torch.bfloat16),
    (16, 1, 128, torch.bfloat16),
    (1, 2, 16, torch.bfloat16),
    (16, 4, 64, torch.float16),
]


@pytest.mark.parametrize("page_size,group,head_dim,dtype", CASES)
def test_decode_matches_reference(page_size, group, head_dim, dtype):
    requests = [(0, 1), (40, 1), (99, 1), (16, 1), (150, 1)]
    share = 16 if page_size == 16 else 23
    q, k_buf, v_buf, _, kv_indptr, kv_indices, kv_lens = make_case(requests, page_size, group, head_dim, dtype, share)
    scale = head_dim**-0.5
    num_splits = plan_kv_splits(torch.tensor(kv_lens, device=DEVICE), 4, 32)
    assert num_splits.tolist() == [1, 2, 4, 1, 4]
    out = decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), scale,
                           uniform_pieces(num_splits, 4))
    assert_close(out, decode_attention_reference(q, k_buf, v_buf, kv_indptr, kv_indices, scale), dtype)


@pytest.mark.parametrize("splits", [0, 1, 3, 4, 8])
def test_decode_any_split_count_gives_the_same_result(splits):
    """Includes pieces left empty (length 5 in 4 pieces of 2) and more pieces than tokens; a count
    of 0 is taken as one piece (with PDL every grid needs a program that reaches the wait)."""
    requests = [(4, 1), (2, 1), (70, 1)]
    q, k_buf, v_buf, _, kv_indptr, kv_indices, _ = make_case(requests, 1, 2, 32, torch.float32, 0, seed=1)
    num_splits = torch.full((3,), splits, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), 0.2,
                           uniform_pieces(num_splits, 8), tiles=(16, 8, 2))
    assert_close(out, decode_attention_reference(q, k_buf, v_buf, kv_indptr, kv_indices, 0.2), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_in_one_piece_writes_the_output_directly(dtype):
    """``max_splits == 1`` (large batches) skips the merge kernel: same result as the reference."""
    requests = [(0, 1), (40, 1), (150, 1), (7, 1)]
    q, k_buf, v_buf, _, kv_indptr, kv_indices, _ = make_case(requests, 16, 2, 64, dtype, 16, seed=4)
    num_splits = torch.ones(4, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), 0.125,
                           uniform_pieces(num_splits, 1))
    assert_close(out, decode_attention_reference(q, k_buf, v_buf, kv_indptr, kv_indices, 0.125), dtype)


def test_decode_empty_request_gives_zeros():
    """A padded batch row with no KV (as CUDA-graph padding may produce) stays finite: zeros."""
    q, k_buf, v_buf, _, _, kv_indices, _ = make_case([(9, 1)], 1, 1, 16, torch.float32, 0)
    q = torch.cat([q, q])  # (2, Hq, D): request 1 has no KV
    kv_indptr = torch.tensor([0, 10, 10], dtype=torch.int32, device=DEVICE)
    num_splits = torch.tensor([2, 1], dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), 0.25,
                           uniform_pieces(num_splits, 2))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = decode_attention_reference(q[:1], k_buf, v_buf, kv_indptr[:2], kv_indices, 0.25)
    assert_close(out[:1], ref, torch.float32)


def test_registry_builds_triton_backend():
    backend = create_attention_backend("triton", KVPool(1, 16, 2, 16, torch.float32, DEVICE))
    assert isinstance(backend, TritonAttentionBackend) and backend.supports_cuda_graph


def test_backend_refuses_a_cpu_pool_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InvalidArgumentError, match="CUDA device"):
        TritonAttentionBackend(KVPool(1, 16, 2, 16, torch.float32, "cpu"))


def test_decode_tiles_follow_the_program_count():
    bf16 = torch.bfloat16
    assert decode_tiles(bf16, 128, 1, 8, 132, 16) == default_tiles(bf16)
    assert decode_tiles(bf16, 128, 16, 8, 132, 2) == (64, 4, 5)  # 128 pairs: a deeper pipeline
    assert decode_tiles(bf16, 128, 17, 8, 132, 2) == (32, 4, 5)  # 136 pairs in two pieces: smaller tiles
    assert decode_tiles(bf16, 128, 25, 8, 132, 1) == (128, 4, 3)
    assert decode_tiles(bf16, 128, 33, 8, 132, 1) == (128, 4, 3)  # 264 pairs, two per SM
    assert decode_tiles(bf16, 128, 32, 8, 132, 1, grid=32) == (128, 4, 3)
    assert decode_tiles(bf16, 128, 32, 8, 132, 1, grid=48) == default_tiles(bf16)  # a balanced cut's spare pieces
    assert decode_tiles(bf16, 128, 34, 8, 132, 1) == default_tiles(bf16)
    assert decode_tiles(bf16, 128, 256, 8, 132, 1) == default_tiles(bf16)
    assert decode_tiles(bf16, 64, 17, 8, 132, 2) == default_tiles(bf16)  # measured at head_dim 128 only
    assert decode_tiles(torch.float32, 128, 17, 8, 132, 2) == default_tiles(torch.float32)


def test_split_planning():
    assert choose_max_splits(256, 8, 132, 16) == 1
    assert choose_max_splits(25, 8, 132, 16) == 1  # 200 (request, head) pairs: over 1.5 per SM
    assert choose_max_splits(24, 8, 132, 16) == 2  # 192: two pieces (fewer than 1.5 pairs per SM)
    assert choose_max_splits(17, 8, 132, 16) == 2
    assert choose_max_splits(17, 8, 132, 1) == 1  # the cap
    assert choose_max_splits(16, 8, 132, 16) == 2
    assert choose_max_splits(1, 8, 132, 16) == 16
    assert choose_max_splits(7, 2, 8, 16) == 1
    assert choose_max_splits(6, 2, 8, 16) == 2
    assert choose_max_splits(1, 2, 8, 16) == 4
    lens = torch.tensor([0, 1, 128, 129, 5000], device=DEVICE)
    assert plan_kv_splits(lens, 8, 128).tolist() == [1, 1, 1, 2, 8]
    buf = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    assert plan_kv_splits(lens, 4, 64, out=buf) is buf and buf.tolist() == [1, 1, 2, 3, 4]
    assert decode_grid(1, 8, 132, 16, 0.5) == 16  # as deep as choose_max_splits
    assert decode_grid(24, 8, 132, 16, 0.5) == 48
    assert decode_grid(256, 8, 132, 16, 0.5) == 384  # half a piece more per request
    assert decode_grid(256, 8, 132, 16, 0.0) == 256  # one piece each: no merge


@pytest.mark.parametrize("page_size,group,head_dim,dtype", CASES)
def test_extend_matches_reference(page_size, group, head_dim, dtype):
    # Ragged: a decode row, prefills without prefix, extends after a (shared) prefix.
    requests = [(32, 9), (32, 70), (0, 1), (0, 23), (5, 1)] if page_size == 16 else [(7, 9), (7, 70), (0, 1), (0, 23)]
    share = 32 if page_size == 16 else 7
    q, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, _ = make_case(requests, page_size, group, head_dim, dtype, share)
    scale = head_dim**-0.5
    out = extend_attention(q, k_buf, v_buf, qo_indptr, kv_indices, *runs_from_indptr(kv_indptr), scale, 70)
    ref = paged_attention_reference(q, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, scale)
    assert_close(out, ref, dtype)


def test_extend_small_tiles_cover_unmasked_and_diagonal_loops():
    """Tiles of 16 make several query tiles per request and whole unmasked KV tiles before the diagonal."""
    requests = [(50, 40), (3, 17), (0, 33)]
    q, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, _ = make_case(requests, 1, 2, 32, torch.float32, 0, seed=2)
    starts, lens = runs_from_indptr(kv_indptr)
    out = extend_attention(q, k_buf, v_buf, qo_indptr, kv_indices, starts, lens, 0.3, 40, block_m=16, block_n=16)
    ref = paged_attention_reference(q, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, 0.3)
    assert_close(out, ref, torch.float32)


# ------------------------------------------------------------------ the backend


def forward_batch(
    backend, requests: list[tuple[int, int, int]], slots: list[list[int]], table: bool = False
) -> ForwardBatch:
    """A step of ``(request, prefix, new)`` entries; request ``r`` keeps its KV at ``slots[r]``.

    ``table``: hand the slots over as the engine's request table (request ``r`` in row ``2r + 1``)
    instead of a flat ``kv_indices``."""
    positions, out_loc, kv_indices = [], [], []
    for r, prefix, new in requests:
        s = slots[r]
        positions += range(prefix, prefix + new)
        out_loc += s[prefix : prefix + new]
        kv_indices += s[: prefix + new]
    new_lens = [n for _, _, n in requests]
    seq_lens = [p + n for _, p, n in requests]

    def indptr(lens: list[int]) -> torch.Tensor:
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    batch = ForwardBatch(
        input_ids=torch.zeros(sum(new_lens), dtype=torch.int64, device=DEVICE),
        positions=torch.tensor(positions, device=DEVICE),
        out_cache_loc=torch.tensor(out_loc, device=DEVICE),
        qo_indptr=indptr(new_lens),
        kv_indptr=indptr(seq_lens),
        kv_indices=torch.tensor(kv_indices, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        logits_indices=indptr(new_lens)[1:].long() - 1,
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=new_lens,
        prefix_lens_cpu=[p for _, p, _ in requests],
        attn_backend=backend,
    )
    if table:
        req_table = torch.zeros(2 * len(slots) + 1, max(map(len, slots)) + 3, dtype=torch.int64)
        for r, s in enumerate(slots):
            req_table[2 * r + 1, : len(s)] = torch.tensor(s)
        batch.req_table = req_table.to(DEVICE)
        batch.req_rows = torch.tensor([2 * r + 1 for r, _, _ in requests], device=DEVICE)
        batch.kv_indptr = batch.kv_indices = None
    backend.prepare(batch)
    return batch


@pytest.mark.parametrize("dtype,max_batch_size,table,cut", [
    (torch.float32, 256, True, 0.5), (torch.bfloat16, 256, True, 0.5), (torch.float32, 2, True, 0.5),
    (torch.float32, 256, False, 0.5), (torch.float32, 256, True, None), (torch.float32, 2, False, None),
    (torch.float32, 256, True, 3.0), (torch.float32, 2, False, 3.0), (torch.float32, 256, True, "direct"),
])
def test_backend_matches_torch_reference(dtype, max_batch_size, table, cut):
    """Prefill, then a mixed extend step, then decode steps of 3 requests and then of 2 (the fixed
    buffers' slices reused at another size): outputs and written KV equal the reference.
    ``max_batch_size`` 2 sends the 3-request decode steps through the oversized-batch buffers;
    ``table`` gives the Triton backend the request table instead of flat KV indices; ``cut``: the
    balanced cut's spare pieces per request, None for the uniform cut (ROLLOUT_DECODE_CUT), or
    ``direct``: one piece per request, no merge (no split allowed, no spare piece)."""
    gen = torch.Generator().manual_seed(3)
    layers, num_kv_heads, group, head_dim = 1, 2, 2, 32
    pools = [KVPool(layers, 512, num_kv_heads, head_dim, dtype, DEVICE) for _ in range(2)]
    cuts = dict(max_kv_splits=1, balanced=True, spare=0.0) if cut == "direct" else dict(
        balanced=cut is not None, spare=cut or 0.0)
    triton_backend = TritonAttentionBackend(pools[0], max_batch_size=max_batch_size, min_split_tokens=16, **cuts)
    ref_backend = create_attention_backend("torch", pools[1])
    # Request 1 starts from request 0's first page, cached in step 1 (a shared prefix).
    slots = paged_slots([(0, 50), (0, 30), (0, 140)], 16, 32, 16, gen)
    steps = [
        [(0, 0, 20), (2, 0, 130)],  # prefill
        [(0, 20, 28), (1, 16, 1), (2, 130, 1)],  # extend, one-token extend, decode row
        [(0, 48, 1), (1, 17, 1), (2, 131, 1)],  # decode
        [(0, 49, 1), (1, 18, 1), (2, 132, 1)],
        [(1, 19, 1), (2, 133, 1)],
    ]
    grids = []
    for step in steps:
        outs = []
        t = sum(n for _, _, n in step)
        q = torch.randn(t, num_kv_heads * group, head_dim, generator=gen).to(DEVICE, dtype)
        k = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
        v = torch.randn(t, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
        for backend in (triton_backend, ref_backend):
            batch = forward_batch(backend, step, slots, table=table and backend is triton_backend)
            outs.append(torch.stack([backend.forward(q, k, v, layer, 0.2, batch) for layer in range(layers)]))
        assert_close(outs[0], outs[1], dtype)
        plan = triton_backend._plan
        grids.append(plan.pieces.grid if plan.pieces is not None else 0)
    # The 2-request decode step: one piece each with "direct", else split (small batches always are).
    assert grids[-1] == 2 if cut == "direct" else grids[-1] > 2
    for layer in range(layers):
        assert torch.equal(pools[0].k_buffers[layer], pools[1].k_buffers[layer])
        assert torch.equal(pools[0].v_buffers[layer], pools[1].v_buffers[layer])


def test_engine_with_triton_backend_reads_the_request_table(tiny_model_dir):
    """The engine hands the Triton backend its request table instead of flat KV indices: prompt
    chunks, mixed steps, shared prefixes and decode give the torch backend's tokens (fp32, greedy)."""
    from rollout import Engine, SamplingParams

    path = tiny_model_dir("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=320)
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 300, (21,), generator=gen).tolist()
    prompts = [(shared if i % 2 else []) + torch.randint(3, 300, (5 + 7 * i,), generator=gen).tolist()
               for i in range(5)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    outs = {}
    for backend in ("triton", "torch"):
        with Engine(path, device=DEVICE, dtype="float32", attention_backend=backend, chunked_prefill_size=16,
                    page_size=4) as engine:
            outs[backend] = engine.generate(prompts, sp, return_logprob=True)
            engine.check_integrity()
    for o, r in zip(outs["triton"], outs["torch"]):
        assert o.output_ids == r.output_ids
        assert max(abs(a - b) for a, b in zip(o.output_logprobs, r.output_logprobs)) < 1e-4


@pytest.mark.parametrize("group,block_m", [(2, 16), (4, 16), (8, 4)])
def test_extend_with_gqa_packed_tiles_matches_reference(group, block_m):
    """Tiles of (query, q head) pairs of one kv head, including tiles shorter than a group."""
    requests = [(50, 40), (3, 17), (0, 33), (20, 1)]
    q, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, _ = make_case(requests, 1, group, 32, torch.float32, 0, seed=3)
    starts, lens = runs_from_indptr(kv_indptr)
    out = extend_attention(q, k_buf, v_buf, qo_indptr, kv_indices, starts, lens, 0.3, 40, block_m=block_m,
                           block_n=16, pack_gqa=True)
    ref = paged_attention_reference(q, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, 0.3)
    assert_close(out, ref, torch.float32)
