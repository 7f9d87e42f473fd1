"""A tiny model trained briefly, for tests whose greedy choices must be confident.

A random model's next-token distribution is nearly flat, so in bfloat16 two engines that differ
only in the order of a sum (one GPU vs two tensor-parallel ranks) can pick different greedy tokens.
``train_briefly`` fits a random tiny model (``random_model.write_random_model``) to continue
arithmetic progressions of token ids modulo the vocabulary; after a few hundred steps its greedy
continuation of a progression is the progression, with a wide margin. ``progression`` makes prompts.
"""

from __future__ import annotations

import os
import shutil

import torch


def progression(start: int, step: int, length: int, vocab: int) -> list[int]:
    """``start, start + step, ...`` modulo ``vocab`` (ids below 8 skipped: special tokens live there)."""
    span = vocab - 8
    return [8 + (start + i * step) % span for i in range(length)]


def train_briefly(model_dir: str, out_dir: str, steps: int = 300, device: str = "cpu", seed: int = 0,
                  seq_len: int = 40, batch: int = 32, lr: float = 3e-3) -> str:
    """Train the HF model at ``model_dir`` on progressions and save it (with its tokenizer) to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, vocab, (batch,), generator=gen).tolist()
        strides = torch.randint(1, 8, (batch,), generator=gen).tolist()
        ids = torch.tensor([progression(a, d, seq_len, vocab) for a, d in zip(starts, strides)], device=device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in os.listdir(model_dir):  # tokenizer and generation files
        if not name.endswith(".safetensors") and name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(model_dir, name), out_dir)
    return out_dir
