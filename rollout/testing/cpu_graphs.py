"""A CPU stand-in for the captured decode graphs: the model runner's graph decode path without CUDA.

On a GPU a decode step of a backend that reads the request table (Triton) replays a captured graph
(``ModelRunner._replay_decode``): its inputs and sampling draws go to the graphs' static buffers in
one copy, the previous step's samples are put in place on the device, the static batch is replayed.
None of that runs on a CPU, where nothing is captured. ``install_cpu_graphs`` puts a
``CpuDecodeGraphs`` in the runner's place for graphs: the same static buffers and static batches,
and a replay that runs the forward eagerly on them (``run_model=True``: the tests compare it with
the eager path; a backend that does not read the request table gets the KV indices gathered from
it, as the eager path gathers them) or returns a fixed hidden state (``run_model=False``: the forward costs nothing, for
timing the engine's own work in ``examples/profile_host_step.py``).
"""

from __future__ import annotations

import dataclasses
from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from rollout.batch import ForwardBatch
from rollout.runner.cuda_graph import DecodeGraphRunner

if TYPE_CHECKING:
    from rollout.runner.model_runner import ModelRunner


class CpuDecodeGraphs(DecodeGraphRunner):
    """``DecodeGraphRunner``'s buffers and replay path, with an eager forward (or none) for the replay."""

    def __init__(self, runner: ModelRunner, max_bs: int, run_model: bool) -> None:
        backend = runner.attn_backend
        if not backend.supports_cuda_graph:  # the base class would ask it for graph buffers
            backend.init_cuda_graph = lambda max_bs, max_kv: None
        try:
            super().__init__(runner.model, backend, max_bs, 0, runner.device, req_table=runner.req_table,
                             padding_row=runner.padding_row, feature_store=runner.feature_store)
        finally:
            if not backend.supports_cuda_graph:
                del backend.init_cuda_graph
        self.req_table = runner.req_table  # table mode, as with the Triton backend on a GPU
        self.kv_indptr = self.kv_indices = None
        self.run_model = run_model
        self._hidden = (runner.config.model.hidden_size, runner.dtype)

    def capture(self) -> None:
        """Nothing is captured; without a forward each graph size gets a fixed zero hidden state."""
        if not self.run_model:
            hidden, dtype = self._hidden
            self.outputs = {bs: torch.zeros(bs, hidden, dtype=dtype, device=self.device) for bs in self.batch_sizes}

    def replay(self, gbs: int) -> torch.Tensor:
        """The hidden states (gbs, hidden) of the static batch of graph ``gbs``, as a replay gives them."""
        batch = self.static_batch(gbs)
        if not self.run_model:
            self.backend.prepare(batch)
            return self.outputs[gbs]
        if not self.backend.reads_req_table:
            batch = self._with_kv_indices(batch)
        self.backend.prepare(batch)
        return self.model(batch)

    def _with_kv_indices(self, static: ForwardBatch) -> ForwardBatch:
        """``static`` as a flat-index batch, for a backend that does not read the request table: each
        row's KV slots gathered from the table (where the runner wrote this step's new slots)."""
        seq_lens = static.seq_lens.tolist()
        indptr = torch.tensor([0, *accumulate(seq_lens)], dtype=torch.int64, device=self.device)  # (B+1,)
        entry = torch.repeat_interleave(torch.arange(len(seq_lens), device=self.device), static.seq_lens)  # (K,)
        pos = torch.arange(int(indptr[-1]), device=self.device) - indptr[entry]  # (K,)
        return dataclasses.replace(
            static, kv_indptr=indptr, kv_indices=self.req_table[static.req_rows[entry], pos],
            seq_lens_cpu=seq_lens, prefix_lens_cpu=[n - 1 for n in seq_lens], req_rows=None, req_table=None)


def install_cpu_graphs(runner: ModelRunner, run_model: bool = True) -> CpuDecodeGraphs:
    """Give ``runner`` a ``CpuDecodeGraphs`` for batches up to the engine's graph limit, whatever
    its attention backend (the replay path is put in table mode, as with Triton on a GPU)."""
    cfg = runner.config
    graphs = CpuDecodeGraphs(runner, min(cfg.cuda_graph_max_bs, cfg.scheduler.max_running_requests), run_model)
    graphs.capture()
    runner.graphs = graphs
    return graphs
