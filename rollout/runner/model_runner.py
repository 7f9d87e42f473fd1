"""ModelRunner: owns the model, the KV pool and the attention backend; runs one step of a plan."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch

from rollout.attention.registry import create_attention_backend, default_attention_backend
from rollout.batch import BatchPlan, ForwardBatch, StepResult
from rollout.cache.kv_pool import create_kv_pool
from rollout.cache.req_table import ReqToTokenTable
from rollout.config import EngineConfig
from rollout.control.memory_placement import EngineMemory
from rollout.distributed.tp import SINGLE, TPGroup
from rollout.layers.batch_invariant import set_numerics
from rollout.models.loader import load_model
from rollout.runner.cuda_graph import DecodeGraphRunner, logits_rows
from rollout.runner.devices import resolve_device
from rollout.runner.routed_experts import RoutedExpertsRecorder
from rollout.runner.step_inputs import (
    copy_decode_inputs,
    draws_to_device,
    host_segments_to_device,
    put_previous_samples,
    resolve_previous_samples,
)
from rollout.runner.verify_graph import VerifyGraphRunner
from rollout.sampling.batch_cache import SamplingBatchCache
from rollout.sampling.noise import uniform_draws
from rollout.sampling.sampler import Sampler
from rollout.types import TopLogprobs

logger = logging.getLogger(__name__)

# Cap of the KV index buffer that decode graphs read (entries of all requests in one step).
MAX_GRAPH_KV_ENTRIES = 1 << 24


@dataclass(slots=True)
class QueuedStep:
    """A launched step's outputs on their way to the host (``done`` marks the copies complete)."""

    token_ids: torch.Tensor | None
    logprobs: torch.Tensor | None
    raw_logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    done: torch.cuda.Event | None
    routed_experts: torch.Tensor | None = None  # (R, L, k) int16 on its way to the host


class ModelRunner:
    """Turns a ``BatchPlan`` into tensors, runs the model forward and samples.

    One of ``tp.size`` tensor-parallel ranks: each holds its shard of the model and of the KV heads,
    and every rank runs the same steps. Rank 0 samples and broadcasts the sampled tokens, so every
    rank feeds the same inputs to the next step; the others return no tokens.
    """

    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE, model: torch.nn.Module | None = None) -> None:
        """``model``: a model built and loaded already (e.g. an EAGLE head); None: load ``config``'s."""
        self.config = config
        self.tp = tp
        self.device = resolve_device(config.device)
        self.dtype: torch.dtype = getattr(torch, config.dtype)
        # Weights and KV live in releasable regions (release_memory / resume_memory).
        self.memory = EngineMemory(self.device, config.cache.memory_backup_tags)
        self.model = self._load_model() if model is None else self._set_numerics(model)
        self.memory.place_weights(self.model)
        self.kv_pool = create_kv_pool(config, self.dtype, self.device, allocate=self.memory.allocate_kv, tp=tp)
        self.num_slots = self.kv_pool.num_slots
        # Speculative method "eagle": every computed token's final hidden state, by KV slot (the draft
        # head's input), beside the KV in the kv_cache region (counted in the pool's size).
        self.feature_store: torch.Tensor | None = None
        if config.spec.method == "eagle":
            shape = (self.num_slots, config.model.hidden_size)
            self.feature_store = self.memory.allocate_kv(shape, self.dtype, 1)[0]  # (num_slots, hidden)
        backend = config.attention_backend
        if backend == "auto":
            backend = default_attention_backend(self.device, config.deterministic)
        self.attn_backend = create_attention_backend(backend, self.kv_pool, config.deterministic)
        self.routing = self._routing_recorder()
        self.sampler = Sampler(deterministic=config.deterministic)
        self._sampling = SamplingBatchCache(self.device)  # the sampling rows of the last step, on the device
        self.req_table: torch.Tensor | None = None  # (max_requests + 1, max_context) int64, bound later
        self.padding_row = 0
        self.graphs: DecodeGraphRunner | None = None
        self.graph_bytes = 0  # device memory the decode graphs hold (static buffers + private pool)
        # Speculative verify graphs (``verify_graph.py``): the draft lengths to capture, set by the
        # speculator; captured, dropped and restored with the decode graphs.
        self.verify_ks: list[int] = []
        self.verify_max_bs = 0
        self.verify_graphs: VerifyGraphRunner | None = None
        self._graphs_dropped = False
        self._last_tokens: torch.Tensor | None = None  # the last launched step's samples (B,), on the device

    def prepare(self, req_table: ReqToTokenTable) -> None:
        """Finish the set-up once the request table exists: bind it, capture the decode graphs and
        load the LM head's kernels. Every rank does this in the same order (each part may run
        collectives)."""
        self.bind_req_table(req_table)
        self.capture_cuda_graphs()
        if self.device.type == "cuda":
            self.warm_logits(self.config.scheduler.max_running_requests)

    def capture_cuda_graphs(self) -> None:
        """Capture decode graphs when the device and the attention backend allow it."""
        cfg = self.config
        if self.device.type != "cuda" or not cfg.cuda_graph_max_bs or not self.attn_backend.supports_cuda_graph:
            return
        max_bs = min(cfg.cuda_graph_max_bs, cfg.scheduler.max_running_requests)
        max_kv = min(max_bs * cfg.context_length, MAX_GRAPH_KV_ENTRIES)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        self.graphs = DecodeGraphRunner(self.model, self.attn_backend, max_bs, max_kv, self.device,
                                        req_table=self.req_table, padding_row=self.padding_row,
                                        routed_experts=self.routing.step if self.routing is not None else None,
                                        feature_store=self.feature_store)
        self.graphs.capture()
        torch.cuda.synchronize(self.device)
        self.graph_bytes = max(torch.cuda.memory_reserved(self.device) - before, 0)
        self.capture_verify_graphs(self.verify_ks, self.verify_max_bs)

    def capture_verify_graphs(self, ks: list[int], max_bs: int) -> None:
        """Capture speculative verify graphs for draft lengths ``ks`` up to ``max_bs`` sequences
        (beside the decode graphs: only where those are captured)."""
        self.verify_ks, self.verify_max_bs = sorted(set(ks)), max_bs
        if self.graphs is None or not ks or not max_bs:
            return
        before = torch.cuda.memory_reserved(self.device)
        self.verify_graphs = VerifyGraphRunner(self.model, self.kv_pool, self._req_table, self.verify_ks,
                                               max_bs, self.device, self.config.context_length,
                                               self.config.deterministic, feature_store=self.feature_store)
        self.verify_graphs.capture()
        torch.cuda.synchronize(self.device)
        self.graph_bytes += max(torch.cuda.memory_reserved(self.device) - before, 0)

    def drop_cuda_graphs(self) -> None:
        """Free the decode graphs and their memory (release of the ``cuda_graph`` tag).

        Their private pool belongs to torch's allocator, not to a releasable region, so the graphs
        are dropped and captured again by ``restore_cuda_graphs`` rather than unmapped in place.
        """
        if self.graphs is None:
            return
        self.graphs = self.verify_graphs = None
        self._graphs_dropped = True
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def restore_cuda_graphs(self) -> None:
        """Capture the graphs dropped by ``drop_cuda_graphs`` again (weights and KV must be mapped)."""
        if self._graphs_dropped:
            self._graphs_dropped = False
            self.capture_cuda_graphs()

    def _load_model(self) -> torch.nn.Module:
        model = load_model(self.config.model, self.config.model_path, self.dtype, self.device,
                           load_format=self.config.load_format, tp=self.tp)
        return self._set_numerics(model)

    def _set_numerics(self, model: torch.nn.Module) -> torch.nn.Module:
        model.eval()
        return set_numerics(model, batch_invariant=self.config.deterministic, fp32_lm_head=self.config.fp32_lm_head)

    def _routing_recorder(self) -> RoutedExpertsRecorder | None:
        """The routed-expert buffers when the engine records routing (``enable_return_routed_experts``)."""
        cfg = self.config
        if not cfg.enable_return_routed_experts:
            return None
        sch = cfg.scheduler
        return RoutedExpertsRecorder(self.num_slots, max(sch.max_num_batched_tokens, sch.max_running_requests),
                                     len(cfg.model.moe_layer_ids), cfg.model.num_experts_per_tok, self.device,
                                     allocate=self.memory.allocate_kv)

    def close(self) -> None:
        """Drop graphs, KV and weights and return their memory to the device."""
        self.graphs = self.verify_graphs = None
        self.req_table = None
        self.routing = self.feature_store = None
        del self.attn_backend, self.kv_pool, self.model
        self.memory.saver.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def bind_req_table(self, req_table: ReqToTokenTable) -> None:
        """Use the cache manager's request->slot table to find each request's KV (its padding row
        is the one no request holds, for CUDA-graph padding). The runner reads the table and asks it
        to record each step's new tokens; it never writes the tensor itself."""
        self._req_table = req_table
        self.req_table = req_table.table
        self.padding_row = req_table.padding_row

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def launch(self, plan: BatchPlan) -> QueuedStep:
        """Queue one step's forward and sampling on the device; returns without waiting for them.

        The sampled tokens stay on the device for the next step's inputs (``plan.future_inputs``)
        and are copied to the host in the background; ``collect`` waits for that copy.
        """
        graphs = self.graphs
        b = len(plan.rows)
        if (graphs is not None and graphs.table_mode and b <= graphs.max_bs
                and all(n == 1 for n in plan.extend_lens)):
            draws = uniform_draws(plan.seeds, plan.steps) if self.tp.rank == 0 and any(plan.sample) else None
            # hidden: (graph size, hidden), rows past B are padding; uniforms: the draws on the device
            hidden, uniforms = self._replay_decode(plan, graphs, draws)
            if not all(plan.sample):  # e.g. a one-token prompt chunk that is not the prompt's last
                (keep,) = host_segments_to_device([[i for i, s in enumerate(plan.sample) if s]], self.device)
                hidden = hidden[keep]
        else:
            uniforms = None
            batch = self._build_batch(plan)
            if graphs is not None and graphs.can_run(batch):
                hidden = graphs.run(batch)  # (B, hidden)
            else:
                self.attn_backend.prepare(batch)
                hidden = self.model(batch)  # (T, hidden)
            if self.routing is not None:
                self.routing.record(batch.out_cache_loc)
            if batch.logits_indices.numel() != hidden.shape[0]:  # else every row is sampled, in order
                hidden = hidden[batch.logits_indices]
        routed = self.routing.gather(plan, self.req_table) if self.routing is not None else None
        if not any(plan.sample):
            self._last_tokens = None
            return QueuedStep(None, None, None, None, None, self._done_event() if routed is not None else None,
                              routed)
        logits = self._logits(hidden, sum(plan.sample))  # (B_sample, vocab)
        if self.tp.rank > 0:  # rank 0 samples; its tokens are this step's inputs to the next
            self._last_tokens = self.tp.broadcast(torch.empty(logits.shape[0], dtype=torch.int64, device=self.device))
            return QueuedStep(None, None, None, None, None, None)
        if uniforms is None:
            uniforms = draws_to_device(uniform_draws(plan.seeds, plan.steps), self.device)
        sb = self._sampling.batch(plan.sampling, uniforms, plan.banned)
        res = self.sampler.sample(
            logits, sb, return_logprob=plan.return_logprob, return_raw_logprob=plan.return_raw_logprob,
            top_logprobs_num=plan.top_logprobs_num,
        )
        self._last_tokens = self.tp.broadcast(res.token_ids)

        def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)

        return QueuedStep(to_host(res.token_ids), to_host(res.logprobs), to_host(res.raw_logprobs),
                          to_host(res.top_ids), to_host(res.top_logprobs), self._done_event(), routed)

    def _done_event(self) -> torch.cuda.Event | None:
        """An event after the step's copies to the host (None off CUDA, where they are done already)."""
        if self.device.type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record()
        return done

    def collect(self, step: QueuedStep) -> StepResult:
        """Wait for a launched step's tokens and return them as lists."""
        if step.done is not None:
            step.done.synchronize()
        routed = step.routed_experts.numpy() if step.routed_experts is not None else None
        if step.token_ids is None:
            return StepResult([], routed_experts=routed)
        top = None
        if step.top_ids is not None:
            top = [TopLogprobs(i, lp) for i, lp in zip(step.top_ids.tolist(), step.top_logprobs.tolist())]
        return StepResult(
            step.token_ids.tolist(),
            step.logprobs.tolist() if step.logprobs is not None else None,
            step.raw_logprobs.tolist() if step.raw_logprobs is not None else None,
            top,
            routed,
        )

    def _logits(self, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """Logits of the first ``n`` rows of ``hidden``, computed for ``logits_rows(n)`` rows.

        The LM head's matmul only ever sees those few row counts, whose cuBLAS kernels are loaded
        at start-up (``warm_logits``): the first launch of a kernel loads its module, which waits
        for the device, and a new row count every step (the number of sampled rows drifts during
        prompt steps and as a batch drains) made most steps wait like that. The LM head reads its
        whole weight whatever the row count, so the padding rows cost next to nothing.
        """
        m = logits_rows(n)
        if hidden.shape[0] < m:
            hidden = torch.cat([hidden, hidden.new_zeros(m - hidden.shape[0], hidden.shape[1])])
        return self.model.compute_logits(hidden[:m], upcast=False)[:n]

    @torch.inference_mode()
    def warm_logits(self, max_rows: int) -> None:
        """Run the LM head once at every padded row count up to ``max_rows`` (see ``_logits``)."""
        hidden_size = self.config.model.hidden_size
        for m in sorted({logits_rows(n) for n in range(1, max_rows + 1)}):
            self.model.compute_logits(torch.zeros(m, hidden_size, dtype=self.dtype, device=self.device), upcast=False)

    def _replay_decode(self, plan: BatchPlan, graphs: DecodeGraphRunner,
                       draws: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run a decode plan through the smallest captured graph that fits it; returns the graph's
        hidden states (graph size, hidden), the plan's B rows first, and ``draws`` on the device.

        The step's inputs, padding rows included, and its sampling draws go to the graph's packed
        buffer in one host-to-device copy; the new tokens' slots are written into the request table
        before the replay (the kernels read every request's KV run from it).
        """
        b = len(plan.rows)
        gbs = graphs.graph_size(b)
        uniforms = copy_decode_inputs(plan, graphs, gbs, self.padding_row, draws)
        batch = graphs.static_batch(gbs)
        if plan.future_inputs:
            put_previous_samples(batch.input_ids, plan.input_ids, self._last_tokens)
        self._req_table.write_tokens(batch.req_rows, batch.positions, batch.out_cache_loc)
        hidden = graphs.replay(gbs)
        if self.routing is not None:
            self.routing.record(batch.out_cache_loc)  # padding rows write slot 0, never handed out
        return hidden, uniforms

    def _build_batch(self, plan: BatchPlan) -> ForwardBatch:
        """The step's device tensors, with the new tokens' slots written into the request table."""
        assert self.req_table is not None, "bind_req_table() first"
        dev = self.device
        b = len(plan.extend_lens)
        ext = plan.extend_lens
        decode = all(n == 1 for n in ext)
        seq_lens = [p + n for p, n in zip(plan.prefix_lens, ext)]
        qo_indptr = [0, *accumulate(ext)]
        t = qo_indptr[-1]
        if decode:  # one token per entry: no per-token expansion
            positions: list[int] | torch.Tensor = plan.prefix_lens
            token_rows: list[int] | torch.Tensor = plan.rows
        else:
            # numpy: torch's CPU repeat_interleave took ~1.7 ms for an 8k-token step.
            counts = np.asarray(ext, dtype=np.int64)
            start = np.asarray(plan.prefix_lens, dtype=np.int64) - np.asarray(qo_indptr[:-1], dtype=np.int64)
            # Position of every new token: prefix_len of its entry + its offset inside the entry.
            positions = torch.from_numpy(np.arange(t, dtype=np.int64) + np.repeat(start, counts))
            token_rows = torch.from_numpy(np.repeat(np.asarray(plan.rows, dtype=np.int64), counts))
        # The token-axis row of each sampled entry's last new token (all entries in decode steps).
        sampled = [qo_indptr[i + 1] - 1 for i in range(b) if plan.sample[i]]
        table_mode = self.attn_backend.reads_req_table
        kv_indptr = [] if table_mode else [0, *accumulate(seq_lens)]
        rows, token_rows_d, out_loc, positions_d, seq_lens_d, qo_indptr_d, input_ids, logits_rows, kv_indptr_d = (
            host_segments_to_device([plan.rows, token_rows, plan.out_slots, positions, seq_lens, qo_indptr,
                                     plan.input_ids, sampled, kv_indptr], self.device))
        # Record the new tokens' slots in the table before anything reads it.
        self._req_table.write_tokens(token_rows_d, positions_d, out_loc)
        kv_indices = None
        if not table_mode:
            # Every entry's whole KV run, gathered from the table: kv position j of entry i is
            # table[rows[i], j - kv_indptr[i]]. output_size is known on the host: no device sync.
            total_kv = kv_indptr[-1]
            kv_entry = torch.repeat_interleave(torch.arange(b, device=dev), seq_lens_d, output_size=total_kv)
            kv_pos = torch.arange(total_kv, device=dev) - kv_indptr_d[:-1][kv_entry]  # (K,)
            kv_indices = self.req_table[rows[kv_entry], kv_pos]  # (K,)
        if plan.future_inputs:
            input_ids = resolve_previous_samples(input_ids, self._last_tokens)
        return ForwardBatch(
            input_ids=input_ids,
            positions=positions_d,
            out_cache_loc=out_loc,
            qo_indptr=qo_indptr_d,
            kv_indptr=None if table_mode else kv_indptr_d,
            kv_indices=kv_indices,
            seq_lens=seq_lens_d,
            logits_indices=logits_rows,
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=plan.extend_lens,
            prefix_lens_cpu=plan.prefix_lens,
            attn_backend=self.attn_backend,
            req_rows=rows,
            req_table=self.req_table,
            routed_experts=self.routing.step if self.routing is not None else None,
            feature_store=self.feature_store,
        )
