"""flashinfer attention backend: paged decode and prefill kernels over the KV pool as pages of one token.

flashinfer API used (0.7.x):

- ``BatchDecodeWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout="NHD", use_cuda_graph=...,
  use_tensor_cores=..., paged_kv_indptr_buffer=, paged_kv_indices_buffer=, paged_kv_last_page_len_buffer=,
  backend="fa2")``: decode steps. Eager steps use one wrapper; CUDA graphs use one ``use_cuda_graph=True``
  wrapper per batch size (that mode fixes the batch size), all over slices of the same fixed buffers.
- ``BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout="NHD", backend=...)``: every
  other step (prefill chunks, extends after a cached prefix, mixed batches).
- ``plan(...)`` of both, with keyword options ``q_data_type``, ``kv_data_type``, ``sm_scale``, ``seq_lens``,
  ``non_blocking=True`` (prefill also ``causal=True``); ``page_size=1``, ``indices`` = our ``kv_indices``,
  ``last_page_len`` = ones. ``plan`` reads indptr on the host, so it gets pinned host tensors built from
  the batch's Python lists (no device->host sync) and the device ``kv_indices``.
- ``run(q, (k_cache, v_cache))`` with ``k_cache = k_buffers[layer].unsqueeze(1)``: (slots, 1, Hkv, D), NHD.
- ``reset_workspace_buffer(float, int)``: every wrapper shares one float and one int workspace.

Causal masking: flashinfer aligns each request's queries with the end of its KV run, which is exactly
our layout (the new tokens are the tail of the request's kv run). The softmax scale is fixed at ``plan``
time; it is learned, with the number of query heads, from the first ``forward`` (the pool does not know
them), so the very first step plans lazily inside ``forward``. A later layer with another scale rescales
its queries instead of re-planning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import flashinfer
import torch

from rollout.attention.base import AttentionBackend
from rollout.batch import ForwardBatch
from rollout.cache.kv_pool import KVPool
from rollout.errors import InvalidArgumentError

DEFAULT_WORKSPACE_BYTES = 256 << 20
# flashinfer's own default size of the integer (scheduling metadata) workspace.
INT_WORKSPACE_BYTES = 8 << 20
# The CUDA-core decode kernel is instantiated for GQA groups 1, 2, 3, 4, 6, 8, 16; the tensor-core
# (prefill-kernel) decode is faster from a group of 4 on and serves every group size.
TENSOR_CORE_MIN_GROUP = 4


@dataclass(slots=True)
class _StepPlan:
    """One step's flashinfer inputs, built in ``prepare`` and planned once the head count is known."""

    is_decode: bool
    batch_size: int
    qo_indptr: torch.Tensor | None  # (B+1,) int32 pinned host; None for decode
    kv_indptr: torch.Tensor  # (B+1,) int32 pinned host
    kv_lens: torch.Tensor  # (B,) int32 pinned host
    kv_indices: torch.Tensor  # (sum(seq_lens),) device, int32 or int64
    wrapper: Any = None  # the planned flashinfer wrapper; None until planned


@dataclass(slots=True)
class _GraphBuffers:
    """Fixed-address metadata that captured decode kernels read; every graph wrapper views slices."""

    max_bs: int
    kv_indptr: torch.Tensor  # (max_bs+1,) int32
    kv_indices: torch.Tensor  # (max_kv_tokens,) int32
    last_page_len: torch.Tensor  # (max_bs,) int32, all ones
    wrappers: dict[int, Any]  # batch size -> use_cuda_graph decode wrapper


class FlashInferBackend(AttentionBackend):
    """flashinfer paged attention (decode: batch decode kernel, else: batch prefill kernel), CUDA-graph safe.

    ``workspace_bytes`` sizes the float workspace shared by all wrappers; ``prefill_backend`` is
    flashinfer's kernel family for non-decode steps ("fa2", or "fa3" / "auto" on Hopper).
    """

    supports_cuda_graph = True

    def __init__(
        self,
        kv_pool: KVPool,
        *,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        prefill_backend: str = "fa2",
    ) -> None:
        super().__init__(kv_pool)
        if kv_pool.device.type != "cuda":
            raise InvalidArgumentError(f"flashinfer needs a CUDA device, got {kv_pool.device}", field="device")
        if kv_pool.dtype not in (torch.float16, torch.bfloat16):
            raise InvalidArgumentError(
                f"flashinfer attention supports float16 and bfloat16, got {kv_pool.dtype}", field="dtype"
            )
        self.dtype = kv_pool.dtype
        self.device = kv_pool.device
        self.prefill_backend = prefill_backend
        # flashinfer asks for a zeroed float workspace on first use.
        self._workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._int_workspace = torch.empty(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._ones = torch.ones(0, dtype=torch.int32)  # pinned host ones (last_page_len), grown on demand
        self._num_q_heads: int | None = None
        self._sm_scale: float | None = None
        self._decode: Any = None
        self._prefill: Any = None
        self._graph: _GraphBuffers | None = None
        self._step: _StepPlan | None = None

    # ------------------------------------------------------------------ setup
    def init_cuda_graph(self, max_bs: int, max_kv_tokens: int) -> None:
        """Allocate the fixed indptr / indices / last-page-length buffers that captured decode graphs read."""
        i32 = dict(dtype=torch.int32, device=self.device)
        self._graph = _GraphBuffers(
            max_bs=max_bs,
            kv_indptr=torch.zeros(max_bs + 1, **i32),
            kv_indices=torch.zeros(max_kv_tokens, **i32),
            last_page_len=torch.ones(max_bs, **i32),
            wrappers={},
        )

    @property
    def use_tensor_cores(self) -> bool:
        """Whether decode runs on the tensor-core kernel (known once the query head count is)."""
        assert self._num_q_heads is not None, "head count not known before the first forward"
        return self._num_q_heads // self.kv_pool.num_kv_heads >= TENSOR_CORE_MIN_GROUP

    def _share_workspace(self, wrapper: Any) -> Any:
        wrapper.reset_workspace_buffer(self._workspace, self._int_workspace)
        return wrapper

    def _eager_decode_wrapper(self) -> Any:
        if self._decode is None:
            self._decode = self._share_workspace(
                flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace, kv_layout="NHD", use_tensor_cores=self.use_tensor_cores, backend="fa2"
                )
            )
        return self._decode

    def _graph_decode_wrapper(self, bs: int) -> Any:
        graph = self._graph
        assert graph is not None and bs <= graph.max_bs
        wrapper = graph.wrappers.get(bs)
        if wrapper is None:
            wrapper = self._share_workspace(
                flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace,
                    kv_layout="NHD",
                    use_cuda_graph=True,
                    use_tensor_cores=self.use_tensor_cores,
                    paged_kv_indptr_buffer=graph.kv_indptr[: bs + 1],
                    paged_kv_indices_buffer=graph.kv_indices,
                    paged_kv_last_page_len_buffer=graph.last_page_len[:bs],
                    backend="fa2",
                )
            )
            graph.wrappers[bs] = wrapper
        return wrapper

    def _prefill_wrapper(self) -> Any:
        if self._prefill is None:
            self._prefill = self._share_workspace(
                flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                    self._workspace, kv_layout="NHD", backend=self.prefill_backend
                )
            )
        return self._prefill

    # ------------------------------------------------------------------ per step
    def _pinned_ones(self, n: int) -> torch.Tensor:
        # Never written after creation, so slices may be reused while earlier copies are in flight.
        if self._ones.numel() < n:
            self._ones = torch.ones(max(n, 2 * self._ones.numel()), dtype=torch.int32, pin_memory=True)
        return self._ones[:n]

    def prepare(self, batch: ForwardBatch) -> None:
        """Build the step's host-side indptrs from the batch's CPU lists and plan the kernels."""
        seq_lens = batch.seq_lens_cpu
        kv_indptr = [0, *accumulate(seq_lens)]
        pinned = dict(dtype=torch.int32, pin_memory=True)
        is_decode = batch.is_decode
        self._step = _StepPlan(
            is_decode=is_decode,
            batch_size=batch.batch_size,
            qo_indptr=None if is_decode else torch.tensor([0, *accumulate(batch.extend_lens_cpu)], **pinned),
            kv_indptr=torch.tensor(kv_indptr, **pinned),
            kv_lens=torch.tensor(seq_lens, **pinned),
            # A CUDA-graph batch hands over its whole static index buffer: keep the entries in use.
            kv_indices=batch.kv_indices[: kv_indptr[-1]],
        )
        if self._num_q_heads is not None:
            self._plan(self._step)

    def _plan(self, step: _StepPlan) -> None:
        """Pick the wrapper for ``step`` and run flashinfer's host-side scheduling for it."""
        assert self._num_q_heads is not None and self._sm_scale is not None
        common = dict(
            num_qo_heads=self._num_q_heads,
            num_kv_heads=self.kv_pool.num_kv_heads,
            page_size=1,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            sm_scale=self._sm_scale,
            seq_lens=step.kv_lens,
            non_blocking=True,
        )
        head_dim = self.kv_pool.head_dim
        last_page_len = self._pinned_ones(step.batch_size)
        if step.is_decode:
            graph = self._graph
            fits = graph is not None and step.batch_size <= graph.max_bs
            if fits and step.kv_indices.numel() <= graph.kv_indices.numel():
                # plan() copies indptr and indices into the fixed buffers (int64 -> int32 on device).
                wrapper, indices = self._graph_decode_wrapper(step.batch_size), step.kv_indices
            else:
                wrapper, indices = self._eager_decode_wrapper(), step.kv_indices.to(torch.int32)
            wrapper.plan(step.kv_indptr, indices, last_page_len, head_dim=head_dim, **common)
        else:
            wrapper = self._prefill_wrapper()
            wrapper.plan(
                step.qo_indptr,
                step.kv_indptr,
                step.kv_indices.to(torch.int32),
                last_page_len,
                head_dim_qk=head_dim,
                causal=True,
                **common,
            )
        step.wrapper = wrapper

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
        step = self._step
        assert step is not None and step.batch_size == batch.batch_size, "prepare() the batch first"
        if not kv_stored:
            self.kv_pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        if step.wrapper is None:
            self._learn_and_plan(step, q.shape[1], scale)
        assert q.shape[1] == self._num_q_heads, "query head count changed between layers"
        qq = q.to(self.dtype)
        if not math.isclose(scale, self._sm_scale, rel_tol=1e-6):
            qq = qq * (scale / self._sm_scale)  # plan fixed the scale; this layer asks for another
        k_cache = self.kv_pool.k_buffers[layer_id].unsqueeze(1)  # (slots, 1, Hkv, D): pages of one token
        v_cache = self.kv_pool.v_buffers[layer_id].unsqueeze(1)
        out = step.wrapper.run(qq, (k_cache, v_cache))  # (T, Hq, D)
        return out.to(q.dtype)

    def _learn_and_plan(self, step: _StepPlan, num_q_heads: int, scale: float) -> None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("flashinfer backend: run one eager forward before capturing a CUDA graph")
        assert num_q_heads % self.kv_pool.num_kv_heads == 0, "query heads must be a multiple of KV heads"
        self._num_q_heads = num_q_heads
        self._sm_scale = scale
        self._plan(step)
