"""CUDA graphs for speculative verify steps: the target forward over each sequence's last token and
its drafts, captured once per (k, batch size) and replayed.

An eager verify forward launches as many kernels as a decode step, and at batch 1 its launch time
is longer than the GPU work (a verify step of an 8B model took ~4x a graphed decode step).

Graph (k, G) holds ``G`` sequences of ``k + 1`` tokens each, ``T = G * (k + 1)`` tokens,
sequence-major. A step whose sequences verify ``k_i <= k`` drafts each (``k_i = 0``: a plain decode
riding along) fits it: sequence ``i`` is its ``k_i + 1`` tokens, then ``k - k_i`` filler tokens at
the next positions, which write slot 0 (the KV pool's padding slot) and whose outputs nobody reads.
The fillers' request-table entries (slot 0, past the sequence's end) are never read by a real
query (causal masking) and are overwritten by the next step's own entries before it reads them.
Padding sequences (``G - b``) are ``k + 1`` fillers at positions ``0..k`` of the table's padding
row, as the decode graphs' padding rows are. The inputs are one packed int64 buffer, filled by one
host-to-device copy::

    | input_ids T | positions T | out_cache_loc T | token_rows T | verify_index T | draft_index T |
    | req_rows G | seq_lens G |

``verify_index`` lists the graph token of each verify row (the plan's tokens, in order) and
``draft_index`` the graph token of each draft input (for drafts made on the device).

Attention runs on a Triton backend of its own over the engine's KV pool (whatever backend serves
the other steps): its extend kernel reads each request's KV through the request table from fixed
buffers, so nothing in a captured step depends on host values but (k, G). A step that also carries
a prompt chunk, or drafts more than any graph's ``k``, runs eagerly.
"""

from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from rollout.attention.triton_backend import TritonAttentionBackend
from rollout.batch import BatchPlan, ForwardBatch
from rollout.cache.kv_pool import KVPool
from rollout.cache.req_table import ReqToTokenTable
from rollout.runner.cuda_graph import default_graph_batch_sizes

logger = logging.getLogger(__name__)


def verify_width(plan: BatchPlan) -> int | None:
    """The most drafts any entry of a speculative plan verifies, when every entry is a verify or
    decode entry (one sampled token plus its drafts); None otherwise (a prompt chunk rides along)."""
    spec = plan.spec
    if spec is None or not spec.num_drafts or not all(plan.sample) or plan.future_inputs:
        return None
    if any(e != k + 1 for e, k in zip(plan.extend_lens, spec.num_drafts)):
        return None
    return max(spec.num_drafts)


class VerifyGraphRunner:
    """Verify forwards for every (k in ``ks``, batch size up to ``max_bs``), as CUDA graphs.

    Without ``capture()`` (CPU, tests) ``run`` uses the same static buffers and packing but runs the
    forward eagerly on them, so the layout is checked where graphs cannot be captured.
    ``max_position``: fillers must stay below it (the context length); a step that would pass it
    runs eagerly.
    """

    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, req_table: ReqToTokenTable, ks: list[int],
                 max_bs: int, device: torch.device, max_position: int, deterministic: bool = False,
                 feature_store: torch.Tensor | None = None) -> None:
        self.model = model
        self.feature_store = feature_store  # per-slot final hidden states (ForwardBatch.feature_store)
        self.req_table = req_table
        self.device = device
        self.ks = sorted(set(ks))
        self.batch_sizes = default_graph_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        self.max_position = max_position
        self.backend = TritonAttentionBackend(kv_pool, max_batch_size=max(self.max_bs, 1),
                                              deterministic=deterministic)
        max_tokens = self.max_bs * (self.ks[-1] + 1)
        self.packed = torch.zeros(6 * max_tokens + 2 * self.max_bs, dtype=torch.int64, device=device)
        # qo_indptr of graph (k, G): the first G + 1 entries of k's own arange.
        self.qo_indptr = {k: torch.arange(self.max_bs + 1, dtype=torch.int64, device=device) * (k + 1)
                          for k in self.ks}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.pool = None
        self.replays = 0  # steps run through these buffers (for tests and benchmarks)

    def fits(self, plan: BatchPlan) -> int | None:
        """The ``k`` of the graph that runs ``plan`` (None: run it eagerly)."""
        width = verify_width(plan)
        if width is None or width > self.ks[-1] or len(plan.rows) > self.max_bs:
            return None
        k = self.ks[bisect.bisect_left(self.ks, width)]
        if max(plan.prefix_lens) + k + 1 > self.max_position:
            return None
        return k

    def _fields(self, k: int, gbs: int) -> dict[str, torch.Tensor]:
        t = gbs * (k + 1)
        sizes = {"input_ids": t, "positions": t, "out_cache_loc": t, "token_rows": t, "verify_index": t,
                 "draft_index": t, "req_rows": gbs, "seq_lens": gbs}
        out, offset = {}, 0
        for name, n in sizes.items():
            out[name] = self.packed[offset: offset + n]
            offset += n
        return out

    def static_batch(self, k: int, gbs: int) -> ForwardBatch:
        """The batch graph (k, gbs) is captured on; its tensors are views of the static buffers."""
        f = self._fields(k, gbs)
        return ForwardBatch(
            input_ids=f["input_ids"], positions=f["positions"], out_cache_loc=f["out_cache_loc"],
            qo_indptr=self.qo_indptr[k][: gbs + 1], kv_indptr=None, kv_indices=None, seq_lens=f["seq_lens"],
            logits_indices=f["verify_index"],  # unused: every token's hidden state is returned
            seq_lens_cpu=[k + 1] * gbs, extend_lens_cpu=[k + 1] * gbs, prefix_lens_cpu=[0] * gbs,
            attn_backend=self.backend, req_rows=f["req_rows"], req_table=self.req_table.table,
            feature_store=self.feature_store,
        )

    def _host_inputs(self, plan: BatchPlan | None, k: int, gbs: int,
                     draft_pos: list[int] | None = None) -> torch.Tensor:
        """The packed inputs of graph (k, gbs) for ``plan`` (None: padding only), on the host."""
        w = k + 1
        if plan is None:
            rows_l, prefix_l, lens_l, ids, slots = [], [], [], [], []
        else:
            rows_l, prefix_l, ids, slots = plan.rows, plan.prefix_lens, plan.input_ids, plan.out_slots
            lens_l = plan.extend_lens
        b = len(rows_l)
        offs = np.arange(w, dtype=np.int64)
        prefix = np.concatenate([np.asarray(prefix_l, dtype=np.int64), np.zeros(gbs - b, dtype=np.int64)])
        lens = np.concatenate([np.asarray(lens_l, dtype=np.int64), np.zeros(gbs - b, dtype=np.int64)])
        real = offs[None, :] < lens[:, None]  # (G, w): the plan's tokens, entry-major
        tokens = np.zeros((gbs, w), dtype=np.int64)
        tokens[real] = ids
        out_slots = np.zeros((gbs, w), dtype=np.int64)
        out_slots[real] = slots
        rows = np.asarray(list(rows_l) + [self.req_table.padding_row] * (gbs - b), dtype=np.int64)
        verify_index = np.zeros(gbs * w, dtype=np.int64)
        where = np.flatnonzero(real)  # graph token of each plan token
        verify_index[: where.size] = where
        draft_index = np.zeros(gbs * w, dtype=np.int64)
        if draft_pos:
            draft_index[: len(draft_pos)] = where[np.asarray(draft_pos, dtype=np.int64)]
        host = np.concatenate([
            tokens.reshape(-1), (prefix[:, None] + offs).reshape(-1), out_slots.reshape(-1), np.repeat(rows, w),
            verify_index, draft_index, rows, prefix + w,
        ])
        return torch.from_numpy(host)

    def _load(self, plan: BatchPlan | None, k: int, gbs: int, draft_pos: list[int] | None = None) -> ForwardBatch:
        """Fill graph (k, gbs)'s inputs for ``plan`` and record the new tokens' slots in the table."""
        host = self._host_inputs(plan, k, gbs, draft_pos)
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.packed[: host.numel()].copy_(host, non_blocking=True)
        batch = self.static_batch(k, gbs)
        f = self._fields(k, gbs)
        self.req_table.write_tokens(f["token_rows"], batch.positions, batch.out_cache_loc)
        return batch

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every (k, batch size) graph, largest first so the smaller ones reuse its pool."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for k in reversed(self.ks):
                for gbs in reversed(self.batch_sizes):
                    batch = self._load(None, k, gbs)
                    self.backend.prepare(batch)
                    for _ in range(2):  # warm up: kernels compile and autotune outside the capture
                        self.model(batch)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                        out = self.model(batch)
                    self.pool = graph.pool()
                    self.graphs[(k, gbs)] = graph
                    self.outputs[(k, gbs)] = out
        torch.cuda.current_stream(self.device).wait_stream(stream)
        logger.info("captured verify CUDA graphs for k %s, batch sizes %s", self.ks, self.batch_sizes)

    def run(self, plan: BatchPlan, k: int, draft_pos: list[int] | None = None,
            draft_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states of the plan's tokens ((R, hidden), the plan's order).

        ``draft_pos`` / ``draft_ids``: drafts made on the device, to write over the plan's
        placeholder inputs at those token indices of the plan."""
        b = len(plan.rows)
        gbs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, b)]
        self.replays += 1
        batch = self._load(plan, k, gbs, draft_pos)
        f = self._fields(k, gbs)
        if draft_pos:
            batch.input_ids[f["draft_index"][: len(draft_pos)]] = draft_ids
        self.backend.prepare(batch)
        graph = self.graphs.get((k, gbs))
        if graph is None:  # not captured (CPU): the same buffers, run eagerly
            out = self.model(batch)
        else:
            graph.replay()
            out = self.outputs[(k, gbs)]
        return out[f["verify_index"][: len(plan.input_ids)]]
