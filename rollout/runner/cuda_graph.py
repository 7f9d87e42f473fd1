"""CUDA graphs for decode steps: capture the model forward once per batch size, replay after.

A decode step launches hundreds of small kernels; replaying a captured graph removes their launch
cost, which dominates small models and small batches. Each graph reads its inputs from static
buffers, so a replay first copies the step's tensors into them:

    static buffers (max_bs rows)      | real rows of this step | padding rows up to the graph size |
    input_ids / positions             | copied                 | token 0 at position 0             |
    out_cache_loc                     | copied                 | slot 0 (the padding slot)          |
    kv_indptr / kv_indices            | copied                 | one KV entry each, slot 0          |

The attention backend's ``prepare()`` runs eagerly before each replay and must write its metadata
into buffers whose addresses stay fixed (see ``AttentionBackend.supports_cuda_graph``).
"""

from __future__ import annotations

import bisect
import logging

import torch

from rollout.runner.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


def default_graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 32: dense where padding would cost most."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(288, 1025, 32))
    return [s for s in sizes if s <= max_bs] or [max_bs]


class DecodeGraphRunner:
    """Captured decode forwards for a set of batch sizes, sharing one memory pool."""

    def __init__(self, model: torch.nn.Module, attn_backend, max_bs: int, max_kv_tokens: int,
                 device: torch.device, batch_sizes: list[int] | None = None) -> None:
        self.model = model
        self.backend = attn_backend
        self.device = device
        self.batch_sizes = sorted(batch_sizes or default_graph_batch_sizes(max_bs))
        self.max_bs = self.batch_sizes[-1]
        self.max_kv_tokens = max_kv_tokens + self.max_bs  # room for the padding rows' entries
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(self.max_bs, **i64)
        self.positions = torch.zeros(self.max_bs, **i64)
        self.out_cache_loc = torch.zeros(self.max_bs, **i64)
        self.qo_indptr = torch.arange(self.max_bs + 1, **i32)
        self.kv_indptr = torch.arange(self.max_bs + 1, **i32)
        self.kv_indices = torch.zeros(self.max_kv_tokens, **i64)
        self.seq_lens = torch.ones(self.max_bs, **i32)
        self.logits_indices = torch.arange(self.max_bs, **i64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.backend.init_cuda_graph(self.max_bs, self.max_kv_tokens)

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], out_cache_loc=self.out_cache_loc[:bs],
            qo_indptr=self.qo_indptr[: bs + 1], kv_indptr=self.kv_indptr[: bs + 1], kv_indices=self.kv_indices,
            seq_lens=self.seq_lens[:bs], logits_indices=self.logits_indices[:bs],
            seq_lens_cpu=[1] * bs, extend_lens_cpu=[1] * bs, prefix_lens_cpu=[0] * bs, attn_backend=self.backend,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per batch size, largest first so smaller ones reuse its pool."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):
                batch = self._static_batch(bs)
                self.backend.prepare(batch)
                for _ in range(2):  # warm up: autotuning and lazy init happen outside the capture
                    self.model(batch)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    out = self.model(batch)
                self.pool = graph.pool()
                self.graphs[bs] = graph
                self.outputs[bs] = out
        torch.cuda.current_stream(self.device).wait_stream(stream)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.batch_size <= self.max_bs and batch.kv_indices.numel() <= (
            self.max_kv_tokens - self.max_bs)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Replay the smallest graph that fits ``batch``; returns hidden states (B, hidden)."""
        bs = batch.batch_size
        gbs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, bs)]
        k = batch.kv_indices.numel()
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_cache_loc[:bs].copy_(batch.out_cache_loc)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        self.kv_indptr[: bs + 1].copy_(batch.kv_indptr)
        self.kv_indices[:k].copy_(batch.kv_indices)
        if gbs > bs:
            pad = gbs - bs
            self.input_ids[bs:gbs].zero_()
            self.positions[bs:gbs].zero_()
            self.out_cache_loc[bs:gbs].zero_()
            self.seq_lens[bs:gbs].fill_(1)
            # Each padding row attends to one entry: slot 0, written by its own padding token.
            self.kv_indptr[bs + 1: gbs + 1] = batch.kv_indptr[-1] + torch.arange(
                1, pad + 1, dtype=torch.int32, device=self.device)
            self.kv_indices[k: k + pad].zero_()
        static = self._static_batch(gbs)
        static.seq_lens_cpu = batch.seq_lens_cpu + [1] * (gbs - bs)
        self.backend.prepare(static)
        self.graphs[gbs].replay()
        return self.outputs[gbs][:bs]
