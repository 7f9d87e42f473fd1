"""EAGLE heads for tests: a random head, or one trained briefly on a tiny target's own greedy text,
written in the published EAGLE-1 format (``rollout/spec/eagle_head.py``), and a target they suit.

``train_eagle_head`` builds the head from Hugging Face transformers' Llama decoder layer (layer 0's
input norm replaced by the identity, as in the format), feeds it the target's final hidden states
from transformers too, and fits it with the EAGLE-1 objective: the head's output at index ``i``
regresses the target's feature ``f_{i+1}`` and its logits (through the target's LM head) match the
target's next-token distribution there. A few hundred Adam steps on CPU take seconds.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

# The target config keys an EAGLE head's Llama config.json copies.
_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta")


def head_config(target_dir: str, num_hidden_layers: int = 1) -> dict:
    """A Llama config.json for a head over the target at ``target_dir`` (its sizes, ``num_hidden_layers``)."""
    with open(os.path.join(target_dir, "config.json")) as f:
        target = json.load(f)
    cfg = {k: target[k] for k in _SHAPE_KEYS if k in target}
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=num_hidden_layers,
               hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    return cfg


def save_head(path: str, config: dict, weights: dict[str, torch.Tensor]) -> str:
    """Write ``config.json`` and ``model.safetensors`` (EAGLE-1 names) to ``path``; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.detach().float().contiguous() for k, v in weights.items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


class HeadForTraining(nn.Module):
    """The EAGLE-1 head on transformers' Llama layers; its ``state_dict`` has the published names
    (``input_norm``: keep layer 0's input norm, which the format leaves out)."""

    def __init__(self, config: dict, fc_bias: bool = True, input_norm: bool = False) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        cfg = LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
        cfg.attention_bias = bool(config.get("qkv_bias", False))
        cfg._attn_implementation = "eager"
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=fc_bias)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, layer_idx=i) for i in range(cfg.num_hidden_layers))
        for layer in self.layers:  # transformers' attention_bias also gives o_proj one; EAGLE's qkv_bias does not
            layer.self_attn.o_proj.register_parameter("bias", None)
        if not input_norm:
            self.layers[0].input_layernorm = nn.Identity()
        self.rotary = LlamaRotaryEmbedding(cfg)

    def state_dict_published(self) -> dict[str, torch.Tensor]:
        """The head's tensors under EAGLE-1 names (no rotary buffers)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("rotary")}

    def forward(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(B, T, H) token embeddings and features at indices 0..T-1 -> output hidden states (B, T, H)."""
        hidden = self.fc(torch.cat([embeds, features], dim=-1))
        t = hidden.shape[1]
        positions = torch.arange(t)[None].expand(hidden.shape[0], t)
        rope = self.rotary(hidden, positions)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]  # additive causal mask
        for layer in self.layers:
            out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def write_eagle_head(path: str, target_dir: str, seed: int = 0, num_hidden_layers: int = 1,
                     fc_bias: bool = True, input_norm: bool = False, own_vocab: bool = False,
                     qkv_bias: bool = False) -> str:
    """A random (untrained) head over the target at ``target_dir``, in the published format; with
    ``own_vocab`` it has its own ``embed_tokens`` and ``lm_head``, with ``qkv_bias`` q/k/v biases (and
    the config key SafeAILab's EAGLE reads). Norm weights are near 1 but not 1, so a misplaced norm shows."""
    torch.manual_seed(seed)
    cfg = head_config(target_dir, num_hidden_layers)
    if qkv_bias:
        cfg["qkv_bias"] = True
    weights = HeadForTraining(cfg, fc_bias, input_norm).state_dict_published()
    for name, t in weights.items():
        if "layernorm" in name:
            t.add_(0.1 * torch.randn_like(t))
        elif name.endswith("proj.bias"):
            t.normal_()  # HF starts them at zero
    if own_vocab:
        weights["embed_tokens.weight"] = torch.randn(cfg["vocab_size"], cfg["hidden_size"])
        weights["lm_head.weight"] = 0.1 * torch.randn(cfg["vocab_size"], cfg["hidden_size"])
    return save_head(path, cfg, weights)


def write_eagle_target(path: str, lm_head_scale: float = 8.0) -> str:
    """A tiny Llama target a head learns in seconds: one layer of small weights, so its next token
    depends mostly on the last one, and an LM head scaled up so its distributions are peaked (a
    sampling test then sees repeated outcomes, and drafts both accepted and rejected)."""
    from safetensors.torch import load_file

    from rollout.testing.random_model import write_random_model

    write_random_model(path, "llama", num_hidden_layers=1, init_std=0.05)
    file = os.path.join(path, "model.safetensors")
    weights = load_file(file)
    weights["lm_head.weight"] *= lm_head_scale
    save_file(weights, file, metadata={"format": "pt"})
    return path


@torch.no_grad()
def _target_outputs(target, prompts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's greedy continuation of ``prompts`` to ``length`` tokens, and its final hidden
    states (after the final norm) over it: (B, length) ids, (B, length, H)."""
    ids = target.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=length - prompts.shape[1],
                          min_new_tokens=length - prompts.shape[1], do_sample=False, pad_token_id=0)
    return ids, target.model(input_ids=ids).last_hidden_state


def train_eagle_head(target_dir: str, out_dir: str, steps: int = 100, seed: int = 0, batch: int = 16,
                     prompt_len: int = 8, length: int = 40, lr: float = 1e-2) -> str:
    """Train a head on the target's greedy continuations of random prompts; save it to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval().requires_grad_(False)
    cfg = head_config(target_dir)
    head = HeadForTraining(cfg)
    vocab = cfg["vocab_size"]
    gen = torch.Generator().manual_seed(seed)
    ids, feats = _target_outputs(target, torch.randint(8, vocab, (8 * batch, prompt_len), generator=gen), length)
    embed, lm_head = target.get_input_embeddings(), target.get_output_embeddings()
    with torch.no_grad():
        want = torch.log_softmax(lm_head(feats[:, 1:]), dim=-1)  # (N, T-1, V): the target at i + 1
        embeds = embed(ids[:, 1:])  # x_{i+1}
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        pick = torch.randint(0, ids.shape[0], (batch,), generator=gen)
        out = head(embeds[pick], feats[pick, :-1])  # index i fed (x_{i+1}, f_i)
        reg = nn.functional.smooth_l1_loss(out, feats[pick, 1:])
        logp = torch.log_softmax(lm_head(out), dim=-1)
        cls = -(want[pick].exp() * logp).sum(-1).mean()
        loss = reg + 0.1 * cls
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return save_head(out_dir, cfg, head.state_dict_published())
