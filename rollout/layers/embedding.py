"""Token embedding and the LM head (which can share the embedding's weight), vocabulary-parallel.

With a ``TPGroup`` of ``n`` ranks each rank holds one contiguous slice of ``ceil(vocab / n)`` rows
of the vocabulary (the last slice padded with zero rows)::

    vocab 10, n 4:   rank 0: ids 0-2   rank 1: ids 3-5   rank 2: ids 6-8   rank 3: id 9 + 2 pad rows

The embedding looks up the ids in its slice, zeroes the others and sums over the ranks; the head
computes the logits of its slice and gathers every rank's slice, so the sampler sees the full vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollout.distributed.tp import SINGLE, TPGroup
from rollout.layers.linear import ShardId, copy_checked, load_slice, new_param


def _load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, vocab_size: int, tp: TPGroup, name: str) -> None:
    """Copy this rank's rows of the full (vocab, hidden) ``loaded`` into ``param`` (padding rows zero)."""
    if tp.size == 1:
        copy_checked(param.data, loaded, name)
        return
    rows = param.shape[0]
    start = tp.rank * rows
    n = max(0, min(rows, vocab_size - start))  # real rows in this slice
    if n > 0:
        load_slice(param.data[:n], loaded, 0, vocab_size, start, name)
    elif loaded.shape[0] != vocab_size:  # a slice of padding only still checks what was sent
        load_slice(param.data, loaded, 0, vocab_size, 0, name)
    param.data[n:].zero_()


class VocabEmbedding(nn.Module):
    """Token id -> hidden vector lookup; weight (vocab_size per rank, hidden_size)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.tp = tp
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank  # first token id of this rank's slice
        self.weight = new_param((self.rows_per_rank, hidden_size), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        name = f"{self.prefix}.weight" if self.prefix else "weight"
        _load_vocab_rows(param, loaded, self.vocab_size, self.tp, name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)  # (T, hidden)
        local = input_ids - self.vocab_start  # (T,)
        outside = (local < 0) | (local >= self.rows_per_rank)  # (T,) ids another rank holds
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (T, hidden)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)  # exactly one rank contributes each row


class LMHead(nn.Module):
    """Hidden states -> float32 logits over the vocabulary.

    With ``tie_to`` the head uses the embedding's own ``Parameter`` object, so a write to either is
    a write to both and no second copy of the matrix exists (the two share one vocabulary split).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
        tie_to: VocabEmbedding | None = None,
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.tp = tp
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            rows = -(-vocab_size // tp.size)
            self.weight = new_param((rows, hidden_size), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        name = f"{self.prefix}.weight" if self.prefix else "weight"
        _load_vocab_rows(param, loaded, self.vocab_size, self.tp, name)

    batch_invariant = False  # rows computed independently of the batch (set_batch_invariant)
    fp32 = False  # float32 hidden states and weights, float32 logits (EngineConfig.fp32_lm_head)

    def forward(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) logits: the matmul runs in the model dtype (as in HF) unless
        ``fp32``; ``upcast`` hands them on in float32 (the values are the same, the sampler reads either)."""
        if self.batch_invariant:
            from rollout.layers.batch_invariant import invariant_linear

            logits = invariant_linear(hidden, self.weight, fp32=self.fp32)  # (N, vocab / tp)
        elif self.fp32:
            logits = F.linear(hidden.float(), self.weight.float())  # (N, vocab / tp) float32
        else:
            logits = F.linear(hidden, self.weight)  # (N, vocab / tp)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)  # (N, padded vocab), slices in rank order
            if logits.shape[-1] != self.vocab_size:
                logits = logits[..., : self.vocab_size]  # drop the last slice's padding rows
        return logits.float() if upcast else logits
