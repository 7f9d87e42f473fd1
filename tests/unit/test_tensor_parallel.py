"""Tensor parallelism over two gloo ranks on CPU: logits equal the single-rank model's.

One spawned pair of processes runs every architecture; each rank loads the same checkpoint through
the normal loader with its ``TPGroup`` and sends its logits' distance to a single-rank forward done
in the same process. The in-process tests check each rank's weight loaders without communication.
"""

from __future__ import annotations

import queue
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from rollout.attention.registry import create_attention_backend
from rollout.cache.kv_pool import KVPool
from rollout.config import ModelConfig
from rollout.distributed import TPGroup, kv_heads_per_rank
from rollout.errors import InvalidArgumentError
from rollout.layers.embedding import LMHead, VocabEmbedding
from rollout.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from rollout.layers.moe import FusedMoE
from rollout.models.loader import load_model
from rollout.testing.random_model import write_random_model
from tests.unit.test_models import make_batch, ours_logits, prompts

TOL = 1e-4
TP = 2
# name -> (arch, write_random_model options); every shape divides TP (the vocab need not).
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    # One kv head for two ranks (replicated), three query heads per rank, an odd vocab (padded slice).
    "llama-kv1": ("llama", {"num_attention_heads": 6, "num_key_value_heads": 1, "vocab_size": 383}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"num_key_value_heads": 1}),
    "qwen3_moe": ("qwen3_moe", {"mlp_only_layers": [0]}),
    "mixtral": ("mixtral", {}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(config: ModelConfig, tp_size: int):
    heads = kv_heads_per_rank(config.num_key_value_heads, tp_size)
    pool = KVPool(config.num_hidden_layers, 64, heads, config.head_dim, torch.float32, "cpu")
    return create_attention_backend("torch", pool)


def _two_steps(model, config: ModelConfig, tp_size: int) -> torch.Tensor:
    """Prefill three prompts (one only partly), then extend / decode from the cached prefixes."""
    seqs = prompts(config.vocab_size, (7, 3, 5), seed=4)
    slots = [list(range(1, 8)), list(range(20, 23)), list(range(40, 45))]
    backend = _backend(config, tp_size)
    first = ours_logits(model, make_batch(backend, [(seqs[0][:4], 0, slots[0]), (seqs[1][:2], 0, slots[1])]))
    second = ours_logits(
        model, make_batch(backend, [(seqs[0], 4, slots[0]), (seqs[1], 2, slots[1]), (seqs[2], 0, slots[2])])
    )
    return torch.cat([first, second])  # (6 + 9, vocab)


def _rank_main(rank: int, port: int, paths: dict[str, str], results) -> None:
    """One rank: every case at tp=2 and at tp=1; reports (rank, case, max |diff| or error text)."""
    import torch.distributed as dist

    from rollout.distributed import tp_group_from_default

    torch.set_num_threads(1)  # two ranks share the machine's cores
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
        tp = tp_group_from_default()
        for name, path in paths.items():
            config = ModelConfig.from_pretrained(path)
            sharded = _two_steps(load_model(config, path, torch.float32, "cpu", tp=tp), config, TP)
            single = _two_steps(load_model(config, path, torch.float32, "cpu"), config, 1)
            ok_shape = sharded.shape == single.shape == (15, config.vocab_size)
            results.put((rank, name, (sharded - single).abs().max().item() if ok_shape else f"shape {sharded.shape}"))
        dist.destroy_process_group()
    except Exception:  # the parent reports it; an unreported failure would only show as a timeout
        results.put((rank, "error", traceback.format_exc()))


def test_two_ranks_match_single_rank(tmp_path):
    paths = {
        name: write_random_model(str(tmp_path / name), arch, **opts) for name, (arch, opts) in CASES.items()
    }
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, paths, results), daemon=True) for r in range(TP)]
    for p in procs:
        p.start()
    got: dict[tuple[int, str], float | str] = {}
    try:
        while len(got) < TP * len(CASES):
            rank, name, value = results.get(timeout=120)
            assert name != "error", f"rank {rank} failed:\n{value}"
            got[(rank, name)] = value
    except queue.Empty:
        pytest.fail(f"ranks stopped answering; got {sorted(got)}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for (rank, name), diff in got.items():
        assert isinstance(diff, float) and diff < TOL, (rank, name, diff)


# In-process checks of each rank's loaders: the ranks' shards put together are the full weights.

KW = {"dtype": torch.float32, "device": "cpu"}


def _rank(r: int, n: int = TP) -> TPGroup:
    return TPGroup(r, n)  # no process group: the loaders never communicate


def test_qkv_replicates_the_kv_head_each_rank_needs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * 2, 8, generator=gen) for n in (8, 2, 2))  # Hq 8, Hkv 2, head_dim 2
    for r in range(4):
        layer = QKVParallelLinear(8, 2, 8, 2, prefix="qkv", tp=_rank(r, 4), **KW)
        for shard, t in (("q", q), ("k", k), ("v", v)):
            layer.weight_loader(layer.weight, t, shard)
        kv_head = r // 2  # ranks 0, 1 serve q heads 0-3 (kv head 0); ranks 2, 3 q heads 4-7 (kv head 1)
        assert torch.equal(layer.weight[:4], q[4 * r : 4 * r + 4])
        assert torch.equal(layer.weight[4:6], k[2 * kv_head : 2 * kv_head + 2])
        assert torch.equal(layer.weight[6:8], v[2 * kv_head : 2 * kv_head + 2])
        fused = QKVParallelLinear(8, 2, 8, 2, prefix="qkv", tp=_rank(r, 4), **KW)
        fused.weight_loader(fused.weight, torch.cat([q, k, v]))  # a refit by our own (fused) name
        assert torch.equal(fused.weight, layer.weight)


def test_row_and_merged_column_shards_reassemble():
    gen = torch.Generator().manual_seed(1)
    gate, up, down, bias = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(
        4, 6, generator=gen), torch.randn(4, generator=gen)
    parts = []
    for r in range(TP):
        merged = MergedColumnParallelLinear(4, [6, 6], tp=_rank(r), **KW)
        merged.weight_loader(merged.weight, torch.cat([gate, up]))
        assert torch.equal(merged.weight, torch.cat([gate[3 * r : 3 * r + 3], up[3 * r : 3 * r + 3]]))
        row = RowParallelLinear(6, 4, bias=True, tp=_rank(r), **KW)
        row.weight_loader(row.weight, down)
        row.weight_loader(row.bias, bias)
        assert torch.equal(row.bias, bias)  # not split: added once, after the sum
        parts.append(row.weight.clone())
    assert torch.equal(torch.cat(parts, dim=1), down)
    with pytest.raises(InvalidArgumentError, match=r"expected \(4, 6\), got \(4, 3\)"):
        row.weight_loader(row.weight, down[:, :3])


def test_vocab_slices_pad_the_last_rank():
    table = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
    emb = VocabEmbedding(5, 3, prefix="e", tp=_rank(1), **KW)
    emb.weight_loader(emb.weight, table)
    assert emb.vocab_start == 3 and torch.equal(emb.weight, torch.cat([table[3:], torch.zeros(1, 3)]))
    head = LMHead(5, 3, prefix="h", tp=_rank(1), **KW)
    head.weight_loader(head.weight, table)
    assert torch.equal(head.weight, emb.weight)


def test_expert_intermediate_split():
    gen = torch.Generator().manual_seed(2)
    w13, w2 = torch.randn(3, 8, 4, generator=gen), torch.randn(3, 4, 4, generator=gen)  # E 3, I 4, H 4
    for r in range(TP):
        per_expert = FusedMoE(3, 4, 4, tp=_rank(r), **KW)
        stacked = FusedMoE(3, 4, 4, tp=_rank(r), **KW)
        for e in range(3):
            per_expert.weight_loader(per_expert.w13, w13[e, :4], "w1", e)
            per_expert.weight_loader(per_expert.w13, w13[e, 4:], "w3", e)
            per_expert.weight_loader(per_expert.w2, w2[e], "w2", e)
        stacked.weight_loader(stacked.w13, w13)
        stacked.weight_loader(stacked.w2, w2)
        rows = slice(2 * r, 2 * r + 2)
        assert torch.equal(per_expert.w13, torch.cat([w13[:, :4][:, rows], w13[:, 4:][:, rows]], dim=1))
        assert torch.equal(per_expert.w2, w2[:, :, rows])
        assert torch.equal(stacked.w13, per_expert.w13) and torch.equal(stacked.w2, per_expert.w2)


def test_bad_group_and_head_counts_are_typed_errors():
    with pytest.raises(InvalidArgumentError, match="tp_rank"):
        TPGroup(2, 2)
    with pytest.raises(InvalidArgumentError, match="num_key_value_heads"):
        QKVParallelLinear(8, 2, 6, 3, tp=_rank(0), **KW)  # 3 kv heads over 2 ranks
    with pytest.raises(InvalidArgumentError, match="not all divisible"):
        MergedColumnParallelLinear(4, [3, 5], prefix="gate_up", tp=_rank(0), **KW)  # sum divides, parts do not
