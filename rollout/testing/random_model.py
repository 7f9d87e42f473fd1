"""Writes a small random model as a Hugging Face directory (no transformers import needed).

The directory holds config.json, generation_config.json, safetensors weights (one file, or shards
plus model.safetensors.index.json) with HF tensor names, and a byte-level BPE tokenizer
(tokenizer.json, tokenizer_config.json with a ChatML chat template that takes tools). Everything is
deterministic in ``seed``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rollout.errors import InvalidArgumentError, quoted
from rollout.testing.chat_format import CHATML_TOOLS_TEMPLATE

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|endoftext|>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Merges are learned from this text, so common English pieces become single tokens.
_CORPUS = """The quick brown fox jumps over the lazy dog. A rollout service generates text for
reinforcement learning. Each request has a prompt, and the model writes new tokens one at a time.
The engine keeps the keys and values of past tokens in a cache, shares the prompt of many samples,
and returns the log probability of every token it samples. When the trainer sends new weights, the
engine pauses, loads them in place, and continues. Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 1000
appear in math problems: what is 12 plus 30? The answer is 42. Write a short story about a robot
that learns to read, then answer the question: where is the library of the town on the hill?
"""


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE: 256 byte tokens, merges learned from a built-in text, then the special tokens."""
    budget = vocab_size - len(SPECIAL_TOKENS)
    if budget < 256:
        raise InvalidArgumentError(
            f"must be >= {256 + len(SPECIAL_TOKENS)} for a byte-level tokenizer", field="vocab_size"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=budget, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # appended after the learned vocabulary
    return tok


def _hf_config(
    arch: str, sizes: dict[str, Any], eos_id: int, dtype: str, extra: dict[str, Any]
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": sizes["vocab_size"],
        "hidden_size": sizes["hidden_size"],
        "intermediate_size": sizes["intermediate_size"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_attention_heads": sizes["num_attention_heads"],
        "num_key_value_heads": sizes["num_key_value_heads"],
        "head_dim": sizes["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": sizes["max_position_embeddings"],
        "initializer_range": sizes["init_std"],
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": sizes["tie_word_embeddings"],
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "dtype": dtype,
    }
    if arch in ("llama", "qwen3", "qwen3_moe"):
        cfg["attention_bias"] = False
    if arch == "llama":
        cfg["mlp_bias"] = False
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None)
    if arch == "mixtral":
        cfg.update(
            num_local_experts=sizes["num_experts"],
            num_experts_per_tok=sizes["num_experts_per_tok"],
            sliding_window=None,
            router_jitter_noise=0.0,
        )
    if arch == "qwen3_moe":
        cfg.update(
            num_experts=sizes["num_experts"],
            num_experts_per_tok=sizes["num_experts_per_tok"],
            moe_intermediate_size=sizes["moe_intermediate_size"],
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    cfg.update(extra)
    return cfg


def _random_weights(
    arch: str, cfg: dict[str, Any], gen: torch.Generator, std: float
) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors for ``cfg``; MoE experts in the per-expert layout."""

    def normal(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * scale

    def norm_weight(n: int) -> torch.Tensor:
        return 1.0 + normal(n, scale=0.1)  # near 1 but not 1, so a misplaced norm shows up

    hidden, head_dim = cfg["hidden_size"], cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden, scale=1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            w[f"{p}.self_attn.{name}.weight"] = normal(out, hidden)
            if arch == "qwen2" or cfg.get("attention_bias"):
                w[f"{p}.self_attn.{name}.bias"] = normal(out)
        w[f"{p}.self_attn.o_proj.weight"] = normal(hidden, q_out)
        if arch in ("qwen3", "qwen3_moe"):
            w[f"{p}.self_attn.q_norm.weight"] = norm_weight(head_dim)
            w[f"{p}.self_attn.k_norm.weight"] = norm_weight(head_dim)
        w[f"{p}.input_layernorm.weight"] = norm_weight(hidden)
        w[f"{p}.post_attention_layernorm.weight"] = norm_weight(hidden)
        sparse = arch == "mixtral" or (
            arch == "qwen3_moe"
            and i not in cfg["mlp_only_layers"]
            and (i + 1) % cfg["decoder_sparse_step"] == 0
        )
        if not sparse:
            inter = cfg["intermediate_size"]
            w[f"{p}.mlp.gate_proj.weight"] = normal(inter, hidden)
            w[f"{p}.mlp.up_proj.weight"] = normal(inter, hidden)
            w[f"{p}.mlp.down_proj.weight"] = normal(hidden, inter)
            continue
        num_experts = cfg["num_local_experts"] if arch == "mixtral" else cfg["num_experts"]
        block, (gate, up, down) = (
            ("block_sparse_moe", ("w1", "w3", "w2"))
            if arch == "mixtral"
            else ("mlp", ("gate_proj", "up_proj", "down_proj"))
        )
        inter = cfg["intermediate_size"] if arch == "mixtral" else cfg["moe_intermediate_size"]
        w[f"{p}.{block}.gate.weight"] = normal(num_experts, hidden, scale=1.0)  # spread-out routing
        for e in range(num_experts):
            w[f"{p}.{block}.experts.{e}.{gate}.weight"] = normal(inter, hidden)
            w[f"{p}.{block}.experts.{e}.{up}.weight"] = normal(inter, hidden)
            w[f"{p}.{block}.experts.{e}.{down}.weight"] = normal(hidden, inter)
    w["model.norm.weight"] = norm_weight(hidden)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(cfg["vocab_size"], hidden)
    return w


def _save_weights(path: str, weights: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    if max_shard_bytes is None:
        save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_random_model(
    path: str,
    arch: str = "qwen3",
    *,
    seed: int = 0,
    vocab_size: int = 384,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 32,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
    init_std: float = 0.05,
    write_weights: bool = True,
    **extra_config: Any,
) -> str:
    """Write a random ``arch`` model (llama, qwen2, qwen3, qwen3_moe, mixtral) to ``path``; returns ``path``.

    ``extra_config`` entries are merged into config.json last (e.g. ``rope_parameters``,
    ``mlp_only_layers``, ``norm_topk_prob``). Mixtral's per-expert width is ``intermediate_size``
    (its HF meaning); Qwen3-MoE's is ``moe_intermediate_size``. ``write_weights=False`` writes only
    the config and tokenizer, for engines started with ``load_format="dummy"`` (large benchmark shapes).
    """
    if arch not in ARCHITECTURES:
        raise InvalidArgumentError(f"unknown {quoted(arch)}; known: {sorted(ARCHITECTURES)}", field="arch")
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"must be one of {sorted(_DTYPES)}", field="dtype")
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    eos_id = tok.token_to_id(EOS_TOKEN)
    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        moe_intermediate_size=moe_intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        init_std=init_std,
    )
    cfg = _hf_config(arch, sizes, eos_id, dtype, extra_config)
    if write_weights:
        gen = torch.Generator().manual_seed(seed)
        weights = _random_weights(arch, cfg, gen, init_std)
        weights = {name: t.to(_DTYPES[dtype]).contiguous() for name, t in weights.items()}
        _save_weights(path, weights, max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos_id, "bos_token_id": None, "pad_token_id": None}, f, indent=2)
    tok.save(os.path.join(path, "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "bos_token": None,
        "model_max_length": max_position_embeddings,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHATML_TOOLS_TEMPLATE,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    return path
