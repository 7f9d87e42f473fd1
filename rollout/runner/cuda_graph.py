"""CUDA graphs for decode steps: capture the model forward once per batch size, replay after.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
cost, which dominates small models and small batches. Each graph reads its inputs from static
buffers, which a step fills before the replay. A batch of ``bs`` requests replays the smallest
graph of ``gbs >= bs`` rows; the ``gbs - bs`` padding rows are one token each that writes and
reads slot 0 (the KV pool's padding slot) at position 0.

Two ways in, after the attention backend:

- It reads the request table (``reads_req_table``, the Triton backend): the per-request inputs of
  graph ``gbs`` are one packed int64 buffer, ``| input_ids | positions | out_cache_loc | req_rows
  | seq_lens |``, ``gbs`` entries each, which the runner fills with one host-to-device copy,
  padding rows included (``packed_inputs``; the padding rows point at the table's padding row).
  No per-step index array exists at all.
- Otherwise (flashinfer): ``run(batch)`` copies an eager batch's tensors into the static buffers,
  its ``kv_indices`` included, and pads them on the device.

The attention backend's ``prepare()`` runs eagerly before each replay and must write its metadata
into buffers whose addresses stay fixed (see ``AttentionBackend.supports_cuda_graph``); a backend
whose decode ``prepare()`` is device work only (``capturable_prepare``: Triton) has it captured
in the graph instead, which saves its handful of launches from the host on every step.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging

import torch

from rollout.batch import ForwardBatch

logger = logging.getLogger(__name__)

# Segments of the packed input buffer, in order.
PACKED_FIELDS = ("input_ids", "positions", "out_cache_loc", "req_rows", "seq_lens")


def default_graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 32: dense where padding would cost most."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(288, 1025, 32))
    return [s for s in sizes if s <= max_bs] or [max_bs]


_LOGITS_SIZES = default_graph_batch_sizes(1024)


def logits_rows(n: int) -> int:
    """The row count the LM head runs at for ``n`` sampled rows: the decode graph sizes (1, 2, 4,
    then multiples of 8 to 256, of 32 to 1024), then multiples of 256."""
    if n <= _LOGITS_SIZES[-1]:
        return _LOGITS_SIZES[bisect.bisect_left(_LOGITS_SIZES, n)]
    return -(-n // 256) * 256


class DecodeGraphRunner:
    """Captured decode forwards for a set of batch sizes, sharing one memory pool."""

    def __init__(self, model: torch.nn.Module, attn_backend, max_bs: int, max_kv_tokens: int,
                 device: torch.device, batch_sizes: list[int] | None = None,
                 req_table: torch.Tensor | None = None, padding_row: int = 0,
                 routed_experts: torch.Tensor | None = None, feature_store: torch.Tensor | None = None) -> None:
        self.model = model
        self.routed_experts = routed_experts  # the MoE layers' static routing buffer, when recorded
        self.feature_store = feature_store  # per-slot final hidden states (ForwardBatch.feature_store)
        self.backend = attn_backend
        self.device = device
        self.batch_sizes = sorted(batch_sizes or default_graph_batch_sizes(max_bs))
        self.max_bs = self.batch_sizes[-1]
        # Table mode: the backend reads the request table, whose padding row the padding rows use.
        self.req_table = req_table if getattr(attn_backend, "reads_req_table", False) else None
        self.padding_row = padding_row
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        # Room after the inputs of the largest graph for as many values again plus one (the step's
        # sampling draws ride in the same copy: ``packed_inputs``).
        self.packed = torch.zeros((len(PACKED_FIELDS) + 1) * self.max_bs + 1, **i64)
        self.qo_indptr = torch.arange(self.max_bs + 1, **i64)
        self.logits_indices = torch.arange(self.max_bs, **i64)
        if self.req_table is None:
            self.max_kv_tokens = max_kv_tokens + self.max_bs  # room for the padding rows' entries
            self.kv_indptr = torch.arange(self.max_bs + 1, **i32)
            self.kv_indices = torch.zeros(self.max_kv_tokens, **i64)
        else:
            self.max_kv_tokens = 0
            self.kv_indptr = self.kv_indices = None
        self._static: dict[int, ForwardBatch] = {}  # graph size -> its static batch (views only)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.backend.init_cuda_graph(self.max_bs, max_kv_tokens)

    @property
    def table_mode(self) -> bool:
        return self.req_table is not None

    def graph_size(self, bs: int) -> int:
        """The batch size of the graph that runs ``bs`` requests (``bs <= max_bs``)."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]

    def _fields(self, gbs: int) -> dict[str, torch.Tensor]:
        """Views of graph ``gbs``'s packed inputs, one ``gbs``-entry segment per field."""
        return {name: self.packed[i * gbs: (i + 1) * gbs] for i, name in enumerate(PACKED_FIELDS)}

    def packed_inputs(self, gbs: int, extra: int = 0) -> torch.Tensor:
        """The ``len(PACKED_FIELDS) * gbs`` buffer that graph ``gbs`` reads (table mode), followed by
        ``extra`` more values (at most ``max_bs + 1``) that the graph does not read."""
        assert extra <= self.max_bs + 1
        return self.packed[: len(PACKED_FIELDS) * gbs + extra]

    def static_batch(self, gbs: int) -> ForwardBatch:
        """The batch graph ``gbs`` was captured on; its tensors are views of the static buffers.

        One object per graph size, built once (a step replays with it): read it, never assign
        its fields."""
        batch = self._static.get(gbs)
        if batch is None:
            batch = self._static[gbs] = self._new_static_batch(gbs)
        return batch

    def _new_static_batch(self, gbs: int) -> ForwardBatch:
        f = self._fields(gbs)
        return ForwardBatch(
            input_ids=f["input_ids"], positions=f["positions"], out_cache_loc=f["out_cache_loc"],
            qo_indptr=self.qo_indptr[: gbs + 1],
            kv_indptr=None if self.table_mode else self.kv_indptr[: gbs + 1],
            kv_indices=None if self.table_mode else self.kv_indices,
            seq_lens=f["seq_lens"], logits_indices=self.logits_indices[:gbs],
            seq_lens_cpu=[1] * gbs, extend_lens_cpu=[1] * gbs, prefix_lens_cpu=[0] * gbs, attn_backend=self.backend,
            req_rows=f["req_rows"] if self.table_mode else None, req_table=self.req_table,
            routed_experts=self.routed_experts, feature_store=self.feature_store,
        )

    def _reset_inputs(self, gbs: int) -> None:
        """Every row of graph ``gbs`` a padding row (what it is captured on)."""
        f = self._fields(gbs)
        for name in ("input_ids", "positions", "out_cache_loc"):
            f[name].zero_()
        f["req_rows"].fill_(self.padding_row)
        f["seq_lens"].fill_(1)
        if not self.table_mode:
            self.kv_indptr[: gbs + 1].copy_(self.qo_indptr[: gbs + 1])
            self.kv_indices[:gbs].zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per batch size, largest first so smaller ones reuse its pool."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):
                self._reset_inputs(bs)
                batch = self.static_batch(bs)
                self.backend.prepare(batch)
                for _ in range(2):  # warm up: autotuning and lazy init happen outside the capture
                    self.model(batch)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    if self.backend.capturable_prepare:  # a replay then runs it: no launches from the host
                        self.backend.prepare(batch)
                    out = self.model(batch)
                self.pool = graph.pool()
                self.graphs[bs] = graph
                self.outputs[bs] = out
        torch.cuda.current_stream(self.device).wait_stream(stream)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether ``run(batch)`` can take this eager batch (flat-index mode)."""
        return (not self.table_mode and batch.is_decode and batch.batch_size <= self.max_bs
                and batch.kv_indices is not None and batch.kv_indices.numel() <= self.max_kv_tokens - self.max_bs)

    def replay(self, gbs: int) -> torch.Tensor:
        """Replay graph ``gbs`` on what its static buffers hold; returns its hidden states (gbs, hidden)."""
        if not self.backend.capturable_prepare:
            self.backend.prepare(self.static_batch(gbs))
        self.graphs[gbs].replay()
        return self.outputs[gbs]

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Copy an eager decode batch into the smallest graph that fits it and replay it (flat-index
        mode); returns hidden states (B, hidden)."""
        bs = batch.batch_size
        gbs = self.graph_size(bs)
        assert batch.kv_indices is not None and batch.kv_indptr is not None
        f = self._fields(gbs)
        k = batch.kv_indices.numel()
        f["input_ids"][:bs].copy_(batch.input_ids)
        f["positions"][:bs].copy_(batch.positions)
        f["out_cache_loc"][:bs].copy_(batch.out_cache_loc)
        f["seq_lens"][:bs].copy_(batch.seq_lens)
        self.kv_indptr[: bs + 1].copy_(batch.kv_indptr)
        self.kv_indices[:k].copy_(batch.kv_indices)
        if gbs > bs:
            pad = gbs - bs
            f["input_ids"][bs:].zero_()
            f["positions"][bs:].zero_()
            f["out_cache_loc"][bs:].zero_()
            f["seq_lens"][bs:].fill_(1)
            # Each padding row attends to one entry: slot 0, written by its own padding token.
            self.kv_indptr[bs + 1: gbs + 1] = batch.kv_indptr[-1] + torch.arange(
                1, pad + 1, dtype=torch.int32, device=self.device)
            self.kv_indices[k: k + pad].zero_()
        static = dataclasses.replace(self.static_batch(gbs), seq_lens_cpu=batch.seq_lens_cpu + [1] * (gbs - bs))
        self.backend.prepare(static)
        self.graphs[gbs].replay()
        return self.outputs[gbs][:bs]
