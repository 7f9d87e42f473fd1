"""Frozen configuration dataclasses.

``ModelConfig`` (``rollout.model_config``) is read from a Hugging Face ``config.json``; the others are
engine options. Every
user-facing option is checked in ``__post_init__`` and a bad value raises ``InvalidArgumentError``
naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from rollout.errors import InvalidArgumentError, quoted
from rollout.model_config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig

__all__ = ["SUPPORTED_ARCHITECTURES", "MEMORY_TAGS", "ModelConfig", "RopeConfig", "CacheConfig", "SchedulerConfig",
           "ParallelConfig", "SpecConfig", "EngineConfig"]

# The engine's releasable memory, by tag: model parameters, the KV pool, CUDA-graph buffers.
MEMORY_TAGS: tuple[str, ...] = ("weights", "kv_cache", "cuda_graph")

# Routed expert ids are recorded and returned as int16.
ROUTED_EXPERT_ID_LIMIT = 1 << 15


_NUMBERS = {"int": (int,), "float": (int, float), "bool": (bool,)}


def _check_types(obj: Any, names: dict[str, str] | None = None) -> None:
    """Refuse an int, float or bool option of another type, naming it (``names``: field -> option
    name): a float in an int option, or "false" in a bool one, would otherwise be taken and fail
    (or mean true) later. A bool is no int; an int is a float."""
    for f in fields(obj):
        kinds = [k.strip() for k in str(f.type).split("|")]
        wanted = [k for k in kinds if k in _NUMBERS]
        if not wanted or len(wanted) + ("None" in kinds) != len(kinds):
            continue  # other types are checked where they are read
        value = getattr(obj, f.name)
        if value is None and "None" in kinds:
            continue
        if not any(isinstance(value, _NUMBERS[k]) and (k == "bool" or not isinstance(value, bool)) for k in wanted):
            allowed = " or ".join(wanted + (["None"] if "None" in kinds else []))
            name = (names or {}).get(f.name, f.name)
            raise InvalidArgumentError(f"must be {allowed}, got {quoted(value)}", field=name)


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
        _check_types(self)
        tags = self.memory_backup_tags
        if tags is None or not isinstance(tags, (str, tuple, list)):
            raise InvalidArgumentError(f"must be a list of memory tags, got {quoted(tags)}", field="memory_backup_tags")
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
        _check_types(self)
        for name in ("max_running_requests", "max_num_batched_tokens", "chunked_prefill_size",
                     "max_queued_requests"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError("must be >= 1", field=name)
        if self.max_num_batched_tokens < self.max_running_requests:
            # Every running request needs one token of budget per decode step.
            object.__setattr__(self, "max_num_batched_tokens", self.max_running_requests)


@dataclass(frozen=True)
class ParallelConfig:
    """Engine ranks, one process (and one GPU) each.

    ``tp_size`` ranks split attention, dense MLPs and every expert (tensor parallelism);
    ``ep_size`` ranks split attention the same way but give each rank whole experts (expert
    parallelism), ``ep_spare_slots`` extra expert slots per rank for copies of hot experts.
    With both set they must be equal: the same ranks do both.
    """

    tp_size: int = 1
    ep_size: int = 1
    ep_spare_slots: int = 0
    ep_rebalance_interval: int = 0  # rebalance the experts every this many steps (0: only on request)

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("tp_size", "ep_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
                raise InvalidArgumentError(f"must be an integer in 1..64, got {quoted(v)}", field=name)
        if self.tp_size > 1 and self.ep_size > 1 and self.tp_size != self.ep_size:
            raise InvalidArgumentError(
                f"tp_size {self.tp_size} and ep_size {self.ep_size}: attention is tensor-parallel over the "
                "expert-parallel ranks, so give one of them or equal values", field="ep_size")
        if not isinstance(self.ep_rebalance_interval, int) or self.ep_rebalance_interval < 0:
            raise InvalidArgumentError("must be an integer >= 0", field="ep_rebalance_interval")
        if self.ep_rebalance_interval and not self.expert_parallel:
            raise InvalidArgumentError("needs ep_size > 1", field="ep_rebalance_interval")
        if not isinstance(self.ep_spare_slots, int) or not 0 <= self.ep_spare_slots <= 1024:
            raise InvalidArgumentError(f"must be in 0..1024, got {quoted(self.ep_spare_slots)}", field="ep_spare_slots")

    @property
    def ranks(self) -> int:
        """Engine ranks (processes)."""
        return max(self.tp_size, self.ep_size)

    @property
    def expert_parallel(self) -> bool:
        return self.ep_size > 1

    def check_model(self, model: ModelConfig) -> None:
        """Refuse a rank count the model's heads cannot be split over."""
        if self.expert_parallel and not model.is_moe:
            raise InvalidArgumentError(f"{model.architecture} has no experts to partition", field="ep_size")
        tp = self.ranks
        if model.num_attention_heads % tp:
            raise InvalidArgumentError(
                f"{model.num_attention_heads} attention heads do not divide over {tp} ranks", field="tp_size")
        kv = model.num_key_value_heads
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            raise InvalidArgumentError(
                f"{kv} key/value heads and {tp} ranks: one must be a multiple of the other", field="tp_size")


# Speculative drafting methods. "oracle" is for benchmarks only: it stands for a drafter whose
# drafts the target accepts with a given probability, and its output is NOT the target's distribution.
SPEC_METHODS: tuple[str, ...] = ("ngram", "draft", "eagle", "oracle")
# Engine options (``Engine(**options)``, ``rollout serve`` flags) -> SpecConfig fields.
SPEC_OPTIONS: dict[str, str] = {
    "speculative_method": "method",
    "num_draft_tokens": "num_draft_tokens",
    "draft_model_path": "draft_model_path",
    "speculative_max_batch_size": "max_batch_size",
    "speculative_min_acceptance": "min_acceptance",
    "draft_on_stale_weights": "on_stale_weights",
    "ngram_max_match": "ngram_max_match",
    "ngram_min_match": "ngram_min_match",
    "oracle_acceptance": "oracle_acceptance",
}


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding (``method=None``: off). Output distribution and logprobs are the target's."""

    method: str | None = None  # ngram | draft | eagle | oracle (benchmarks only)
    num_draft_tokens: int = 4  # drafts per sequence per step, at most (adaptive: fewer, or none)
    # Method "draft": a small HF model dir with the target's tokenizer; "eagle": an EAGLE head's dir
    # (config.json and its weights, made for this target model).
    draft_model_path: str | None = None
    # Speculate only while at most this many sequences run or wait: a large batch is compute-bound and
    # verifying rejected drafts costs more than the forwards it saves.
    max_batch_size: int = 32
    # Acceptance rate (accepted / drafted, a running average) under which drafts shrink to one token.
    min_acceptance: float = 0.3
    # Methods "draft" / "eagle", once the target's weights change and the draft's are not pushed ("draft." names):
    # "disable" stops speculating (output stays exact, only slower); "keep" drafts with the old draft.
    on_stale_weights: str = "disable"
    ngram_max_match: int = 4  # longest suffix looked up in the prompt and output (method "ngram")
    ngram_min_match: int = 1
    oracle_acceptance: float = 0.8  # method "oracle": probability each draft is taken as accepted

    def __post_init__(self) -> None:
        _check_types(self, {field: option for option, field in SPEC_OPTIONS.items()})
        if self.method is None:
            return
        if self.method not in SPEC_METHODS:
            raise InvalidArgumentError(f"unknown method {quoted(self.method)}; use one of {list(SPEC_METHODS)}",
                                       field="speculative_method")
        if not 1 <= self.num_draft_tokens <= 16:
            raise InvalidArgumentError("must be in [1, 16]", field="num_draft_tokens")
        if self.method in ("draft", "eagle") and not self.draft_model_path:
            raise InvalidArgumentError(f"method {quoted(self.method)} needs draft_model_path", field="draft_model_path")
        if self.max_batch_size < 0:
            raise InvalidArgumentError("must be >= 0", field="speculative_max_batch_size")
        if not 0.0 <= self.min_acceptance <= 1.0:
            raise InvalidArgumentError("must be in [0, 1]", field="speculative_min_acceptance")
        if self.on_stale_weights not in ("disable", "keep"):
            raise InvalidArgumentError("must be 'disable' or 'keep'", field="draft_on_stale_weights")
        if not 1 <= self.ngram_min_match <= self.ngram_max_match <= 64:
            raise InvalidArgumentError("need 1 <= ngram_min_match <= ngram_max_match <= 64",
                                       field="ngram_min_match" if self.ngram_min_match < 1 else "ngram_max_match")
        if not 0.0 <= self.oracle_acceptance <= 1.0:
            raise InvalidArgumentError("must be in [0, 1]", field="oracle_acceptance")


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
    deterministic: bool = False  # batch-invariant kernels: see rollout.layers.batch_invariant
    fp32_lm_head: bool = False  # logits from float32 hidden states and LM head weights (not the model dtype)
    context_length: int = 0  # 0: the model's max_position_embeddings
    # Record every MoE layer's top-k expert ids with the KV (an int16 row per token slot), so that
    # requests can ask for them (return_routed_experts); off: no recording at all.
    enable_return_routed_experts: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_device(self.device)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidArgumentError("must be float32, bfloat16 or float16", field="dtype")
        if self.load_format not in ("auto", "dummy"):
            raise InvalidArgumentError("must be 'auto' or 'dummy'", field="load_format")
        if self.cuda_graph_max_bs < 0:
            raise InvalidArgumentError("must be >= 0", field="cuda_graph_max_bs")
        # Not covered: expert kernels, cross-rank sums (order follows message size), flashinfer's splits.
        why = ("dense models" if self.model.is_moe else "one rank" if self.parallel.ranks > 1
               else "torch or triton attention" if self.attention_backend == "flashinfer" else None)
        if self.deterministic and why:
            raise InvalidArgumentError(f"deterministic mode needs {why}", field="deterministic")
        if self.context_length < 0:
            raise InvalidArgumentError("must be >= 0", field="context_length")
        self.parallel.check_model(self.model)
        if self.spec.method is not None and self.parallel.ranks > 1:
            # The verify and draft steps run on rank 0's runner alone; the other ranks never see them.
            raise InvalidArgumentError("speculative decoding runs on one rank for now; use tp_size = ep_size = 1",
                                       field="speculative_method")
        if self.spec.method is not None and self.enable_return_routed_experts:
            # Verify steps record no routing rows, so the rows would fall out of line with the tokens.
            raise InvalidArgumentError("speculative decoding does not return routed experts; turn one of them off",
                                       field="speculative_method")
        if self.enable_return_routed_experts and not self.model.moe_layer_ids:
            raise InvalidArgumentError(
                f"the model ({self.model.architecture}) has no MoE layers, so it has no routed experts to return",
                field="enable_return_routed_experts")
        if self.enable_return_routed_experts and self.model.num_experts > ROUTED_EXPERT_ID_LIMIT:
            raise InvalidArgumentError(
                f"{self.model.num_experts} experts do not fit the int16 expert ids of routed-expert output",
                field="enable_return_routed_experts")
        limit = self.model.max_position_embeddings
        if self.model.sliding_window:  # sliding-window attention is not implemented: attend within it
            limit = min(limit, self.model.sliding_window)
        if self.context_length > limit:
            raise InvalidArgumentError(
                f"the model attends over at most {limit} positions (max_position_embeddings"
                f"{', sliding_window' if self.model.sliding_window else ''}); give at most {limit}",
                field="context_length")
        if self.context_length == 0:
            object.__setattr__(self, "context_length", limit)

    @property
    def request_table_shape(self) -> tuple[int, int]:
        """(rows, positions) of the request -> KV slot table, the same on every rank."""
        return self.scheduler.max_running_requests + 1, self.context_length + self.cache.page_size

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
            if key in SPEC_OPTIONS:
                spec[SPEC_OPTIONS[key]] = value
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
