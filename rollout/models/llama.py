"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3), driven by ``ModelConfig`` flags.

Qwen2 adds a bias to q/k/v (``attention_bias``); Qwen3 RMS-normalises each head of q and k before
the rotary embedding (``qk_norm``). The MLP of each layer is built by a factory so the MoE models
reuse this decoder with routed experts in place of the dense MLP.

Tensor parallelism is the layers' business: each takes the model's ``TPGroup``, holds its shard and
does its own communication, so this file only sizes the attention by the heads of this rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

from rollout.batch import ForwardBatch
from rollout.config import ModelConfig
from rollout.distributed.tp import SINGLE, TPGroup
from rollout.layers.activation import SiluAndMul
from rollout.layers.attention import Attention
from rollout.layers.embedding import LMHead, VocabEmbedding
from rollout.layers.fused_ops import use_fused
from rollout.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from rollout.layers.norm import RMSNorm
from rollout.layers.rotary import RotaryEmbedding, apply_rotary
from rollout.layers.weight_prefetch import WeightPrefetch
from rollout.models.weights import CheckpointNameMap, load_named_weights


class StepRope(NamedTuple):
    """The rotary inputs of one step, shared by every layer: the fused kernel reads the tables at
    ``positions``; the torch path uses ``cos`` and ``sin`` (T, 1, head_dim), gathered once a step."""

    positions: torch.Tensor  # (T,) int64
    cos_cache: torch.Tensor  # (P, head_dim) float32
    sin_cache: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None


def step_rope(table: RotaryEmbedding, positions: torch.Tensor, hidden: torch.Tensor) -> StepRope:
    """The rotary inputs of a step at ``positions`` (T,) for activations like ``hidden`` (T, H): the
    fused kernel's tables where it applies, else cos and sin gathered once for every layer."""
    head_dim = table.head_dim
    if use_fused(hidden) and head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0:
        return StepRope(positions, table.cos_cache, table.sin_cache, None, None)
    return StepRope(positions, table.cos_cache, table.sin_cache,
                    *table.cos_sin(positions, hidden.dtype))  # 2 x (T, 1, D)


# (layer_id, prefix) -> the layer's MLP module, mapping (T, H) -> (T, H).
MlpFactory = Callable[[int, str], nn.Module]


class LlamaMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one matmul."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, dtype=dtype, device=device, prefix=f"{prefix}.gate_up_proj", tp=tp
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, dtype=dtype, device=device, prefix=f"{prefix}.down_proj", tp=tp
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.gate_up_proj.silu_and_mul(x)  # a few rows: the activation fused into the matmul
        if hidden is None:
            hidden = self.act(self.gate_up_proj(x))
        return self.down_proj(hidden)  # (T, H)


class LlamaAttention(nn.Module):
    """Self-attention: fused qkv projection, optional per-head q/k norm, rotary, paged attention."""

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
            dtype=dtype,
            device=device,
            prefix=f"{prefix}.qkv_proj",
            tp=tp,
        )
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            dtype=dtype,
            device=device,
            prefix=f"{prefix}.o_proj",
            tp=tp,
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(
                self.head_dim, config.rms_norm_eps, dtype=dtype, device=device, prefix=f"{prefix}.q_norm"
            )
            self.k_norm = RMSNorm(
                self.head_dim, config.rms_norm_eps, dtype=dtype, device=device, prefix=f"{prefix}.k_norm"
            )
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_id, self.head_dim**-0.5)

    def forward(self, rope: StepRope, qkv: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """The layer's output (T, H) from its qkv projection (T, q_size + 2 * kv_size), which the
        decoder layer computes (it may take the norm before it into the matmul)."""
        t = qkv.shape[0]
        if rope.cos is None:  # decode steps: norm, rotary, KV store and attention in one pass where offered
            from kernels.attention import NewTokenRope

            has_norm = self.q_norm is not None and self.k_norm is not None
            new_token = NewTokenRope(
                rope.positions, rope.cos_cache, rope.sin_cache, self.q_norm.weight if has_norm else None,
                self.k_norm.weight if has_norm else None, self.q_norm.eps if has_norm else 1e-6, batch.out_cache_loc,
            )
            out = self.attn.forward_decode_qkv(qkv, new_token, batch)
            if out is not None:
                return self.o_proj(out)
        if rope.cos is None:  # fused: q/k norm and rotary in one kernel, in place
            from kernels.fused import qk_norm_rope_

            # The same kernel stores k and v in the layer's cache when it holds the model's dtype.
            pool = batch.attn_backend.kv_pool
            layer = self.attn.layer_id
            kv_cache = None
            if pool.dtype == qkv.dtype and qkv.stride(0) == qkv.shape[1]:
                kv_cache = (pool.k_buffers[layer], pool.v_buffers[layer], batch.out_cache_loc)
            qk_norm_rope_(
                qkv, rope.positions, rope.cos_cache, rope.sin_cache, self.num_heads, self.num_kv_heads,
                self.head_dim,
                self.q_norm.weight if self.q_norm is not None else None,
                self.k_norm.weight if self.k_norm is not None else None,
                self.q_norm.eps if self.q_norm is not None else 1e-6,
                kv_cache=kv_cache,
            )
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            return self.o_proj(self.attn(q, k, v, batch, kv_stored=kv_cache is not None))  # (T, H)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = apply_rotary(q, k, rope.cos, rope.sin)
        out = self.attn(q, k, v, batch)  # (T, Hq * D)
        return self.o_proj(out)  # (T, H)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, with fused residual adds."""

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        mlp: nn.Module,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = LlamaAttention(
            config, layer_id, dtype=dtype, device=device, prefix=f"{prefix}.self_attn", tp=tp
        )
        self.mlp = mlp
        self._mlp_reads_batch = bool(getattr(mlp, "reads_batch", False))  # e.g. MoE: records its routing
        self.input_layernorm = RMSNorm(
            config.hidden_size, eps, dtype=dtype, device=device, prefix=f"{prefix}.input_layernorm"
        )
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps, dtype=dtype, device=device, prefix=f"{prefix}.post_attention_layernorm"
        )
        later = [self.self_attn.o_proj.weight]
        if isinstance(mlp, LlamaMLP):
            later += [mlp.gate_up_proj.weight, mlp.down_proj.weight]
        self.prefetch = WeightPrefetch(later)

    def forward(
        self,
        rope: StepRope,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp output, residual stream before it)``; their sum is the layer's output.

        At a few rows each norm goes into the skinny matmul after it where that was measured
        faster (``forward_normed``): then no norm kernel runs and the normed rows are never stored."""
        attn_norm, mlp_norm = self.input_layernorm, self.post_attention_layernorm
        fused = self.self_attn.qkv_proj.forward_normed(hidden, residual, attn_norm.weight, attn_norm.eps) \
            if _takes_norm_into_matmul(attn_norm) else None
        if fused is not None:
            qkv, residual = fused
        else:
            if residual is None:
                residual = hidden
                hidden = attn_norm(hidden)
            else:
                hidden, residual = attn_norm(hidden, residual)
            qkv = self.self_attn.qkv_proj(hidden)
        self.prefetch.start(qkv)  # a few rows: the weights after attention into L2 while it runs
        hidden = self.self_attn(rope, qkv, batch)
        fused = None
        if isinstance(self.mlp, LlamaMLP) and _takes_norm_into_matmul(mlp_norm):
            fused = self.mlp.gate_up_proj.silu_and_mul_normed(hidden, residual, mlp_norm.weight, mlp_norm.eps)
        if fused is not None:
            act, residual = fused
            out = self.mlp.down_proj(act)
        else:
            hidden, residual = mlp_norm(hidden, residual)
            out = self.mlp(hidden, batch) if self._mlp_reads_batch else self.mlp(hidden)
        self.prefetch.join()
        return out, residual


def _takes_norm_into_matmul(norm: nn.Module) -> bool:
    """Whether a layer norm may go into the matmul after it: an RMSNorm (the EAGLE head's first
    layer has none), not on the batch-invariant path (its own kernels)."""
    return isinstance(norm, RMSNorm) and not norm.batch_invariant


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm."""

    def __init__(
        self,
        config: ModelConfig,
        mlp_factory: MlpFactory,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(
            config.vocab_size, config.hidden_size, dtype=dtype, device=device, prefix="model.embed_tokens", tp=tp
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                config,
                i,
                mlp_factory(i, f"model.layers.{i}.mlp"),
                dtype=dtype,
                device=device,
                prefix=f"model.layers.{i}",
                tp=tp,
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device, prefix="model.norm"
        )
        # One cos/sin table for all layers (it is max_position x head_dim floats).
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope, device=device
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(batch.input_ids)  # (T, H)
        rope = step_rope(self.rotary_emb, batch.positions, hidden)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual, batch)
        if residual is None:  # a model without layers
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden  # (T, H)


class LlamaForCausalLM(nn.Module):
    """A dense (or, with another ``mlp_factory``, MoE) causal LM with the engine's model interface.

    ``tp``: the tensor-parallel group this replica of the model is one rank of (one rank by default);
    the model then holds this rank's shard of every weight and its logits are the full vocabulary's.
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        mlp_factory: MlpFactory | None = None,
        expert_style: str | None = None,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        if mlp_factory is None:

            def mlp_factory(layer_id: int, prefix: str) -> nn.Module:
                return LlamaMLP(
                    config.hidden_size, config.intermediate_size, dtype=dtype, device=device, prefix=prefix, tp=tp
                )

        self.model = LlamaModel(config, mlp_factory, dtype=dtype, device=device, tp=tp)
        tie = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size, dtype=dtype, device=device, prefix="lm_head", tie_to=tie, tp=tp
        )
        self.name_map = CheckpointNameMap(
            (n for n, _ in self.named_parameters()), config.tie_word_embeddings, expert_style
        )

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final-normed hidden states (T, hidden) of ``batch.input_ids`` at ``batch.positions``
        (also written to ``batch.feature_store`` at the tokens' KV slots when it is set)."""
        hidden = self.model(batch)
        if batch.feature_store is not None:
            # Here rather than in the runner: every forward (eager, decode and verify graphs, whose
            # captures then hold the write) goes through this line.
            batch.feature_store.index_copy_(0, batch.out_cache_loc, hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) logits, float32 unless ``upcast`` is False (then the model dtype:
        the same values, half the bytes for the sampler to read, no conversion pass)."""
        return self.lm_head(hidden, upcast=upcast)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     coverage: dict[str, set] | None = None) -> set[str]:
        """Copy HF-named tensors into our parameters in place; returns our names fully written (with
        ``coverage``, counting the shards earlier calls of one update wrote: ``load_named_weights``).

        Raises ``InvalidArgumentError`` naming unknown checkpoint keys or a key of the wrong shape.
        """
        return load_named_weights(self, self.name_map, weights, self.config.num_experts, coverage)

    def param_names_for_checkpoint(self) -> dict[str, list[str]]:
        """Our parameter name -> the checkpoint keys (per-expert layout for MoE) that fill it."""
        return {
            name: self.name_map.checkpoint_names(name, self.config.num_experts)
            for name, _ in self.named_parameters()
        }
