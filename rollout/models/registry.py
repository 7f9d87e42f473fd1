"""Model family -> implementation; imports happen inside the factories."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rollout.config import ModelConfig
from rollout.errors import InvalidArgumentError


def _build_llama(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    from rollout.models.llama import LlamaForCausalLM

    return LlamaForCausalLM(config, dtype, device)


def _build_moe(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    from rollout.models.moe import MoeForCausalLM

    return MoeForCausalLM(config, dtype, device)


MODEL_FACTORIES: dict[str, Callable[[ModelConfig, torch.dtype, torch.device | str], nn.Module]] = {
    "llama": _build_llama,
    "moe": _build_moe,
}


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """An uninitialised causal LM for ``config`` (weights come from ``load_weights``)."""
    factory = MODEL_FACTORIES.get(config.family)
    if factory is None:
        raise InvalidArgumentError(
            f"no model for family {config.family!r}; known: {sorted(MODEL_FACTORIES)}", field="architectures"
        )
    return factory(config, dtype, device)
