"""The shape of a model, read from a Hugging Face ``config.json`` (``ModelConfig``, ``RopeConfig``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from rollout.errors import InvalidArgumentError, quoted

# Architectures whose checkpoints we can load, mapped to the model family that implements them.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "moe",
    "MixtralForCausalLM": "moe",
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF ``rope_theta`` / ``rope_scaling``)."""

    theta: float = 10000.0
    # "default" or "llama3" (Llama 3.1 frequency scaling) or "linear".
    scaling_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, as read from a Hugging Face config.json."""

    architecture: str  # e.g. "Qwen3ForCausalLM"
    model_type: str  # e.g. "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (also Mixtral's per-expert width)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: always)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3)
    # Mixture of experts; num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    mlp_only_layers: tuple[int, ...] = ()  # Qwen3-MoE layers that use a dense MLP
    decoder_sparse_step: int = 1
    # Attention window (Mistral); we attend fully, so the context is capped at the window.
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"

    @property
    def family(self) -> str:
        """Model family implementing this architecture: "llama" (dense) or "moe"."""
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_sparse(self, layer_id: int) -> bool:
        """Whether ``layer_id`` uses routed experts (Qwen3-MoE can mix dense layers in)."""
        if not self.is_moe or layer_id in self.mlp_only_layers:
            return False
        return (layer_id + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """The decoder layers with routed experts, in order: the layer axis of routed-expert output."""
        return tuple(i for i in range(self.num_hidden_layers) if self.layer_is_sparse(i))

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, at the model dtype."""
        itemsize = 2 if self.torch_dtype in ("bfloat16", "float16") else 4
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * itemsize

    @classmethod
    def from_pretrained(cls, model_path: str) -> ModelConfig:
        """Read ``config.json`` (and ``generation_config.json`` for EOS ids) from a model directory."""
        cfg_path = os.path.join(model_path, "config.json")
        if not os.path.isfile(cfg_path):
            raise InvalidArgumentError(
                f"no config.json in {quoted(model_path)}: give a Hugging Face model directory (config.json, "
                "*.safetensors, tokenizer.json) or a Hub id such as 'Qwen/Qwen3-0.6B'", field="model_path")
        with open(cfg_path) as f:
            hf = json.load(f)
        gen: dict[str, Any] = {}
        gen_path = os.path.join(model_path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen = json.load(f)
        return cls.from_hf_dict(hf, gen)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], gen: dict[str, Any] | None = None) -> ModelConfig:
        """Build from the parsed config.json (and optional generation_config.json)."""
        gen = gen or {}
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise InvalidArgumentError(
                f"unsupported architectures {archs}; supported: {sorted(SUPPORTED_ARCHITECTURES)}",
                field="architectures",
            )
        model_type = hf.get("model_type", "")
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        head_dim = hf.get("head_dim") or hidden // heads
        rope_params = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or {}
        if not scaling and rope_params.get("rope_type", "default") != "default":
            scaling = rope_params
        theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if scaling_type not in ("default", "llama3", "linear"):
            raise InvalidArgumentError(f"rope scaling {quoted(scaling_type)} is not supported", field="rope_scaling")
        rope = RopeConfig(
            theta=float(theta),
            scaling_type=scaling_type,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
        eos = gen.get("eos_token_id", hf.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 0)) or 0)
        if model_type == "mixtral" or arch == "MixtralForCausalLM":
            moe_inter = int(hf["intermediate_size"])
        else:
            moe_inter = int(hf.get("moe_intermediate_size", 0) or 0)
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            num_experts=num_experts,
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 0) or 0),
            moe_intermediate_size=moe_inter,
            # HF's Qwen3-MoE defaults to False when the key is absent; Mixtral always renormalises.
            norm_topk_prob=bool(hf.get("norm_topk_prob", arch != "Qwen3MoeForCausalLM")),
            sliding_window=int(hf["sliding_window"]) if hf.get("sliding_window") and hf.get(
                "use_sliding_window", True) else None,
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            decoder_sparse_step=int(hf.get("decoder_sparse_step", 1) or 1),
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            torch_dtype=str(dtype),
        )
