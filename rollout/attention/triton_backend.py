"""Triton attention backend: the paged kernels of ``kernels.attention`` behind the backend ABC.

Decode steps (one new token per request) use the split-KV decode kernel; anything else uses the
extend kernel. ``deterministic``: every step uses the extend kernel with fixed tiles and no KV
splits (the decode kernel's split count follows the batch size), so a query's bits do not depend
on the batch, the chunking or a prefix hit.

The decode path is CUDA-graph safe: ``forward`` performs no host sync and allocates nothing whose
size depends on tensor values. Each step's cut of the requests' KV into pieces (``DecodePieces``:
each request's piece count and first piece, each piece's request) lives in buffers sized for
``max_batch_size`` (written in ``prepare``, read by the kernels at fixed addresses), and the
partial results go to a workspace sized for every batch up to ``max_batch_size`` on the first
decode step (the graph warm-up, before any capture). No buffer is ever replaced: a batch larger
than ``max_batch_size`` (never graphed) gets buffers of its own for that step.

By default each request is cut in up to ``choose_max_splits`` pieces of at least
``min_split_tokens`` (``plan_kv_splits``). ROLLOUT_DECODE_CUT=balanced (opt-in) shares a grid of
``decode_grid`` pieces out by length instead (``balanced_splits``), so pieces are about equally
long and a long request does not hold up the end of the kernel; ROLLOUT_DECODE_SPARE sets that
grid's pieces beyond one per request at large batches (a fraction of the batch, default 0.5; 0:
one piece each and no merge). On an H200 the balanced cut took half the kernel time or less on
batches with a few long requests, but the engine's GRPO steps were not faster with it
(docs/benchmarks.md), so it is not the default.

The kernels find each request's KV slots in the engine's request table when the batch carries it
(``req_table`` / ``req_rows``: run ``b`` starts at ``req_rows[b] * max_context`` of the flattened
table), else in the batch's flat ``kv_indices`` laid out by ``kv_indptr``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kernels.attention import (
    DecodePieces,
    NewTokenRope,
    choose_max_splits,
    decode_attention,
    decode_attention_qkv,
    decode_grid,
    extend_attention,
    piece_buffers,
    runs_from_indptr,
)
from kernels.attention.decode_cut import cut_step
from kernels.triton_utils import interpreting, num_sms
from rollout.attention.base import AttentionBackend
from rollout.batch import ForwardBatch
from rollout.cache.kv_pool import KVPool
from rollout.errors import InvalidArgumentError

# ROLLOUT_DECODE_QKV=0: decode steps take the rotary kernel and then the attention kernels.
_DECODE_QKV = os.environ.get("ROLLOUT_DECODE_QKV", "1").strip().lower() not in ("0", "false", "off", "no")
# ROLLOUT_MIN_SPLIT_TOKENS: the shortest piece of a request's KV in a decode step (see plan_kv_splits).
# 64, one KV tile: a split kernel launched with PDL loads a piece's first tile before it waits for
# the qkv matmul, so short contexts split into one-tile pieces have all their KV loaded early
# (H200, Qwen3-0.6B batch 1 at 128-640 tokens: 0.75 ms per token, 0.83 with pieces of 128).
_MIN_SPLIT_TOKENS = max(1, int(os.environ.get("ROLLOUT_MIN_SPLIT_TOKENS", "64")))
# ROLLOUT_DECODE_CUT / ROLLOUT_DECODE_SPARE: how decode steps cut the requests' KV (module doc).
_BALANCED = os.environ.get("ROLLOUT_DECODE_CUT", "uniform").strip().lower() == "balanced"
_SPARE = max(0.0, float(os.environ.get("ROLLOUT_DECODE_SPARE", "0.5")))


@dataclass(frozen=True, slots=True)
class _StepPlan:
    """Host-side launch facts of one step, fixed in ``prepare``."""

    is_decode: bool
    batch_size: int
    max_extend_len: int  # extend grid rows
    pieces: DecodePieces | None  # decode only: the cut of the requests' KV runs
    kv_indices: torch.Tensor  # (N,) slots: the flattened request table or the batch's kv_indices
    kv_starts: torch.Tensor  # (B,) where each request's run starts in kv_indices
    kv_lens: torch.Tensor  # (B,) its length


class TritonAttentionBackend(AttentionBackend):
    """Paged attention with Triton kernels (decode: split-KV, extend: causal tiled)."""

    supports_cuda_graph = True
    reads_req_table = True
    capturable_prepare = True  # a decode step's split counts and run starts are device math

    def __init__(
        self,
        kv_pool: KVPool,
        *,
        max_batch_size: int = 256,
        max_kv_splits: int = 16,
        min_split_tokens: int = _MIN_SPLIT_TOKENS,
        deterministic: bool = False,
        balanced: bool = _BALANCED,
        spare: float = _SPARE,
    ) -> None:
        super().__init__(kv_pool)
        self.deterministic = deterministic
        if kv_pool.device.type != "cuda" and not interpreting():
            raise InvalidArgumentError(
                f"the triton backend needs a CUDA device, got {kv_pool.device} "
                "(CPU runs only in Triton's interpreter, TRITON_INTERPRET=1)",
                field="attention_backend",
            )
        self.max_kv_splits = max_kv_splits
        self.min_split_tokens = min_split_tokens
        self.balanced, self.spare = balanced, spare
        self._sm_count = num_sms(kv_pool.device)
        self._size_buffers(max_batch_size)
        self._plan: _StepPlan | None = None

    def _size_buffers(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        # Sized for every batch up to max_batch_size: the counts and firsts by the batch, the owner
        # list by the most pieces any batch takes beyond one per request.
        extra = max(self._grid(b) - b for b in range(1, max_batch_size + 1))
        self._pieces = piece_buffers(max_batch_size, max_batch_size + extra, self.kv_pool.device)
        self._kv_starts = torch.zeros(max_batch_size, dtype=torch.int64, device=self.kv_pool.device)  # (B_max,)
        self._kv_lens = torch.zeros(max_batch_size, dtype=torch.int64, device=self.kv_pool.device)  # (B_max,)
        self._workspace: torch.Tensor | None = None  # flat fp32: partial outputs, then their lse

    def init_cuda_graph(self, max_bs: int, max_kv_tokens: int) -> None:
        """Size the split-count buffer for ``max_bs`` requests (the KV index buffers are the batch's own)."""
        if max_bs > self.max_batch_size:  # before any capture, so no graph holds the old buffers
            self._size_buffers(max_bs)

    def prepare(self, batch: ForwardBatch) -> None:
        """Fix the grid of this step; for decode, write each request's split count and KV start into
        fixed buffers (device math only, so a captured decode graph reads them at replay)."""
        bs = batch.batch_size
        decode = batch.is_decode
        fixed = decode and bs <= self.max_batch_size
        if batch.req_table is not None:
            # Extends (speculative verify steps) are captured in graphs too: their KV starts also
            # go to the fixed buffer, which no step still in flight can read (stream order).
            fixed = bs <= self.max_batch_size
            # A captured graph reads seq_lens where the batch keeps them: the graph runner's static
            # batch does, at a fixed address.
            assert batch.req_rows is not None, "a batch with req_table needs req_rows"
            table = batch.req_table
            kv_indices, kv_lens = table.view(-1), batch.seq_lens
            if fixed:
                kv_starts = torch.mul(batch.req_rows, table.stride(0), out=self._kv_starts[:bs])
            else:
                kv_starts = batch.req_rows * table.stride(0)
        else:
            assert batch.kv_indptr is not None and batch.kv_indices is not None, "a batch needs KV indices"
            kv_indices = batch.kv_indices
            indptr = batch.kv_indptr
            if fixed:  # runs_from_indptr would make new tensors each step, unseen by a captured graph
                kv_starts = self._kv_starts[:bs]
                kv_starts.copy_(indptr[:-1])
                kv_lens = torch.sub(indptr[1:], indptr[:-1], out=self._kv_lens[:bs])
            else:
                kv_starts, kv_lens = runs_from_indptr(indptr)
        if not decode or self.deterministic:
            self._plan = _StepPlan(False, bs, max(batch.extend_lens_cpu, default=0), None,
                                   kv_indices, kv_starts, kv_lens)
            return
        max_splits, grid = self._max_splits(bs), self._grid(bs)
        if fixed:
            own = self._pieces
            pieces = DecodePieces(own.counts[:bs], own.first[:bs], own.owner[:max(grid - bs, 1)], grid, max_splits)
        else:  # an oversized batch (never graphed): buffers of its own
            pieces = piece_buffers(bs, grid, batch.seq_lens.device, max_splits)
        cut_step(batch.seq_lens, self.min_split_tokens, pieces, balanced=self.balanced)
        self._plan = _StepPlan(True, bs, 1, pieces, kv_indices, kv_starts, kv_lens)

    def _max_splits(self, batch_size: int) -> int:
        return choose_max_splits(batch_size, self.kv_pool.num_kv_heads, self._sm_count, self.max_kv_splits)

    def _grid(self, batch_size: int) -> int:
        """Pieces in a decode step's grid (``decode_grid``; ``B * max_splits`` for the uniform cut)."""
        if not self.balanced:
            return batch_size * self._max_splits(batch_size)
        return decode_grid(batch_size, self.kv_pool.num_kv_heads, self._sm_count, self.max_kv_splits, self.spare)

    def forward(
        self,
        q: torch.Tensor,  # (T, Hq, D)
        k: torch.Tensor,  # (T, Hkv, D)
        v: torch.Tensor,  # (T, Hkv, D)
        layer_id: int,
        scale: float,
        batch: ForwardBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # (T, Hq, D)
        plan = self._plan
        assert plan is not None and plan.batch_size == batch.batch_size, "prepare() the batch first"
        if not kv_stored:
            self.kv_pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        k_buf = self.kv_pool.k_buffers[layer_id]  # (slots, Hkv, D)
        v_buf = self.kv_pool.v_buffers[layer_id]
        if not plan.is_decode:
            return extend_attention(
                q, k_buf, v_buf, batch.qo_indptr, plan.kv_indices, plan.kv_starts, plan.kv_lens, scale,
                plan.max_extend_len, deterministic=self.deterministic,
            ).to(q.dtype)
        pieces = plan.pieces
        assert pieces is not None
        mid_o, mid_lse = self._decode_workspace(pieces, q.shape[1], q.shape[2])
        out = decode_attention(
            q, k_buf, v_buf, plan.kv_indices, plan.kv_starts, plan.kv_lens, scale, pieces,
            mid_o=mid_o, mid_lse=mid_lse,
        )
        return out.to(q.dtype)

    def forward_decode_qkv(
        self,
        qkv: torch.Tensor,
        num_q_heads: int,
        rope: NewTokenRope,
        layer_id: int,
        scale: float,
        batch: ForwardBatch,
    ) -> torch.Tensor | None:
        """Decode steps: ``decode_attention_qkv`` (q/k norm and rotary in the split kernel, which also
        stores the new k and v), where the cache holds qkv's dtype and the heads suit the kernel."""
        plan = self._plan
        if not _DECODE_QKV or plan is None or not plan.is_decode or plan.batch_size != batch.batch_size:
            return None
        k_buf = self.kv_pool.k_buffers[layer_id]
        v_buf = self.kv_pool.v_buffers[layer_id]
        num_kv_heads, head_dim = k_buf.shape[1], k_buf.shape[2]
        if (qkv.dtype != k_buf.dtype or qkv.dim() != 2 or qkv.stride(-1) != 1 or head_dim < 32
                or head_dim & (head_dim - 1) or qkv.shape[1] != (num_q_heads + 2 * num_kv_heads) * head_dim):
            return None
        pieces = plan.pieces
        assert pieces is not None
        mid_o, mid_lse = self._decode_workspace(pieces, num_q_heads, head_dim)
        return decode_attention_qkv(
            qkv, num_q_heads, rope, k_buf, v_buf, plan.kv_indices, plan.kv_starts, plan.kv_lens, scale, pieces,
            mid_o=mid_o, mid_lse=mid_lse,
        )

    def _decode_workspace(
        self, pieces: DecodePieces, num_q_heads: int, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(mid_o (G, Hq, D), mid_lse (G, Hq))`` of the workspace for a grid of G pieces."""
        per_piece = num_q_heads * (head_dim + 1)
        need = pieces.grid * per_piece
        workspace = self._workspace
        if workspace is None and pieces.grid <= self._pieces.grid:
            workspace = self._workspace = torch.empty(
                self._pieces.grid * per_piece, dtype=torch.float32, device=self.kv_pool.device
            )
        if workspace is None or workspace.numel() < need:
            # Oversized batch, or a head shape the workspace was not sized for: this step only.
            workspace = torch.empty(need, dtype=torch.float32, device=self.kv_pool.device)
        n_o = pieces.grid * num_q_heads * head_dim
        mid_o = workspace[:n_o].view(pieces.grid, num_q_heads, head_dim)
        mid_lse = workspace[n_o:need].view(pieces.grid, num_q_heads)
        return mid_o, mid_lse
