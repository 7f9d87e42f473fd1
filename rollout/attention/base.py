"""The attention backend interface.

A backend computes causal attention of a step's new tokens over each request's KV in the paged
pool, after writing the new tokens' K and V into the pool. Backends are chosen by name through
``rollout.attention.registry`` so GPU libraries are imported only when picked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from rollout.batch import ForwardBatch
from rollout.cache.kv_pool import KVPool

if TYPE_CHECKING:
    from kernels.attention import NewTokenRope


class AttentionBackend(ABC):
    """Paged causal attention over a ``KVPool``.

    A backend that sets ``supports_cuda_graph`` can have its decode forward captured: its
    ``prepare()`` then runs eagerly before each replay and must write its metadata into buffers
    allocated once in ``init_cuda_graph()`` (the captured kernels read those addresses), and its
    ``forward()`` must not sync with the host or allocate by data-dependent sizes.
    """

    supports_cuda_graph: bool = False
    # True: ``prepare()`` of a graph's static decode batch is device work on the batch's tensors only
    # (no host reads, host-side choices fixed by the batch size), so the decode graphs capture it
    # with the forward and a replay makes no host call for it.
    capturable_prepare: bool = False
    # True: the backend finds each request's KV slots through ``batch.req_table`` / ``req_rows``, so
    # the runner leaves ``kv_indptr`` / ``kv_indices`` out of its batches (None).
    reads_req_table: bool = False

    def __init__(self, kv_pool: KVPool) -> None:
        self.kv_pool = kv_pool

    def init_cuda_graph(self, max_bs: int, max_kv_tokens: int) -> None:
        """Allocate fixed metadata buffers for decode batches of up to ``max_bs`` requests."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-step metadata (index plans, masks) once before the layers run."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (T, num_q_heads, head_dim)
        k: torch.Tensor,  # (T, num_kv_heads, head_dim)
        v: torch.Tensor,  # (T, num_kv_heads, head_dim)
        layer_id: int,
        scale: float,
        batch: ForwardBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # (T, num_q_heads, head_dim)
        """Store ``k`` and ``v`` at ``batch.out_cache_loc`` of layer ``layer_id``, then attend.

        ``kv_stored``: the caller has already written them there (the fused rotary kernel does),
        so the backend must not store them again.

        Token ``t`` of request ``i`` at position ``p`` attends to positions ``0..p`` of request
        ``i`` only (causal within the request, nothing across requests).
        """

    def forward_decode_qkv(
        self,
        qkv: torch.Tensor,  # (B, (Hq + 2 Hkv) * D): the decoded tokens' projection, before norm / rotary
        num_q_heads: int,
        rope: NewTokenRope,
        layer_id: int,
        scale: float,
        batch: ForwardBatch,
    ) -> torch.Tensor | None:  # (B, Hq, D)
        """A decode step's q/k norm, rotary, KV store and attention in one pass, where the backend
        has it for this step; None: the caller takes the separate kernels and ``forward``."""
        return None
