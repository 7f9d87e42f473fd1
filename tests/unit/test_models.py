"""Our models against Hugging Face transformers on small random checkpoints, and the loader's checks."""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout.attention.registry import create_attention_backend
from rollout.batch import ForwardBatch
from rollout.cache.kv_pool import KVPool
from rollout.config import ModelConfig
from rollout.errors import InvalidArgumentError
from rollout.layers.moe import FusedMoE, fused_experts, select_experts
from rollout.models.loader import iter_checkpoint, load_model
from rollout.testing.random_model import write_random_model

TOL = 1e-4
# (arch, extra config); the variants reach rope scaling and Qwen3-MoE's dense-layer / routing options.
VARIANTS = {
    "llama": ("llama", {}),
    "llama-rope-llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen2": ("qwen2", {}),
    "qwen2-rope-linear": (
        "qwen2",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-dense-layer": ("qwen3_moe", {"mlp_only_layers": [0], "norm_topk_prob": False}),
    "mixtral": ("mixtral", {}),
}


def make_batch(backend, requests: list[tuple[list[int], int, list[int]]]) -> ForwardBatch:
    """Requests as (all token ids, cached prefix length, KV slot of every position); the tokens after
    the prefix are the new ones. Logits are taken at every new token."""
    ids, pos, out_loc, kv_indices, extend, seq, prefix = [], [], [], [], [], [], []
    for tokens, cached, slots in requests:
        ids += tokens[cached:]
        pos += range(cached, len(tokens))
        out_loc += slots[cached : len(tokens)]
        kv_indices += slots[: len(tokens)]
        extend.append(len(tokens) - cached)
        seq.append(len(tokens))
        prefix.append(cached)

    def indptr(lens: list[int]) -> torch.Tensor:
        return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)

    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(pos),
        out_cache_loc=torch.tensor(out_loc),
        qo_indptr=indptr(extend),
        kv_indptr=indptr(seq),
        kv_indices=torch.tensor(kv_indices),
        seq_lens=torch.tensor(seq, dtype=torch.int32),
        logits_indices=torch.arange(len(ids)),
        seq_lens_cpu=seq,
        extend_lens_cpu=extend,
        prefix_lens_cpu=prefix,
        attn_backend=backend,
    )
    backend.prepare(batch)
    return batch


def new_backend(config: ModelConfig, num_slots: int = 128):
    pool = KVPool(
        config.num_hidden_layers, num_slots, config.num_key_value_heads, config.head_dim, torch.float32, "cpu"
    )
    return create_attention_backend("torch", pool)


@torch.no_grad()
def ours_logits(model, batch: ForwardBatch) -> torch.Tensor:
    return model.compute_logits(model(batch)[batch.logits_indices])


@torch.no_grad()
def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()  # (L, vocab)


def prompts(vocab: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (path, ModelConfig, our model, HF model), built on first use."""
    from transformers import AutoModelForCausalLM

    made: dict[str, tuple] = {}

    def get(variant: str) -> tuple:
        if variant not in made:
            arch, extra = VARIANTS[variant]
            path = write_random_model(str(tmp_path_factory.mktemp(variant)), arch, **extra)
            config = ModelConfig.from_pretrained(path)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            made[variant] = (path, config, load_model(config, path, torch.float32, "cpu"), hf)
        return made[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_matches_hf(models, variant):
    _, config, model, hf = models(variant)
    seqs = prompts(config.vocab_size, (7, 3, 12))
    slots, start = [], 1
    for s in seqs:
        slots.append(list(range(start, start + len(s))))
        start += len(s)
    logits = ours_logits(
        model, make_batch(new_backend(config), [(s, 0, sl) for s, sl in zip(seqs, slots, strict=True)])
    )
    expected = torch.cat([hf_logits(hf, s) for s in seqs])
    assert logits.dtype == torch.float32 and logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < TOL


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_extend_from_cached_prefix_matches_hf(models, variant):
    _, config, model, hf = models(variant)
    seqs = prompts(config.vocab_size, (9, 6, 5), seed=2)
    # Scattered, non-contiguous slots so the gather through kv_indices is exercised.
    perm = (torch.randperm(60, generator=torch.Generator().manual_seed(3)) + 1).tolist()
    slots = [perm[0:9], perm[20:26], perm[40:45]]
    backend = new_backend(config)
    # Step 1: prefill the first tokens of requests 0 and 1 only.
    cut = [5, 5]
    ours_logits(model, make_batch(backend, [(seqs[i][: cut[i]], 0, slots[i]) for i in range(2)]))
    # Step 2: request 0 extends by 4, request 1 decodes one token, request 2 arrives with no prefix.
    step2 = [(seqs[0], 5, slots[0]), (seqs[1], 5, slots[1]), (seqs[2], 0, slots[2])]
    logits = ours_logits(model, make_batch(backend, step2))
    expected = torch.cat([hf_logits(hf, seqs[0])[5:], hf_logits(hf, seqs[1])[5:], hf_logits(hf, seqs[2])])
    assert logits.shape == expected.shape == (4 + 1 + 5, config.vocab_size)
    assert (logits - expected).abs().max().item() < TOL


def test_hf_state_dict_refit_matches(models):
    """transformers 5 names (fused experts.gate_up_proj / down_proj) load through the same path."""
    path, config, _, hf = models("qwen3_moe")
    model = load_model(config, path, torch.float32, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    written = model.load_weights(hf.state_dict().items())
    assert written == {name for name, _ in model.named_parameters()}
    seqs = prompts(config.vocab_size, (6,))
    logits = ours_logits(model, make_batch(new_backend(config), [(seqs[0], 0, list(range(1, 7)))]))
    assert (logits - hf_logits(hf, seqs[0])).abs().max().item() < TOL


def _rewrite(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def _load(path: str):
    return load_model(ModelConfig.from_pretrained(path), path, torch.float32, "cpu")


def test_missing_key_is_named(tmp_path):
    path = write_random_model(str(tmp_path), "qwen3")
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        InvalidArgumentError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.weight"
    ) as exc:
        _load(path)
    assert "q_proj" not in str(exc.value)


def test_missing_expert_is_named(tmp_path):
    path = write_random_model(str(tmp_path), "mixtral")
    _rewrite(path, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(InvalidArgumentError, match=r"block_sparse_moe\.experts\.2\.w3\.weight"):
        _load(path)


def test_unexpected_key_is_named(tmp_path):
    path = write_random_model(str(tmp_path), "llama")
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.foo.weight": torch.zeros(2)}))
    with pytest.raises(InvalidArgumentError, match=r"model\.layers\.0\.self_attn\.foo\.weight"):
        _load(path)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.0.self_attn.v_proj.bias", (7,)),
        # Wrong shapes that broadcast: an in-place copy_ alone would accept them and fill the parameter.
        ("model.layers.0.self_attn.v_proj.bias", (1,)),
        ("model.norm.weight", (1,)),
        ("model.layers.0.self_attn.k_proj.weight", (1, 64)),
        ("model.layers.1.self_attn.o_proj.weight", (1, 64)),
    ],
)
def test_wrong_shape_is_named(tmp_path, name, shape):
    path = write_random_model(str(tmp_path), "qwen2")
    _rewrite(path, lambda t: t.update({name: torch.ones(shape)}))
    with pytest.raises(InvalidArgumentError, match=re.escape(name) + ".*" + re.escape(str(shape))):
        _load(path)


def test_sharded_checkpoint_loads_identically(tmp_path):
    single = write_random_model(str(tmp_path / "single"), "qwen3_moe", seed=5)
    sharded = write_random_model(str(tmp_path / "sharded"), "qwen3_moe", seed=5, max_shard_bytes=40_000)
    assert len(glob.glob(os.path.join(sharded, "model-*.safetensors"))) > 2
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    a, b = dict(_load(single).named_parameters()), dict(_load(sharded).named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_match_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_random_model(str(tmp_path), "qwen3", tie_word_embeddings=True)
    assert "lm_head.weight" not in dict(iter_checkpoint(path))
    model = _load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seq = prompts(model.config.vocab_size, (8,))[0]
    logits = ours_logits(model, make_batch(new_backend(model.config), [(seq, 0, list(range(1, 9)))]))
    assert (logits - hf_logits(hf, seq)).abs().max().item() < TOL


def test_second_load_is_in_place(tmp_path):
    path = write_random_model(str(tmp_path), "mixtral")
    model = _load(path)
    before = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    written = model.load_weights(iter_checkpoint(path))
    assert written == set(before)
    for name, p in model.named_parameters():
        assert p.data_ptr() == before[name][0], name
        assert torch.equal(p, before[name][1]), name


def test_unknown_attention_backend_lists_known():
    pool = KVPool(1, 4, 1, 8, torch.float32, "cpu")
    with pytest.raises(InvalidArgumentError, match="torch"):
        create_attention_backend("nope", pool)


def test_select_experts_renormalises():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 3.5, 0.0]])
    w, ids = select_experts(logits, 2, renormalize=True)
    assert ids.tolist() == [[0, 1], [2, 1]]
    assert torch.allclose(w, torch.softmax(logits.gather(1, ids), dim=-1))
    w_raw, _ = select_experts(logits, 2, renormalize=False)
    assert torch.allclose(w_raw, torch.softmax(logits, dim=-1).gather(1, ids))


def test_fused_experts_matches_dense_sum():
    gen = torch.Generator().manual_seed(0)
    t, h, inter, e, k = 9, 8, 6, 5, 2
    hidden = torch.randn(t, h, generator=gen)
    w13, w2 = torch.randn(e, 2 * inter, h, generator=gen), torch.randn(e, h, inter, generator=gen)
    weights, ids = select_experts(torch.randn(t, e, generator=gen), k, renormalize=True)
    expected = torch.zeros(t, h)
    for i in range(t):
        for j in range(k):
            gu = w13[ids[i, j]] @ hidden[i]
            expected[i] += weights[i, j] * (
                w2[ids[i, j]] @ (torch.nn.functional.silu(gu[:inter]) * gu[inter:])
            )
    assert torch.allclose(fused_experts(hidden, w13, w2, weights, ids), expected, atol=1e-5)


def test_expert_loader_rejects_bad_shard_and_expert():
    moe = FusedMoE(2, 4, 3, dtype=torch.float32, device="cpu", prefix="layers.0.mlp.experts")
    moe.w13.weight_loader(moe.w13, torch.ones(3, 4), "w3", 1)
    assert moe.w13[1, 3:].eq(1).all()
    with pytest.raises(InvalidArgumentError, match=r"experts\.w13"):
        moe.w13.weight_loader(moe.w13, torch.ones(3, 4), "w2", 0)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        moe.w2.weight_loader(moe.w2, torch.ones(4, 3), "w2", 2)
    with pytest.raises(InvalidArgumentError, match=r"\(4, 3\).*\(3, 4\)"):
        moe.w2.weight_loader(moe.w2, torch.ones(3, 4), "w2", 0)


@pytest.mark.parametrize("variant", ["llama-rope-llama3", "qwen2", "qwen3", "qwen3_moe"])
def test_fused_kernel_path_matches_hf(models, variant, monkeypatch):
    """The decoder with its fused kernels (RMSNorm, SiLU-and-mul, q/k norm + rotary); on CPU they run
    in Triton's interpreter."""
    pytest.importorskip("triton")
    from rollout.layers import fused_ops

    monkeypatch.setattr(fused_ops, "MODE", "all")
    _, config, model, hf = models(variant)
    seqs = prompts(config.vocab_size, (7, 3), seed=4)
    slots = [list(range(1, 8)), list(range(8, 11))]
    logits = ours_logits(model, make_batch(new_backend(config), [(s, 0, sl) for s, sl in zip(seqs, slots)]))
    expected = torch.cat([hf_logits(hf, s) for s in seqs])
    assert (logits - expected).abs().max().item() < TOL


def test_a_tied_head_alone_writes_the_embedding(tmp_path):
    """A trainer may name the tied tensor ``lm_head.weight``: it fills the embedding, never dropped;
    beside the embedding it is skipped (transformers keeps the embedding)."""
    path = write_random_model(str(tmp_path), "qwen3", tie_word_embeddings=True)
    model = _load(path)
    emb = model.model.embed_tokens.weight
    new = torch.randn_like(emb)
    assert "model.embed_tokens.weight" in model.load_weights([("lm_head.weight", new)])
    assert torch.equal(emb, new) and model.lm_head.weight is emb
    kept = torch.randn_like(emb)
    model.load_weights([("lm_head.weight", torch.zeros_like(emb)), ("model.embed_tokens.weight", kept)])
    assert torch.equal(emb, kept)
    with pytest.raises(InvalidArgumentError, match=r"^lm_head\.weight: "):
        model.load_weights([("lm_head.weight", torch.zeros(3, 4))])
