"""How far an engine's logprobs are from a trainer's recomputation of the same tokens.

RL corrections (truncated importance sampling, IcePop) exist because the rollout engine's logprob of
a sampled token differs from the one the trainer computes for it. Here the trainer is Hugging Face
transformers: one teacher-forced forward over prompt + rollout, in a given dtype, on the same
weights. ``delta = engine_logprob - trainer_logprob`` per rollout token; ``summarize`` gives mean,
p99 and max of ``|delta|``, the mean of ``(exp(delta) - 1)^2`` (the squared deviation of the
importance ratio from 1) and the share of tokens with ``|delta| > 0.1`` (IcePop-style masking).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rollout:
    """One sample: its prompt, its tokens and the engine's logprob of each."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class FidelityFigures:
    """Summary of ``delta = engine - trainer`` over every rollout token."""

    tokens: int
    mean_abs: float
    p99_abs: float
    max_abs: float
    ratio_mse: float  # mean of (exp(delta) - 1)^2
    share_over_0_1: float  # share of tokens with |delta| > 0.1


def summarize(deltas: Sequence[float]) -> FidelityFigures:
    """The figures of a list of per-token ``delta`` values."""
    d = torch.tensor(list(deltas), dtype=torch.float64)
    a = d.abs()
    if a.numel() == 0:
        return FidelityFigures(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    return FidelityFigures(
        tokens=a.numel(),
        mean_abs=float(a.mean()),
        p99_abs=float(torch.quantile(a, 0.99)),
        max_abs=float(a.max()),
        ratio_mse=float(((d.exp() - 1) ** 2).mean()),
        share_over_0_1=float((a > 0.1).double().mean()),
    )


def load_trainer(model_dir: str, dtype: torch.dtype, device: str):
    """The Hugging Face model a trainer would hold, in ``dtype`` (eager attention: the plain
    formulation, as a training forward without fused kernels computes it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.to(device).eval()


@torch.inference_mode()
def trainer_logprobs(model, rollouts: Sequence[Rollout], batch_size: int = 8) -> list[list[float]]:
    """Teacher-forced logprobs of every rollout's tokens under ``model``: a float32 log-softmax of
    the logits, as RL losses take it. Sequences are right-padded into batches."""
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for i in range(0, len(rollouts), batch_size):
        group = rollouts[i: i + batch_size]
        seqs = [r.prompt + r.tokens for r in group]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, W, V)
        for j, r in enumerate(group):
            start = len(r.prompt) - 1  # the logits at position t predict token t + 1
            rows = logits[j, start: start + len(r.tokens)].float()  # (n, V)
            lp = torch.log_softmax(rows, dim=-1)
            target = torch.tensor(r.tokens, device=device)
            out.append(lp.gather(1, target[:, None]).squeeze(1).tolist())
    return out


def deltas(rollouts: Sequence[Rollout], reference: Sequence[Sequence[float]]) -> list[float]:
    """``engine - trainer`` for every token of every rollout."""
    return [e - t for r, ref in zip(rollouts, reference, strict=True) for e, t in zip(r.logprobs, ref, strict=True)]


def format_table(rows: Sequence[tuple[str, FidelityFigures]]) -> str:
    """A fixed-width table, one line per (label, figures)."""
    head = f"{'engine / trainer':<52}{'tokens':>8}{'mean|d|':>11}{'p99|d|':>11}{'max|d|':>11}" \
           f"{'(e^d-1)^2':>11}{'>0.1':>9}"
    lines = [head, "-" * len(head)]
    for label, f in rows:
        lines.append(f"{label:<52}{f.tokens:>8}{f.mean_abs:>11.2e}{f.p99_abs:>11.2e}{f.max_abs:>11.2e}"
                     f"{f.ratio_mse:>11.2e}{f.share_over_0_1:>9.2%}")
    return "\n".join(lines)
