"""Draft-model drafting: a small model with the target's tokenizer proposes ``k`` tokens per sequence.

The draft model runs in its own ``ModelRunner`` and KV (``drafting.DraftKV``, which also runs the
draft forwards and draws the drafts). Its draft-KV positions are the sequence's positions: a step
of a sequence of length ``n`` extends over its tokens ``[computed, n)`` (its whole context the first
time, the tokens accepted since its last step afterwards), whose last row gives ``q_1``, then feeds
each draft back for ``q_2 .. q_k``. After the verify accepted ``a`` drafts, the draft KV of
positions ``< n + min(a, k - 1)`` holds accepted tokens only, and ``computed`` moves there.
"""

from __future__ import annotations

import torch
from torch import nn

from rollout.config import EngineConfig
from rollout.models.registry import build_model
from rollout.runner.model_runner import ModelRunner
from rollout.scheduler.sequence import Sequence
from rollout.spec.drafting import DraftKV, Drafts, DraftStep, draft_engine_config


class DraftModel:
    """A draft model, its KV cache and the per-sequence draft state (a ``drafting.Drafter``)."""

    def __init__(self, target: EngineConfig, num_slots: int) -> None:
        config = draft_engine_config(target, num_slots)
        self.model_config = config.model
        self.weight_version: int | None = None  # see drafting.Drafter
        self.runner = ModelRunner(config)
        self.kv = DraftKV(self.runner, target)

    def build_meta(self) -> nn.Module:
        """The draft model on the meta device."""
        return build_model(self.model_config, self.runner.dtype, "meta")

    def draft(self, seqs: list[Sequence], ks: list[int], banned: list[list[list[int] | None]]) -> Drafts:
        """Draw ``max(ks)`` drafts for each of ``seqs`` (``drafting.Drafter.draft``)."""
        states = [self.kv.seqs[s.uid] for s in seqs]
        ext = [s.total_len - st.computed for s, st in zip(seqs, states)]
        ids = [t for s, st in zip(seqs, states) for t in s.token_slice(st.computed, s.total_len)]
        return self.kv.run(seqs, max(ks), banned, ext, ids, self._forward)

    def _forward(self, step: DraftStep) -> torch.Tensor:
        if step.replay is not None:
            return step.replay()  # (N, hidden)
        batch = step.batch
        return self.runner.model(batch)[batch.logits_indices]  # (N, hidden)

    def accepted(self, seqs: list[Sequence], ks: list[int], accepted: list[int]) -> None:
        """After the verify of ``seqs``' drafts, ``accepted[i]`` of them taken.

        The draft forwards of a sequence of length ``n`` wrote positions ``n - 1`` (its last token)
        to ``n + k - 2`` (drafts ``d_1 .. d_{k-1}``); draft ``d_j`` is the sequence's token iff
        ``j <= a``, so the draft KV is valid for ``n + min(a, k - 1)`` tokens.
        """
        k = max(ks)
        self.kv.settle(seqs, [self.kv.seqs[s.uid].drafted_at + min(a, k - 1) for s, a in zip(seqs, accepted)])

    def close(self) -> None:
        """Free the draft model's memory."""
        self.runner.close()
