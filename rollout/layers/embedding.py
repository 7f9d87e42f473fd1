"""Token embedding and the LM head (which can share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollout.layers.linear import ShardId, copy_checked, new_param


class VocabEmbedding(nn.Module):
    """Token id -> hidden vector lookup; weight (vocab_size, hidden_size)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.weight = new_param((vocab_size, hidden_size), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        copy_checked(param.data, loaded, f"{self.prefix}.weight" if self.prefix else "weight")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (T, hidden)


class LMHead(nn.Module):
    """Hidden states -> float32 logits over the vocabulary.

    With ``tie_to`` the head uses the embedding's own ``Parameter`` object, so a write to either is
    a write to both and no second copy of the matrix exists.
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
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.tied = tie_to is not None
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self.weight = new_param((vocab_size, hidden_size), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        copy_checked(param.data, loaded, f"{self.prefix}.weight" if self.prefix else "weight")

    def forward(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) logits: the matmul runs in the model dtype (as in HF); ``upcast``
        hands them on in float32 (the values are the same, the sampler reads either)."""
        logits = F.linear(hidden, self.weight)  # (N, vocab)
        return logits.float() if upcast else logits
