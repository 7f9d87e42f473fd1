"""flashinfer attention against the torch reference through full model forwards (bf16), and decode CUDA graphs.

Each step runs on both backends from identical KV pools (the reference pool takes flashinfer's after
every step, so bf16 differences do not compound) and compares the logits of every new token.
"""

from __future__ import annotations

import random

import pytest
import torch

from rollout import Engine, SamplingParams
from rollout.attention.registry import create_attention_backend, default_attention_backend
from rollout.attention.torch_ref import TorchReferenceBackend
from rollout.batch import ForwardBatch
from rollout.cache.kv_pool import KVPool
from rollout.config import ModelConfig
from rollout.errors import InvalidArgumentError
from rollout.models.loader import load_model
from rollout.runner.cuda_graph import DecodeGraphRunner

pytestmark = pytest.mark.gpu
pytest.importorskip("flashinfer")

from rollout.attention.flashinfer_backend import FlashInferBackend  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.bfloat16
# Relative (Frobenius) error of logits. Rounding the softmax weights to bf16 before the PV product, as
# flash-attention kernels do, alone moves these random bf16 models' logits by about 1%.
REL_TOL = 3e-2
GRAPH_TOL = 2e-2  # graph replay vs eager: same kernels, possibly another KV split for padded batches
NUM_SLOTS = 4096
# GQA group 2 decodes on flashinfer's CUDA-core kernel, group 4 on its tensor-core kernel.
SHAPES = {"gqa2": (8, 4), "gqa4": (16, 4)}

Request = tuple[list[int], int, list[int]]  # (all token ids, cached prefix length, KV slot of every position)


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request, tiny_model_dir):
    heads, kv_heads = SHAPES[request.param]
    path = tiny_model_dir(
        "qwen3",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=128,
        vocab_size=512,
        init_std=0.08,
    )
    config = ModelConfig.from_pretrained(path)
    return config, load_model(config, path, DTYPE, DEVICE)


def new_pool(config: ModelConfig) -> KVPool:
    return KVPool(config.num_hidden_layers, NUM_SLOTS, config.num_key_value_heads, config.head_dim, DTYPE, DEVICE)


def make_batch(backend, requests: list[Request]) -> ForwardBatch:
    """Tokens after each request's cached prefix are new; logits are taken at every new token."""
    ids, pos, out_loc, kv_indices, extend, seq, prefix = [], [], [], [], [], [], []
    for tokens, cached, slots in requests:
        ids += tokens[cached:]
        pos += range(cached, len(tokens))
        out_loc += slots[cached : len(tokens)]
        kv_indices += slots[: len(tokens)]
        extend.append(len(tokens) - cached)
        seq.append(len(tokens))
        prefix.append(cached)

    def tensor(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=DEVICE)

    def indptr(lens: list[int]) -> torch.Tensor:
        return tensor([0] + torch.tensor(lens).cumsum(0).tolist(), torch.int32)

    return ForwardBatch(
        input_ids=tensor(ids),
        positions=tensor(pos),
        out_cache_loc=tensor(out_loc),
        qo_indptr=indptr(extend),
        kv_indptr=indptr(seq),
        kv_indices=tensor(kv_indices),
        seq_lens=tensor(seq, torch.int32),
        logits_indices=torch.arange(len(ids), device=DEVICE),
        seq_lens_cpu=seq,
        extend_lens_cpu=extend,
        prefix_lens_cpu=prefix,
        attn_backend=backend,
    )


@torch.inference_mode()
def run_logits(model, backend, requests: list[Request]) -> torch.Tensor:
    batch = make_batch(backend, requests)
    backend.prepare(batch)
    return model.compute_logits(model(batch)[batch.logits_indices])  # (new tokens, vocab) float32


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


class SlotPool:
    """Scattered, non-contiguous KV slots (slot 0 stays the padding slot)."""

    def __init__(self, seed: int) -> None:
        self.free = (torch.randperm(NUM_SLOTS - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()

    def take(self, n: int) -> list[int]:
        out, self.free = self.free[:n], self.free[n:]
        return out


class Lockstep:
    """Runs every step on flashinfer and on the reference, starting both from the same KV pool."""

    def __init__(self, config: ModelConfig, model) -> None:
        self.model = model
        self.fi = FlashInferBackend(new_pool(config))
        self.ref = TorchReferenceBackend(new_pool(config))

    def step(self, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        ref = run_logits(self.model, self.ref, requests)
        ours = run_logits(self.model, self.fi, requests)
        for dst, src in zip(
            self.ref.kv_pool.k_buffers + self.ref.kv_pool.v_buffers,
            self.fi.kv_pool.k_buffers + self.fi.kv_pool.v_buffers,
        ):
            dst.copy_(src)
        return ours, ref


def test_prefill_extend_and_decode_match_reference(model) -> None:
    config, m = model
    rng = random.Random(0)
    slots = SlotPool(seed=1)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, config.vocab_size) for _ in range(n)]

    shared = tokens(48)  # one prompt's prefix, reused from the KV of the request that computed it
    seqs = {
        "a": shared + tokens(20),
        "b": shared + tokens(7),
        "c": shared + tokens(1),
        "d": tokens(131),
        "e": tokens(1),
    }
    kv = {"a": slots.take(68), "d": slots.take(140), "e": slots.take(1)}
    kv["b"] = kv["a"][:48] + slots.take(7)
    kv["c"] = kv["a"][:48] + slots.take(1)
    lock = Lockstep(config, m)

    # Prefill with ragged lengths (68, 131 of its 140, 1), no cached prefix.
    ours, ref = lock.step([(seqs["a"], 0, kv["a"]), (seqs["d"][:131], 0, kv["d"]), (seqs["e"], 0, kv["e"])])
    assert ours.shape == ref.shape == (68 + 131 + 1, config.vocab_size)
    assert rel_err(ours, ref) < REL_TOL

    # A mixed batch: b and c extend a's cached prefix, d continues its chunked prefill, a decodes.
    seqs["d"] += tokens(9)
    seqs["a"] += tokens(1)
    kv["a"] += slots.take(1)
    ours, ref = lock.step(
        [(seqs["b"], 48, kv["b"]), (seqs["c"], 48, kv["c"]), (seqs["d"], 131, kv["d"]), (seqs["a"], 68, kv["a"])]
    )
    assert ours.shape[0] == 7 + 1 + 9 + 1
    assert rel_err(ours, ref) < REL_TOL

    # Decode steps over every request (lengths 2 to 146), greedy on the reference's logits.
    names = ["b", "c", "d", "a", "e"]
    next_ids = ref[[6, 7, 16, 17]].argmax(-1).tolist() + [rng.randrange(3, config.vocab_size)]
    for _ in range(6):
        for name, tok in zip(names, next_ids):
            seqs[name].append(tok)
            kv[name] += slots.take(1)
        ours, ref = lock.step([(seqs[n], len(seqs[n]) - 1, kv[n]) for n in names])
        assert ours.shape == (len(names), config.vocab_size)
        assert rel_err(ours, ref) < REL_TOL
        next_ids = ref.argmax(-1).tolist()


def test_cuda_graph_replay_equals_eager(model) -> None:
    config, m = model
    rng = random.Random(2)
    slots = SlotPool(seed=3)
    backend = FlashInferBackend(new_pool(config))
    runner = DecodeGraphRunner(
        m, backend, max_bs=8, max_kv_tokens=2048, device=torch.device(DEVICE), batch_sizes=[1, 2, 4, 8]
    )
    lens = [5, 70, 33, 1, 129, 12, 64, 9]
    seqs = [[rng.randrange(3, config.vocab_size) for _ in range(n)] for n in lens]
    kv = [slots.take(n) for n in lens]
    run_logits(m, backend, [(s, 0, k) for s, k in zip(seqs, kv)])  # prefill, eager
    runner.capture()

    for bs in (3, 8, 1, 4, 3):  # 3 pads to the graph of 4; repeated sizes replay with new lengths
        for s, k in zip(seqs[:bs], kv[:bs]):
            s.append(rng.randrange(3, config.vocab_size))
            k += slots.take(1)
        batch = make_batch(backend, [(s, len(s) - 1, k) for s, k in zip(seqs[:bs], kv[:bs])])
        with torch.inference_mode():
            backend.prepare(batch)
            eager = m.compute_logits(m(batch))  # (bs, vocab)
            graphed = m.compute_logits(runner.run(batch))
        assert graphed.shape == eager.shape == (bs, config.vocab_size)
        assert rel_err(graphed, eager) < GRAPH_TOL


def test_engine_with_flashinfer_and_graphs(tiny_model_dir) -> None:
    path = tiny_model_dir(
        "qwen3",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=512,
    )
    rng = random.Random(4)
    shared = [rng.randrange(3, 500) for _ in range(40)]
    ps = [(shared if i % 2 else []) + [rng.randrange(3, 500) for _ in range(rng.randrange(5, 60))] for i in range(6)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    opts = dict(device="cuda", dtype="bfloat16", attention_backend="flashinfer")
    with Engine(path, cuda_graph_max_bs=8, **opts) as graphed:
        outs = graphed.generate(ps, sp, return_logprob=True)
        graphed.check_integrity()
    with Engine(path, cuda_graph_max_bs=0, **opts) as eager:
        ref = eager.generate(ps, sp, return_logprob=True)
    for o, r in zip(outs, ref):
        assert len(o.output_ids) == len(r.output_ids) == 12
        # The first token comes from the same eager prefill in both engines.
        assert o.output_ids[0] == r.output_ids[0]
        assert abs(o.output_logprobs[0] - r.output_logprobs[0]) < 1e-3


def test_registry_and_validation(model) -> None:
    config, _ = model
    assert isinstance(create_attention_backend("flashinfer", new_pool(config)), FlashInferBackend)
    assert default_attention_backend("cuda") == "flashinfer"
    assert default_attention_backend(torch.device("cpu")) == "torch"
    pool = KVPool(1, 16, config.num_key_value_heads, config.head_dim, torch.float32, DEVICE)
    with pytest.raises(InvalidArgumentError, match="dtype"):
        FlashInferBackend(pool)
