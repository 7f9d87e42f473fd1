"""The Triton attention backend and fused MoE on a GPU: whole-model forwards against the torch
reference backend, CUDA-graph replay of a decode step, and the kernels at realistic sizes."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from rollout.attention.registry import create_attention_backend  # noqa: E402
from rollout.batch import ForwardBatch  # noqa: E402
from rollout.cache.kv_pool import KVPool  # noqa: E402
from rollout.config import ModelConfig  # noqa: E402
from rollout.models.loader import load_model  # noqa: E402
from rollout.testing.random_model import write_random_model  # noqa: E402

DEVICE = "cuda"


def indptr(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def make_batch(backend, tokens: list[list[int]], steps: list[tuple[int, int, int]], slots) -> ForwardBatch:
    """``steps`` of ``(request, prefix, new)``: request ``r`` has ids ``tokens[r]`` at ``slots[r]``."""
    ids, pos, out_loc, kv_indices = [], [], [], []
    for r, prefix, new in steps:
        ids += tokens[r][prefix : prefix + new]
        pos += range(prefix, prefix + new)
        out_loc += slots[r][prefix : prefix + new]
        kv_indices += slots[r][: prefix + new]
    new_lens = [n for _, _, n in steps]
    seq_lens = [p + n for _, p, n in steps]
    batch = ForwardBatch(
        input_ids=torch.tensor(ids, device=DEVICE),
        positions=torch.tensor(pos, device=DEVICE),
        out_cache_loc=torch.tensor(out_loc, device=DEVICE),
        qo_indptr=indptr(new_lens),
        kv_indptr=indptr(seq_lens),
        kv_indices=torch.tensor(kv_indices, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        logits_indices=indptr(new_lens)[1:].long() - 1,
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=new_lens,
        prefix_lens_cpu=[p for _, p, _ in steps],
        attn_backend=backend,
    )
    backend.prepare(batch)
    return batch


MODELS = {
    "qwen3": ("qwen3", {}),
    "qwen3-d128-gqa4": ("qwen3", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=128)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_model_logits_match_torch_backend(tmp_path, name, dtype):
    arch, extra = MODELS[name]
    path = write_random_model(str(tmp_path), arch, **extra)
    config = ModelConfig.from_pretrained(path)
    model = load_model(config, path, dtype, DEVICE)
    pools = [
        KVPool(config.num_hidden_layers, 2048, config.num_key_value_heads, config.head_dim, dtype, DEVICE)
        for _ in range(2)
    ]
    backends = [create_attention_backend("triton", pools[0]), create_attention_backend("torch", pools[1])]
    gen = torch.Generator().manual_seed(0)
    lengths = [300, 260, 40]
    tokens = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    tokens[1][:128] = tokens[0][:128]  # request 1 reuses request 0's first 128 KV slots
    perm = (torch.randperm(2000, generator=gen) + 1).tolist()
    slots = [perm[:300], perm[:128] + perm[300:432], perm[600:640]]
    steps = [
        [(0, 0, 200), (2, 0, 30)],  # prefill
        [(0, 200, 97), (1, 128, 129), (2, 30, 1)],  # extends after a private / shared prefix, a decode row
        [(0, 297, 1), (1, 257, 1), (2, 31, 1)],  # decode
        [(0, 298, 1), (1, 258, 1), (2, 32, 1)],
    ]
    for step in steps:
        logits = []
        for backend in backends:
            batch = make_batch(backend, tokens, step, slots)
            logits.append(model.compute_logits(model(batch)[batch.logits_indices]).float())
        scale = logits[1].abs().max().item()
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        assert (logits[0] - logits[1]).abs().max().item() <= tol * max(1.0, scale), step


@torch.no_grad()
def test_decode_cuda_graph_replay_equals_eager(tmp_path):
    path = write_random_model(str(tmp_path), "qwen3")
    config = ModelConfig.from_pretrained(path)
    model = load_model(config, path, torch.bfloat16, DEVICE)
    pool = KVPool(config.num_hidden_layers, 4096, config.num_key_value_heads, config.head_dim, torch.bfloat16, DEVICE)
    backend = create_attention_backend("triton", pool)
    assert backend.supports_cuda_graph
    bs, max_kv = 4, 2048
    backend.init_cuda_graph(8, max_kv)
    for layer in range(config.num_hidden_layers):  # stands for KV written by earlier steps
        pool.k_buffers[layer].normal_()
        pool.v_buffers[layer].normal_()
    static = dict(
        input_ids=torch.zeros(bs, dtype=torch.int64, device=DEVICE),
        positions=torch.zeros(bs, dtype=torch.int64, device=DEVICE),
        out_cache_loc=torch.zeros(bs, dtype=torch.int64, device=DEVICE),
        kv_indptr=torch.zeros(bs + 1, dtype=torch.int32, device=DEVICE),
        kv_indices=torch.zeros(max_kv, dtype=torch.int64, device=DEVICE),
        seq_lens=torch.zeros(bs, dtype=torch.int32, device=DEVICE),
    )

    def fill(seq_lens: list[int]) -> ForwardBatch:
        """Write one decode step (its contents a function of ``seq_lens``) into the static buffers."""
        n = sum(seq_lens)
        gen = torch.Generator().manual_seed(n)
        static["input_ids"].copy_(torch.randint(0, config.vocab_size, (bs,), generator=gen))
        static["positions"].copy_(torch.tensor(seq_lens) - 1)
        static["kv_indptr"].copy_(indptr(seq_lens))
        static["kv_indices"][:n].copy_(torch.randperm(4000, generator=gen)[:n] + 1)
        static["out_cache_loc"].copy_(static["kv_indices"][static["kv_indptr"][1:].long() - 1])
        static["seq_lens"].copy_(torch.tensor(seq_lens))
        batch = ForwardBatch(
            **static, qo_indptr=torch.arange(bs + 1, dtype=torch.int32, device=DEVICE),
            logits_indices=torch.arange(bs, device=DEVICE), seq_lens_cpu=seq_lens, extend_lens_cpu=[1] * bs,
            prefix_lens_cpu=[s - 1 for s in seq_lens], attn_backend=backend,
        )
        backend.prepare(batch)
        return batch

    batch = fill([5, 130, 700, 33])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(batch)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = model(batch)
    torch.cuda.current_stream().wait_stream(stream)
    for seq_lens in ([6, 131, 701, 34], [1000, 2, 64, 900]):  # longer runs, different split counts
        batch = fill(seq_lens)
        graph.replay()
        replayed = captured.clone()
        eager = model(fill(seq_lens))
        # Stale split counts or lengths would change whole rows; allow only GEMM-algorithm noise.
        assert (replayed.float() - eager.float()).abs().max().item() <= 1e-2 * eager.float().abs().max().item()


@torch.no_grad()
def test_kernels_at_realistic_sizes():
    """Decode over long contexts (many splits) and a 1k-token extend at head_dim 128, GQA 4, bf16."""
    from kernels.attention import (
        decode_attention,
        decode_attention_reference,
        extend_attention,
        paged_attention_reference,
        plan_kv_splits,
        runs_from_indptr,
        uniform_pieces,
    )

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    num_slots, hkv, hq, d = 40_000, 8, 32, 128
    k_buf = torch.randn(num_slots, hkv, d, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    v_buf = torch.randn(num_slots, hkv, d, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    kv_lens = [4000, 1, 1500, 3333, 17, 8000]
    kv_indices = torch.randperm(num_slots - 1, device=DEVICE, generator=gen)[: sum(kv_lens)] + 1
    kv_indptr = indptr(kv_lens)
    q = torch.randn(len(kv_lens), hq, d, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    splits = plan_kv_splits(torch.tensor(kv_lens, device=DEVICE), 16, 128)
    out = decode_attention(q, k_buf, v_buf, kv_indices, *runs_from_indptr(kv_indptr), d**-0.5,
                           uniform_pieces(splits, 16))
    ref = decode_attention_reference(q, k_buf, v_buf, kv_indptr, kv_indices, d**-0.5)
    assert (out.float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item()

    q_lens = [1000, 1, 300, 1500]
    qo_indptr = indptr(q_lens)
    kv_lens = [1500, 1, 300, 5000]
    kv_indptr = indptr(kv_lens)
    q = torch.randn(sum(q_lens), hq, d, device=DEVICE, generator=gen, dtype=torch.bfloat16)
    flat = kv_indices[: sum(kv_lens)]
    out = extend_attention(q, k_buf, v_buf, qo_indptr, flat, *runs_from_indptr(kv_indptr), d**-0.5, 1500)
    ref = paged_attention_reference(q, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices[: sum(kv_lens)], d**-0.5)
    assert (out.float() - ref.float()).abs().max().item() <= 1e-2 * ref.float().abs().max().item()


@pytest.mark.parametrize("tokens", [1, 64, 300, 1024, 4096])
@torch.no_grad()
def test_fused_moe_qwen3_30b_shape(tokens):
    """128 experts, top-8, hidden 2048, expert width 768, bf16: close to the exact fp32 result (with the
    tuned tiles of ``kernels/moe/configs`` where this GPU has a file)."""
    from kernels.moe import fused_experts_triton
    from rollout.layers.moe import fused_experts_reference, select_experts

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    e, k, h, i = 128, 8, 2048, 768
    x = torch.randn(tokens, h, device=DEVICE, generator=gen).bfloat16()
    w13 = (torch.randn(e, 2 * i, h, device=DEVICE, generator=gen) * h**-0.5).bfloat16()
    w2 = (torch.randn(e, h, i, device=DEVICE, generator=gen) * i**-0.5).bfloat16()
    weights, ids = select_experts(torch.randn(tokens, e, device=DEVICE, generator=gen), k, renormalize=True)
    out = fused_experts_triton(x, w13, w2, weights, ids)
    exact = fused_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    assert (out.float() - exact).abs().max().item() <= 1e-2 * exact.abs().max().item()
