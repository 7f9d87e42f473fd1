"""MoE causal LMs: Qwen3-MoE (with dense ``mlp_only_layers`` / ``decoder_sparse_step``) and Mixtral.

They are the Llama decoder with a ``SparseMoeBlock`` as the MLP of sparse layers.
"""

from __future__ import annotations

import torch
from torch import nn

from rollout.config import ModelConfig
from rollout.distributed.tp import SINGLE, TPGroup
from rollout.layers.moe import SparseMoeBlock
from rollout.models.llama import LlamaForCausalLM, LlamaMLP


def _is_mixtral(config: ModelConfig) -> bool:
    return config.architecture == "MixtralForCausalLM" or config.model_type == "mixtral"


class MoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE / Mixtral: routed experts in sparse layers, a dense MLP in the others."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str, tp: TPGroup = SINGLE
    ) -> None:
        mixtral = _is_mixtral(config)
        # Mixtral always renormalises its top-k weights (softmax over the chosen logits).
        renormalize = True if mixtral else config.norm_topk_prob

        moe_layers = config.moe_layer_ids

        def mlp_factory(layer_id: int, prefix: str) -> nn.Module:
            if config.layer_is_sparse(layer_id):
                return SparseMoeBlock(
                    config.num_experts,
                    config.num_experts_per_tok,
                    config.hidden_size,
                    config.moe_intermediate_size,
                    renormalize,
                    dtype=dtype,
                    device=device,
                    prefix=prefix,
                    tp=tp,
                    moe_index=moe_layers.index(layer_id),
                )
            return LlamaMLP(
                config.hidden_size, config.intermediate_size, dtype=dtype, device=device, prefix=prefix, tp=tp
            )

        super().__init__(
            config, dtype, device, mlp_factory=mlp_factory, expert_style="mixtral" if mixtral else "qwen3_moe", tp=tp
        )
