"""The values that cross layers, defined below all of their users (no import runs back up).

- ``BatchPlan``: what the scheduler hands the model runner for one step (plain lists, no request
  objects), stamped with the weight version the step runs under.
- ``StepResult``: the sampled tokens of one step, back from the runner to the scheduler.
- ``ForwardBatch``: the tensors of one forward step, shared by the runner, the model and the
  attention backends.

ForwardBatch layout. All new tokens of all requests in the step are laid out request-major in one
flat token axis (``T`` tokens, ``B`` requests). Request ``i`` contributes ``extend_lens[i]`` new tokens
(1 when it decodes, a chunk of its prompt when it prefills) and attends to ``seq_lens[i]`` tokens of
KV: its ``prefix_lens[i]`` cached tokens followed by its new ones::

    token axis   | req 0: new tokens | req 1 | req 2 ...            qo_indptr = [0, e0, e0+e1, ...]
    kv axis      | req 0: prefix + new       | req 1: prefix + new | kv_indptr = [0, s0, s0+s1, ...]

``kv_indices`` holds the KV-pool slot of every kv-axis position; ``out_cache_loc`` the slot that
each new token's K and V are written to (the tail of its request's kv run).

The same slots are also in the request table: request ``i``'s are ``req_table[req_rows[i], :seq_lens[i]]``
(the new tokens' slots are written there before the forward). A backend that reads the table
(``AttentionBackend.reads_req_table``) gets no ``kv_indptr`` / ``kv_indices``: building them is a
gather of every running sequence's whole KV run per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rollout.types import SamplingParams

if TYPE_CHECKING:
    import numpy as np

    from rollout.attention.base import AttentionBackend


@dataclass(slots=True)
class SpecPlan:
    """The drafted tokens a step verifies (speculative decoding).

    Sampled entry ``i`` ends with ``num_drafts[i]`` draft inputs; its last ``num_drafts[i] + 1``
    tokens are each sampled (one verify row each, entry-major), the draft inputs being checked
    against those samples by the exact rule of ``sampling/rejection.py``.
    """

    num_drafts: list[int]  # per sampled entry (0: a plain sample)
    banned: list[list[int] | None]  # per verify row: ids it must not produce (before min_new_tokens)


@dataclass(slots=True)
class BatchPlan:
    """The token work of one forward step.

    Entry ``i`` computes ``extend_lens[i]`` tokens of the sequence in req-table row ``rows[i]``,
    starting at position ``prefix_lens[i]``; ``sample[i]`` says whether its last token's logits are
    sampled (false for a prompt chunk that is not the last).

    ``routed_from`` (empty when no entry asks): entry ``i`` wants the routed experts of its positions
    ``[routed_from[i], prefix_lens[i] + extend_lens[i])`` (-1: none). The range may start before
    ``prefix_lens[i]``: positions served from the prefix cache bring the routing kept with their KV.
    """

    rows: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    # The new tokens of all entries, entry-major. -1 - j stands for row j of the previous step's
    # sampled tokens (overlap scheduling: the host does not know them yet).
    input_ids: list[int]
    out_slots: list[int]  # the KV slot of every new token
    sample: list[bool]
    # Per sampled entry, in entry order:
    sampling: list[SamplingParams]
    seeds: list[int]
    steps: list[int]
    banned: list[list[int] | None]
    return_logprob: bool
    return_raw_logprob: bool
    top_logprobs_num: int
    future_inputs: bool = False  # some input_ids refer to the previous step's samples
    weight_version: int = 0  # the weights this step runs under; its tokens carry it
    spec: SpecPlan | None = None  # drafts to verify; such a step is collected before the next is planned
    routed_from: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def routed_rows(self) -> list[tuple[int, int, int]]:
        """``(entry, first position, row count)`` of each entry that wants routed experts, in entry
        order: the layout of ``StepResult.routed_experts``."""
        return [(i, lo, p + n - lo) for i, (lo, p, n) in
                enumerate(zip(self.routed_from, self.prefix_lens, self.extend_lens)) if 0 <= lo < p + n]


class StepResult:
    """Sampled tokens of one step as Python lists (one entry per sampled sequence).

    ``routed_experts``: (rows, MoE layers, top_k) int16, the rows ``BatchPlan.routed_rows`` lists,
    concatenated in that order (None when no entry asked).
    """

    __slots__ = ("token_ids", "logprobs", "raw_logprobs", "top_logprobs", "routed_experts")

    def __init__(self, token_ids: list[int], logprobs: list[float] | None = None,
                 raw_logprobs: list[float] | None = None, top_logprobs: list | None = None,
                 routed_experts: np.ndarray | None = None) -> None:
        self.token_ids = token_ids
        self.logprobs = logprobs
        self.raw_logprobs = raw_logprobs
        self.top_logprobs = top_logprobs
        self.routed_experts = routed_experts


@dataclass(slots=True)
class ForwardBatch:
    """Everything a model forward needs besides the weights."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, position of each new token in its sequence
    out_cache_loc: torch.Tensor  # (T,) int64, KV slot written by each new token
    qo_indptr: torch.Tensor  # (B+1,) int32 or int64
    kv_indptr: torch.Tensor | None  # (B+1,) int32 or int64; None when the backend reads the request table
    kv_indices: torch.Tensor | None  # (sum(seq_lens),) int64; likewise
    seq_lens: torch.Tensor  # (B,) int32 or int64, prefix + new tokens per request
    logits_indices: torch.Tensor  # (S,) int64, token-axis index of the last new token of each sampled entry
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    attn_backend: AttentionBackend
    req_rows: torch.Tensor | None = None  # (B,) int64, each request's row of req_table
    req_table: torch.Tensor | None = None  # (R, C) int64: req_table[row, pos] = KV slot
    # (max step tokens, MoE layers, top_k) int16: row t gets the expert ids each MoE layer picked for
    # token t (a static buffer; None when the engine records no routing).
    routed_experts: torch.Tensor | None = None
    # (KV slots, hidden) in the model dtype: the model writes each new token's final hidden state (the
    # LM head's input) at its ``out_cache_loc`` slot, so it is kept beside the token's KV (speculative
    # method "eagle" reads them); None: not kept.
    feature_store: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        """True when every request adds exactly one token (the CUDA-graph-able case)."""
        return all(e == 1 for e in self.extend_lens_cpu)
