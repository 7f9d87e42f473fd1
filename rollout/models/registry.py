"""Model family -> implementation; imports happen inside the factories."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rollout.config import ModelConfig
from rollout.distributed.tp import SINGLE, TPGroup
from rollout.errors import InvalidArgumentError


def _build_llama(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, tp: TPGroup) -> nn.Module:
    from rollout.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(config, dtype, device, tp=tp)


def _build_moe(config: ModelConfig, dtype: torch.dtype, device: torch.device | str, tp: TPGroup) -> nn.Module:
    from rollout.models.moe import MoeForCausalLM

    return MoeForCausalLM(config, dtype, device, tp=tp)


MODEL_FACTORIES: dict[str, Callable[[ModelConfig, torch.dtype, torch.device | str, TPGroup], nn.Module]] = {
    "llama": _build_llama,
    "moe": _build_moe,
}


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device | str, tp: TPGroup = SINGLE
) -> nn.Module:
    """An uninitialised causal LM for ``config`` (weights come from ``load_weights``), holding the
    shard of rank ``tp.rank`` of every weight."""
    factory = MODEL_FACTORIES.get(config.family)
    if factory is None:
        raise InvalidArgumentError(
            f"no model for family {config.family!r}; known: {sorted(MODEL_FACTORIES)}", field="architectures"
        )
    return factory(config, dtype, device, tp)
