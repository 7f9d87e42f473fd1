"""What the model drafters (``draft_model.py``, ``eagle.py``) share: their KV and per-sequence state,
and the loop that runs their ``k`` forwards and draws a draft from each.

A drafter runs in its own ``ModelRunner`` with its own KV pool, request table and page allocator (a
``KVCacheManager`` without prefix cache), so nothing of the target's cache changes. Each sequence
that speculates holds a draft handle and ``computed``, the number of leading draft-KV positions
that are valid. ``DraftKV.run`` then makes one step's drafts:

1. one extend forward per sequence over its draft-KV positions ``[computed, computed + ext)`` (what
   the drafter has not seen since its last step); its last row gives ``q_1``;
2. ``k - 1`` one-token forwards at the next positions, each fed the draft just drawn (a device
   reference, no host copy), giving ``q_2 .. q_k``. On a GPU these replay the drafter runner's
   decode CUDA graphs (captured up to ``DRAFT_GRAPH_MAX_BS`` sequences), as the target's decode
   steps do; the catch-up forward runs eagerly.

Drafts are drawn from ``q`` (the drafter's logits under the request's own temperature / top-k /
top-p / min-p and banned ids) with their own seeded stream, so any temperature keeps the rule of
``sampling/rejection.py`` exact; ``q`` goes to the verifier with them. After the verify the drafter
says how many positions stay valid (``settle``) and the draft KV past them is given back. A
sequence that stops running (finished, aborted, retracted) gives its draft handle back at the next
step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from rollout.batch import BatchPlan, ForwardBatch
from rollout.cache.manager import KVCacheManager, SeqHandle
from rollout.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from rollout.errors import InvalidArgumentError
from rollout.runner.model_runner import ModelRunner
from rollout.sampling.rejection import salted_uniforms, sampling_logprobs
from rollout.sampling.sampler import _inverse_cdf
from rollout.sampling.sampling_batch import SamplingBatch
from rollout.scheduler.sequence import Sequence

# The drafts' own random stream, apart from the target's draws and the accept / residual streams.
DRAFT_SALT = 0xD2AF7

# Largest number of drafting sequences whose one-token forwards replay a captured graph.
DRAFT_GRAPH_MAX_BS = 64


@dataclass(slots=True)
class DraftStep:
    """One draft forward: an eager ``batch`` (prepared for attention), or ``replay`` (a one-token
    step through a captured graph: returns the rows (N, hidden) once the drafter staged its inputs)."""

    j: int  # which of the step's forwards (0: the catch-up)
    batch: ForwardBatch | None
    replay: Callable[[], torch.Tensor] | None


# A draft forward -> the drafter's output rows (N, hidden) of its N sampled tokens, in order.
DraftForward = Callable[[DraftStep], torch.Tensor]


@dataclass(slots=True)
class DraftSeq:
    """The drafter's state of one sequence."""

    handle: SeqHandle
    computed: int = 0  # leading draft-KV positions that are valid
    drafted_at: int = 0  # the sequence's length when it last drafted


@dataclass(slots=True)
class Drafts:
    """Drafts of one step: ``tokens[i, j]`` was drawn from ``probs[i, j]`` for spec entry ``i``."""

    tokens: torch.Tensor  # (N, k) int64
    probs: torch.Tensor  # (N, k, V) float32


class Drafter(Protocol):
    """What the speculator and the weight updates (``control/draft_weights.py``) use of a drafter."""

    kv: DraftKV
    runner: ModelRunner  # the drafter's own runner (its model, KV pool, device and dtype)
    model_config: ModelConfig
    # The target weight version these weights go with (None: none, e.g. after a failed push); set by
    # the speculator at start and by every update that carries ``draft.`` tensors.
    weight_version: int | None

    def build_meta(self) -> nn.Module:
        """The drafter's model on the meta device (to check an update's ``draft.`` tensors)."""
        ...

    def draft(self, seqs: list[Sequence], ks: list[int], banned: list[list[list[int] | None]]) -> Drafts:
        """Draw ``max(ks)`` drafts for each of ``seqs`` (``banned[i][j]``: ids draft ``j`` of sequence
        ``i`` must not be); ``kv.reserve`` each first."""
        ...

    def accepted(self, seqs: list[Sequence], ks: list[int], accepted: list[int]) -> None:
        """After the verify of ``seqs``' drafts, ``accepted[i]`` of them taken."""
        ...

    def close(self) -> None:
        """Free the drafter's memory."""
        ...


def draft_engine_config(target: EngineConfig, num_slots: int, model: ModelConfig | None = None) -> EngineConfig:
    """A drafter runner's config: the target's device and dtype, a pool of ``num_slots`` slots, decode
    graphs where the target has them. ``model``: the drafter's shape (None: read from ``draft_model_path``)."""
    path = target.spec.draft_model_path
    assert path is not None
    if model is None:
        try:
            model = ModelConfig.from_pretrained(path)
        except InvalidArgumentError as e:  # it names model_path, the target's option
            raise InvalidArgumentError(e.message.removeprefix("model_path: "), field="draft_model_path") from e
    positions = min(model.max_position_embeddings, model.sliding_window or model.max_position_embeddings)
    if positions < target.context_length:
        raise InvalidArgumentError(
            f"the draft model attends over {positions} positions, fewer than the engine's context_length "
            f"({target.context_length}); give a smaller context_length or another draft model",
            field="draft_model_path")
    if model.vocab_size > target.model.vocab_size:
        raise InvalidArgumentError(
            f"the draft model's vocabulary ({model.vocab_size}) is larger than the target's "
            f"({target.model.vocab_size}); it must share the target's tokenizer", field="draft_model_path")
    return dataclasses.replace(
        target, model_path=path, model=model, load_format="auto",
        cuda_graph_max_bs=min(target.cuda_graph_max_bs or 0, target.spec.max_batch_size, DRAFT_GRAPH_MAX_BS),
        cache=CacheConfig(page_size=1, max_total_tokens=num_slots, enable_prefix_cache=False,
                          memory_backup_tags=target.cache.memory_backup_tags),
        scheduler=SchedulerConfig(max_running_requests=target.scheduler.max_running_requests),
        spec=dataclasses.replace(target.spec, method=None),
    )


class DraftKV:
    """A drafter's KV cache and the draft state of every sequence that speculates."""

    def __init__(self, runner: ModelRunner, target: EngineConfig) -> None:
        self.runner = runner
        self.vocab_size = target.model.vocab_size  # drafts range over the target's vocabulary
        self.cache = KVCacheManager(
            num_slots=runner.num_slots, page_size=1, max_requests=target.scheduler.max_running_requests + 1,
            max_context=target.context_length + 32, device=runner.device, enable_prefix_cache=False)
        runner.prepare(self.cache.req_table)  # binds the table, captures the decode graphs (GPU)
        self.seqs: dict[int, DraftSeq] = {}  # Sequence.uid -> its draft state

    def forget_others(self, running: list[Sequence]) -> None:
        """Give back the draft state of every sequence no longer running."""
        live = {s.uid for s in running}
        for uid in [u for u in self.seqs if u not in live]:
            self.cache.release(self.seqs.pop(uid).handle, [], cache=False)

    def forget_all(self) -> None:
        """Give back every sequence's draft state (after new draft weights: its KV was computed with
        the old ones; each sequence catches up over its whole context at its next draft)."""
        self.forget_others([])

    def reserve(self, seq: Sequence, k: int) -> bool:
        """Make room for ``seq``'s next ``k`` drafts (its catch-up included); False if the pool is full."""
        state = self.seqs.get(seq.uid)
        if state is None:
            handle = self.cache.new_seq()
            if handle is None:
                return False
            state = self.seqs[seq.uid] = DraftSeq(handle)
        return self.cache.ensure_capacity(state.handle, seq.total_len - 1 + k)

    def settle(self, seqs: list[Sequence], computed: list[int]) -> None:
        """After a verify: ``computed[i]`` draft-KV positions of ``seqs[i]`` stay valid, the rest goes."""
        for seq, c in zip(seqs, computed):
            st = self.seqs[seq.uid]
            st.computed = c
            self.cache.truncate(st.handle, c)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], k: int, banned: list[list[list[int] | None]], ext: list[int],
            ids: list[int], forward: DraftForward) -> Drafts:
        """``k`` drafts for each of ``seqs``: the first forward computes draft-KV positions
        ``[computed, computed + ext[i])`` of sequence ``i`` from ``ids`` (entry-major), each later
        one the next position from the draft just drawn (module doc)."""
        runner = self.runner
        n = len(seqs)
        states = [self.seqs[s.uid] for s in seqs]
        for seq, st in zip(seqs, states):
            st.drafted_at = seq.total_len
        rows = [st.handle.row for st in states]
        prefix = [st.computed for st in states]
        slots = [x for st, e in zip(states, ext) for x in self.cache.slot_list(st.handle, st.computed, st.computed + e)]
        tokens, probs = [], []
        for j in range(k):
            plan = BatchPlan(rows=rows, prefix_lens=prefix, extend_lens=ext, input_ids=ids, out_slots=slots,
                             sample=[True] * n, sampling=[s.sampling for s in seqs], seeds=[s.seed for s in seqs],
                             steps=[s.num_outputs + j for s in seqs], banned=[b[j] for b in banned],
                             return_logprob=False, return_raw_logprob=False, top_logprobs_num=0,
                             future_inputs=j > 0)
            replay, batch = self._replayer(plan) if j > 0 else (None, None)
            if replay is None:
                batch = batch or runner._build_batch(plan)
                runner.attn_backend.prepare(batch)
            logits = runner._logits(forward(DraftStep(j, batch, replay)), n)  # (N, V_draft)
            d, q = self._draw(logits, plan)
            tokens.append(d)
            probs.append(q)
            if j == k - 1:
                break
            runner._last_tokens = d  # the next forward reads d on the device (-1 - i below)
            prefix = [p + e for p, e in zip(prefix, ext)]
            ext = [1] * n
            ids = [-1 - i for i in range(n)]
            slots = [self.cache.slot_list(st.handle, p, p + 1)[0] for st, p in zip(states, prefix)]
        return Drafts(torch.stack(tokens, 1), torch.stack(probs, 1))

    def _replayer(self, plan: BatchPlan) -> tuple[Callable[[], torch.Tensor] | None, ForwardBatch | None]:
        """A replay of the runner's decode graph for the one-token forward ``plan``, or (None) where
        none fits; and the eager batch built on the way (flat-index graphs copy it in)."""
        runner, graphs, n = self.runner, self.runner.graphs, len(plan.rows)
        if graphs is None or n > graphs.max_bs:
            return None, None
        if graphs.table_mode:  # Triton: the inputs go to the graph's buffers, the slots to the table
            return (lambda: runner._replay_decode(plan, graphs)[0][:n]), None
        batch = runner._build_batch(plan)  # flashinfer: the graph takes an eager batch's indices
        return ((lambda: graphs.run(batch)[:n]) if graphs.can_run(batch) else None), batch

    def _draw(self, logits: torch.Tensor, plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft per row of ``logits`` (N, V_draft) and the distribution q (N, V) it is drawn from."""
        device = self.runner.device
        if logits.shape[1] < self.vocab_size:  # ids past the drafter's vocabulary get no mass
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[1]), value=float("-inf"))
        banned = [b or [] for b in plan.banned]
        sb = SamplingBatch.build(plan.sampling, plan.seeds, plan.steps, banned if any(banned) else None, device)
        q_logp, _ = sampling_logprobs(logits, sb)  # (N, V)
        u = torch.tensor(salted_uniforms(plan.seeds, plan.steps, DRAFT_SALT), dtype=torch.float64)
        return _inverse_cdf(q_logp, u.to(device, non_blocking=True)), q_logp.exp()  # (N,), (N, V)
