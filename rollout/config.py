"""Frozen configuration dataclasses.

``ModelConfig`` is read from a Hugging Face ``config.json``; the others are engine options. Every
user-facing option is checked in ``__post_init__`` and a bad value raises ``InvalidArgumentError``
naming the option.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from rollout.errors import InvalidArgumentError, quoted

# The engine's releasable memory, by tag: model parameters, the KV pool, CUDA-graph buffers.
MEMORY_TAGS: tuple[str, ...] = ("weights", "kv_cache", "cuda_graph")

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


@dataclass(frozen=True)
class CacheConfig:
    """KV cache sizing."""

    page_size: int = 1  # token slots per page; radix matches are rounded down to whole pages
    # Total token slots in the pool. None: derived from kv_memory_fraction (GPU) or a CPU default.
    max_total_tokens: int | None = None
    kv_memory_fraction: float = 0.85  # share of free GPU memory given to KV after weights load
    enable_prefix_cache: bool = True
    # Memory tags (weights, kv_cache, cuda_graph) copied to host memory on release_memory, restored on resume.
    memory_backup_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tags = self.memory_backup_tags
        object.__setattr__(self, "memory_backup_tags", (tags,) if isinstance(tags, str) else tuple(tags))
        for tag in self.memory_backup_tags:
            if tag not in MEMORY_TAGS:
                raise InvalidArgumentError(f"unknown memory tag {quoted(tag)}; use {list(MEMORY_TAGS)}",
                                           field="memory_backup_tags")
        if self.page_size < 1:
            raise InvalidArgumentError("must be >= 1", field="page_size")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise InvalidArgumentError("must hold at least one page", field="max_total_tokens")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise InvalidArgumentError("must be in (0, 1]", field="kv_memory_fraction")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits."""

    max_running_requests: int = 256  # cap on requests decoding at once
    # Token budget of one forward step (decode + prefill chunks). 16384 rather than 8192: half as many
    # prompt steps, each with the same host work (H100, Qwen3-0.6B offline workload: 19,164 /
    # 19,364 vs 18,871 / 18,865 output tok/s, mean TTFT 284 vs ~390 ms, same host).
    max_num_batched_tokens: int = 16384
    chunked_prefill_size: int = 4096  # longest prefill chunk of one request in one step
    max_queued_requests: int = 100_000  # beyond this new requests get RESOURCE_EXHAUSTED
    # Prepare step k+1 on the host while the device runs step k (inputs that are step k's samples
    # are read on the device); tokens are the same either way.
    overlap_schedule: bool = True

    def __post_init__(self) -> None:
        for name in ("max_running_requests", "max_num_batched_tokens", "chunked_prefill_size",
                     "max_queued_requests"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError("must be >= 1", field=name)
        if self.max_num_batched_tokens < self.max_running_requests:
            # Every running request needs one token of budget per decode step.
            object.__setattr__(self, "max_num_batched_tokens", self.max_running_requests)


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor / expert parallel sizes (multi-GPU execution arrives with the distributed runner)."""

    tp_size: int = 1
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size != 1 or self.ep_size != 1:
            raise InvalidArgumentError("only 1 is supported in this build", field="tp_size/ep_size")


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding (None: off)."""

    method: str | None = None
    num_draft_tokens: int = 0

    def __post_init__(self) -> None:
        if self.method is not None:
            raise InvalidArgumentError("speculative decoding is not available in this build",
                                       field="speculative_method")


def _check_device(name: Any) -> None:
    """Refuse a device that is not cpu / cuda / cuda:N, or a CUDA device this machine does not have."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"must be cpu, cuda or cuda:N (got {quoted(name)})", field="device")
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise InvalidArgumentError(f"no CUDA device is available on this machine (got {quoted(name)}); "
                                   "use cpu", field="device")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InvalidArgumentError(f"{device} is out of range: this machine has {count} CUDA devices",
                                   field="device")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from."""

    model_path: str
    model: ModelConfig
    device: str = "cpu"
    dtype: str = "float32"  # compute and KV dtype: float32 | bfloat16 | float16
    attention_backend: str = "auto"  # auto (flashinfer > triton on CUDA, torch on CPU) | torch | triton | flashinfer
    seed: int = 0  # seeds sampling of requests that carry no seed of their own
    cuda_graph_max_bs: int = 256  # decode batches up to this size replay CUDA graphs (0: off)
    load_format: str = "auto"  # "auto": the checkpoint; "dummy": random weights (benchmarks of large shapes)
    context_length: int = 0  # 0: the model's max_position_embeddings
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)

    def __post_init__(self) -> None:
        _check_device(self.device)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidArgumentError("must be float32, bfloat16 or float16", field="dtype")
        if self.load_format not in ("auto", "dummy"):
            raise InvalidArgumentError("must be 'auto' or 'dummy'", field="load_format")
        if self.cuda_graph_max_bs < 0:
            raise InvalidArgumentError("must be >= 0", field="cuda_graph_max_bs")
        if self.context_length < 0:
            raise InvalidArgumentError("must be >= 0", field="context_length")
        if self.context_length == 0:
            limit = self.model.max_position_embeddings
            if self.model.sliding_window:
                limit = min(limit, self.model.sliding_window)
            object.__setattr__(self, "context_length", limit)

    @classmethod
    def build(cls, model_path: str, **options: Any) -> EngineConfig:
        """Build from a model directory and flat keyword options; unknown options are rejected."""
        groups = {"cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig}
        by_group: dict[str, dict[str, Any]] = {g: {} for g in groups}
        own = {f.name for f in fields(cls)} - {"model", "model_path", *groups, "spec"}
        top: dict[str, Any] = {}
        spec: dict[str, Any] = {}
        for key, value in options.items():
            if key in own:
                top[key] = value
                continue
            if key in ("speculative_method", "num_draft_tokens"):
                spec["method" if key == "speculative_method" else key] = value
                continue
            for g, gcls in groups.items():
                if key in {f.name for f in fields(gcls)}:
                    by_group[g][key] = value
                    break
            else:
                raise InvalidArgumentError("unknown engine option", field=key)
        model = ModelConfig.from_pretrained(model_path)
        return cls(
            model_path=model_path,
            model=model,
            cache=CacheConfig(**by_group["cache"]),
            scheduler=SchedulerConfig(**by_group["scheduler"]),
            parallel=ParallelConfig(**by_group["parallel"]),
            spec=SpecConfig(**spec),
            **top,
        )
