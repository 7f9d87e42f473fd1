"""EAGLE drafting: a draft head (``eagle_head.py``) reads the target's features and proposes ``k``
tokens per sequence.

The head's draft index ``i`` is fed token ``x_{i+1}`` and the target's final hidden state ``f_i``
at position ``i``, which the target keeps by KV slot (``ModelRunner.feature_store``: written by
every forward, so tokens computed by eager steps, decode and verify graphs, and prefix-cache hits
all have theirs). For a sequence ``x_0 .. x_{n-1}`` whose head KV is valid for indices
``< computed`` a step runs (through ``drafting.DraftKV``)::

    index      computed .. n-2               n-1            n       ..  n+k-3
    input      x_{i+1}, f_i (target's)       d_1, h_{n-2}   d_2, h_{n-1}  ..
    output     .. h_{n-2} -> q_1 -> d_1      h_{n-1} -> q_2 -> d_2  ..   -> q_k -> d_k

where ``h`` is the head's own output hidden state, standing in for the target's feature the head
cannot have yet (the target computes ``f_{n-1}`` and the drafts' features in the verify). Drafts
are drawn from ``q`` as method ``draft`` draws them (same stream, ``q`` handed to the verifier), so
the output is exact. After the verify ``computed = n - 1`` whatever was accepted: the indices from
``n - 1`` on were computed from the head's hidden states and are computed again from the target's
features at the next step; their head KV is given back.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rollout.config import EngineConfig
from rollout.runner.model_runner import ModelRunner
from rollout.runner.step_inputs import host_segments_to_device
from rollout.scheduler.sequence import Sequence
from rollout.spec.drafting import DRAFT_GRAPH_MAX_BS, DraftKV, Drafts, DraftStep, draft_engine_config
from rollout.spec.eagle_head import EagleHead, TargetParts, check_head, head_config, load_eagle_head


class EagleDrafter:
    """An EAGLE head, its KV cache and the per-sequence draft state (a ``drafting.Drafter``)."""

    def __init__(self, target: EngineConfig, target_runner: ModelRunner) -> None:
        path = target.spec.draft_model_path
        assert path is not None and target_runner.feature_store is not None
        self.model_config = head_config(path)
        check_head(self.model_config, target.model)
        config = draft_engine_config(target, target_runner.num_slots, self.model_config)
        self.target = target_runner
        model = target_runner.model
        self._parts = TargetParts(embed=model.model.embed_tokens, lm_head=model.lm_head)
        self._max_position = target.context_length + 32
        head = load_eagle_head(path, self.model_config, self._parts, target_runner.dtype, target_runner.device,
                               self._max_position)
        self.weight_version: int | None = None  # see drafting.Drafter
        head.graph_input(DRAFT_GRAPH_MAX_BS)  # before DraftKV captures the head's graphs on it
        self.runner = ModelRunner(config, model=head)
        self.kv = DraftKV(self.runner, target)

    def build_meta(self) -> nn.Module:
        """The head on the meta device (the same optional parts as the loaded one)."""
        head: EagleHead = self.runner.model
        return EagleHead(self.model_config, head.layout, self.runner.dtype, "meta", None, self._max_position)

    def draft(self, seqs: list[Sequence], ks: list[int], banned: list[list[list[int] | None]]) -> Drafts:
        """Draw ``max(ks)`` drafts for each of ``seqs`` (``drafting.Drafter.draft``; module doc)."""
        states = [self.kv.seqs[s.uid] for s in seqs]
        # Catch-up: indices [computed, n - 1), index i fed x_{i+1} and f_i.
        ext = [s.total_len - 1 - st.computed for s, st in zip(seqs, states)]
        ids = [t for s, st in zip(seqs, states) for t in s.token_slice(st.computed + 1, s.total_len)]
        positions = np.concatenate([np.arange(st.computed, st.computed + e, dtype=np.int64)
                                    for st, e in zip(states, ext)])
        rows = np.repeat(np.asarray([s.handle.row for s in seqs], dtype=np.int64), ext)
        features = self._target_features(rows, positions)  # (T, H)
        head = self.runner.model

        def forward(step: DraftStep) -> torch.Tensor:
            nonlocal features
            if step.replay is not None:  # a captured one-token step reads the head's static features
                head.graph_features[: features.shape[0]].copy_(features)
                out = step.replay()  # (N, H), the graph's output buffer: copied above before the next
            else:
                out = head(step.batch, features)[step.batch.logits_indices]  # (N, H): each sequence's last row
            features = out  # the next forward's feature is this one's output
            return out

        return self.kv.run(seqs, max(ks), banned, ext, ids, forward)

    def _target_features(self, rows: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """The target's features at ``positions`` of the sequences in its request-table ``rows``."""
        target = self.target
        rows_d, positions_d = host_segments_to_device([torch.from_numpy(rows), torch.from_numpy(positions)],
                                                      target.device)
        slots = target.req_table[rows_d, positions_d]  # (T,)
        return target.feature_store[slots]  # (T, H)

    def accepted(self, seqs: list[Sequence], ks: list[int], accepted: list[int]) -> None:
        """After the verify: the head KV stays valid for indices ``< n - 1`` (module doc)."""
        self.kv.settle(seqs, [self.kv.seqs[s.uid].drafted_at - 1 for s in seqs])

    def close(self) -> None:
        """Free the head's memory (the target's shared parts stay with the target)."""
        self.runner.close()
