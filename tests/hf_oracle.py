"""Hugging Face transformers as the oracle: greedy generation and log-softmax of the chosen tokens."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    return model


@torch.inference_mode()
def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = ()):
    """Greedy continuation of ``prompt`` and the log-softmax of each chosen token.

    Runs the plain forward pass token by token with HF's own KV cache, stopping at an EOS id
    (included in the output) like ``generate`` does.
    """
    model = load_hf(model_dir)
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    tokens, logprobs = [], []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        if tok in eos_ids:
            break
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


@torch.inference_mode()
def hf_generate(model_dir: str, prompt: list[int], max_new_tokens: int) -> list[int]:
    """``model.generate`` greedy output ids (new tokens only)."""
    model = load_hf(model_dir)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def hf_routed_experts(model_dir: str, ids: list[int]):
    """The router's top-k expert ids (by score, highest first) of every MoE layer for each token of
    ``ids`` in one forward: a numpy array (len(ids), MoE layers, top_k)."""
    import numpy as np

    model = load_hf(model_dir)
    out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    k = model.config.num_experts_per_tok
    # One (T, E) tensor of router logits per MoE layer; softmax keeps their order.
    return np.stack([torch.topk(logits.float(), k, dim=-1).indices.numpy() for logits in out.router_logits], axis=1)
