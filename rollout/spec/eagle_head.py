"""An EAGLE draft head (the EAGLE-1 / EAGLE-2 format) and its loading from a Hugging Face directory.

The head is one (or a few) Llama decoder layers that run beside the target, reading the target's
features. For draft index ``i`` it takes token ``x_{i+1}`` and the feature ``f_i``::

    h = fc(cat(embed(x_{i+1}), f_i))        # (T, 2H) -> (T, H)
    h = decoder layers(h), rotary at i      # attention over the head's own KV of indices <= i
    logits = lm_head(h)                     # predicts x_{i+2}; h stands in for f_{i+1} next

``f_i`` is the target's final hidden state at position ``i`` AFTER its final norm (the tensor the
target's LM head reads; ``ForwardBatch.feature_store``). That is what the published heads were
trained on: SafeAILab's EAGLE feeds the base model's last hidden state, the one it also passes to
the LM head, and vLLM and SGLang feed the target's model output, which ends with the final norm.

The directory holds ``config.json`` (a Llama config, usually ``num_hidden_layers: 1``) and the
weights (``*.safetensors`` or ``pytorch_model*.bin``, the latter read with ``weights_only=True``):
``fc.weight`` (H, 2H) and ``fc.bias`` if present, ``layers.N.self_attn.{q,k,v,o}_proj.weight``,
``layers.N.mlp.{gate,up,down}_proj.weight``, ``layers.N.post_attention_layernorm.weight``, and
``layers.N.input_layernorm.weight`` for N > 0 (q/k/v biases too where the config says ``qkv_bias``
or ``attention_bias``). Layer 0 has no input norm in the format (identity);
a file that has one gets it used. ``embed_tokens.weight`` and ``lm_head.weight`` are optional: the
head without them uses the target's embedding and LM head (shared, not copied; a weight push of the
target's changes the head's too). There is no final norm. A leading ``model.`` on the names is
accepted (some conversions add it).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from rollout.batch import ForwardBatch
from rollout.config import ModelConfig
from rollout.errors import InvalidArgumentError, quoted
from rollout.layers.embedding import LMHead, VocabEmbedding
from rollout.layers.linear import ReplicatedLinear
from rollout.layers.rotary import RotaryEmbedding
from rollout.models.llama import LlamaDecoderLayer, LlamaMLP, step_rope
from rollout.models.loader import checkpoint_files, iter_checkpoint
from rollout.models.weights import CheckpointNameMap, WeightTarget, load_named_weights

FIELD = "draft_model_path"


@dataclass(frozen=True)
class HeadLayout:
    """Which optional parts a head's checkpoint has."""

    fc_bias: bool
    input_norm: bool  # layer 0's input_layernorm (absent in the EAGLE-1 format: identity)
    embed: bool  # its own embed_tokens (else the target's)
    lm_head: bool  # its own lm_head (else the target's)

    @classmethod
    def of(cls, names: Iterable[str]) -> HeadLayout:
        keys = {n.removeprefix("model.") for n in names}
        return cls(fc_bias="fc.bias" in keys, input_norm="layers.0.input_layernorm.weight" in keys,
                   embed="embed_tokens.weight" in keys, lm_head="lm_head.weight" in keys)


@dataclass(frozen=True)
class TargetParts:
    """The target's modules a head without its own uses. Not an ``nn.Module``: the target's parameters
    stay out of the head's ``named_parameters`` (its arena, its ``draft.`` names)."""

    embed: nn.Module
    lm_head: nn.Module


class EagleNameMap(CheckpointNameMap):
    """The head's checkpoint names, with or without a leading ``model.``."""

    def target(self, name: str) -> WeightTarget | None:
        return super().target(name.removeprefix("model."))


class EagleHead(nn.Module):
    """fc, decoder layers, and the LM head (its own or the target's); see the module doc."""

    def __init__(self, config: ModelConfig, layout: HeadLayout, dtype: torch.dtype, device: torch.device | str,
                 target: TargetParts | None, max_position: int) -> None:
        """``target``: the target's parts (None only on the meta device, where nothing runs);
        ``max_position``: rotary positions to cover (the engine's context length or more)."""
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.layout = layout
        self.fc = ReplicatedLinear(2 * h, h, bias=layout.fc_bias, dtype=dtype, device=device, prefix="fc")

        def layer(i: int) -> LlamaDecoderLayer:
            mlp = LlamaMLP(h, config.intermediate_size, dtype=dtype, device=device, prefix=f"layers.{i}.mlp")
            return LlamaDecoderLayer(config, i, mlp, dtype=dtype, device=device, prefix=f"layers.{i}")

        self.layers = nn.ModuleList(layer(i) for i in range(config.num_hidden_layers))
        if not layout.input_norm:
            self.layers[0].input_layernorm = nn.Identity()
        self.rotary_emb = RotaryEmbedding(config.head_dim, max(max_position, config.max_position_embeddings),
                                          config.rope, device=device)
        self.embed_tokens = (VocabEmbedding(config.vocab_size, h, dtype=dtype, device=device, prefix="embed_tokens")
                             if layout.embed else None)
        self.lm_head = (LMHead(config.vocab_size, h, dtype=dtype, device=device, prefix="lm_head")
                        if layout.lm_head else None)
        self._target = target
        self.name_map = EagleNameMap((n for n, _ in self.named_parameters()), tied_lm_head=False)
        # The features of a captured one-token step (``graph_input``): a forward without features
        # reads its first rows, so that a CUDA graph captured on it takes new ones by a copy.
        self.graph_features: torch.Tensor | None = None

    def graph_input(self, max_bs: int) -> torch.Tensor:
        """The static feature buffer (max_bs, H) that forwards given no features read (graph capture)."""
        if self.graph_features is None or self.graph_features.shape[0] < max_bs:
            self.graph_features = torch.zeros(max_bs, self.config.hidden_size, dtype=self.fc.weight.dtype,
                                              device=self.fc.weight.device)
        return self.graph_features

    def forward(self, batch: ForwardBatch, features: torch.Tensor | None = None) -> torch.Tensor:
        """Output hidden states (T, H) for ``batch.input_ids`` at draft indices ``batch.positions``,
        given the features (T, H) of the index before each token (module doc); None: the first T
        rows of ``graph_features``."""
        if features is None:
            assert self.graph_features is not None, "graph_input() first"
            features = self.graph_features[: batch.input_ids.shape[0]]
        embed = self.embed_tokens if self.embed_tokens is not None else self._target.embed
        x = embed(batch.input_ids)  # (T, H)
        hidden = self.fc(torch.cat([x, features.to(x.dtype)], dim=-1))  # (T, H)
        rope = step_rope(self.rotary_emb, batch.positions, hidden)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual, batch)
        return hidden + residual  # (T, H); no final norm in the format

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """(N, H) -> (N, vocab) logits from the head's LM head, or the target's."""
        head = self.lm_head if self.lm_head is not None else self._target.lm_head
        return head(hidden, upcast=upcast)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint-named tensors into the head in place; returns our names fully written."""
        return load_named_weights(self, self.name_map, weights)

    def param_names_for_checkpoint(self) -> dict[str, list[str]]:
        """Our parameter name -> the checkpoint keys that fill it."""
        return {name: self.name_map.checkpoint_names(name) for name, _ in self.named_parameters()}


def head_config(path: str) -> ModelConfig:
    """The head's ``config.json`` as a ``ModelConfig`` (a config without ``architectures`` is a Llama's)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise InvalidArgumentError(f"no config.json in {quoted(path)}: give the EAGLE head's directory", field=FIELD)
    with open(cfg_path) as f:
        hf = json.load(f)
    hf.setdefault("architectures", ["LlamaForCausalLM"])
    if hf.get("qkv_bias"):  # how SafeAILab's EAGLE configs ask for q/k/v biases (whatever attention_bias says)
        hf["attention_bias"] = True
    return ModelConfig.from_hf_dict(hf)


def iter_head_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The head's tensors: its safetensors files, else its ``pytorch_model*.bin`` files."""
    if glob.glob(os.path.join(path, "*.safetensors")):
        checkpoint_files(path)  # a sharded index whose files are missing raises here
        yield from iter_checkpoint(path)
        return
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
        raise InvalidArgumentError(f"no *.safetensors or pytorch_model*.bin in {quoted(path)}", field=FIELD)
    for file in bins:
        # weights_only: tensors and plain containers only, no code runs (an operator's file, at start-up).
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def check_head(config: ModelConfig, target: ModelConfig) -> None:
    """Refuse a head that cannot run on this target."""
    if config.hidden_size != target.hidden_size:
        raise InvalidArgumentError(
            f"the EAGLE head's hidden size ({config.hidden_size}) differs from the target's "
            f"({target.hidden_size}): the head reads the target's hidden states, so it must be made for this "
            "target model", field=FIELD)
    if config.is_moe:
        raise InvalidArgumentError("an EAGLE head is dense Llama layers; this config has experts", field=FIELD)


def load_eagle_head(path: str, config: ModelConfig, target: TargetParts, dtype: torch.dtype,
                    device: torch.device, max_position: int) -> EagleHead:
    """Build the head of ``config`` (``head_config(path)``) and fill it from the checkpoint at ``path``.

    Raises ``InvalidArgumentError`` naming unexpected keys, keys of the wrong shape or missing keys.
    """
    tensors = dict(iter_head_checkpoint(path))
    head = EagleHead(config, HeadLayout.of(tensors), dtype, device, target, max_position)
    try:
        written = head.load_weights(tensors.items())
    except InvalidArgumentError as e:  # name the option; the message names the key
        why = e.reason if e.field == "weights" else e.message
        raise InvalidArgumentError(f"the EAGLE head's checkpoint: {why}", field=FIELD) from None
    expected = head.param_names_for_checkpoint()
    missing = [key for name, keys in expected.items() if name not in written for key in keys]
    if missing:
        raise InvalidArgumentError(f"the EAGLE head's checkpoint is missing: {', '.join(missing[:10])}", field=FIELD)
    return head.eval()
