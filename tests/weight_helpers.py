"""Shared pieces of the weight-update tests: a perturbed copy of a checkpoint, engine outputs."""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import save_file

from rollout.models.loader import iter_checkpoint
from rollout.types import SamplingParams


def write_checkpoint(model_dir: str, weights: dict[str, torch.Tensor], out_dir: str) -> str:
    """An HF directory at ``out_dir``: the config and tokenizer files of ``model_dir`` with ``weights``."""
    for f in os.listdir(model_dir):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(model_dir, f), out_dir)
    save_file({n: t.contiguous() for n, t in weights.items()}, os.path.join(out_dir, "model.safetensors"))
    return out_dir


def perturb_checkpoint(model_dir: str, out_dir: str, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    """Every weight of ``model_dir`` changed by a few percent, and an HF directory holding them."""
    gen = torch.Generator().manual_seed(seed)
    weights = {n: t * (1 + 0.1 * torch.randn(t.shape, generator=gen)) for n, t in iter_checkpoint(model_dir)}
    return weights, write_checkpoint(model_dir, weights, out_dir)


def client_outputs(engine, prompts: list[list[int]], sampling: SamplingParams) -> list[list[int]]:
    """Outputs of an engine (e.g. one in its own process) for ``prompts``, one request each."""
    return [engine.generate(p, sampling)[0].output_ids for p in prompts]
