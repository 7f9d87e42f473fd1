"""Draft-model drafting: a small model with the target's tokenizer proposes ``k`` tokens per sequence.

The draft model runs in its own ``ModelRunner`` with its own KV pool, request table and page
allocator (a ``KVCacheManager`` without prefix cache), so nothing of the target's cache changes.
Each sequence that speculates holds a draft handle and ``computed``, the number of its leading
tokens whose draft KV is valid. A speculative step then runs, for the sequences it covers:

1. one extend forward over each sequence's tokens ``[computed, n)`` (its whole context the first
   time, the tokens accepted since its last step afterwards); its last row gives ``q_1``;
2. ``k - 1`` one-token forwards, each fed the draft just drawn (a device reference, no host copy),
   giving ``q_2 .. q_k``.

Drafts are drawn from ``q`` (the draft's logits under the request's own temperature / top-k /
top-p / min-p and banned ids) with their own seeded stream, so any temperature keeps the rule of
``sampling/rejection.py`` exact. After the verify accepted ``a`` drafts, the draft KV of positions
``< n + min(a, k - 1)`` holds accepted tokens only, and ``computed`` moves there. A sequence that
stops running (finished, aborted, retracted) gives its draft handle back at the next step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rollout.batch import BatchPlan
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


@dataclass(slots=True)
class DraftSeq:
    """The draft model's state of one sequence."""

    handle: SeqHandle
    computed: int = 0  # leading tokens whose draft KV is valid
    drafted_at: int = 0  # the sequence's length when it last drafted


@dataclass(slots=True)
class Drafts:
    """Drafts of one step: ``tokens[i, j]`` was drawn from ``probs[i, j]`` for spec entry ``i``."""

    tokens: torch.Tensor  # (N, k) int64
    probs: torch.Tensor  # (N, k, V) float32


def draft_engine_config(target: EngineConfig, num_slots: int) -> EngineConfig:
    """The draft runner's config: the target's device and dtype, a pool of ``num_slots`` slots, no graphs."""
    path = target.spec.draft_model_path
    assert path is not None
    model = ModelConfig.from_pretrained(path)
    if model.vocab_size > target.model.vocab_size:
        raise InvalidArgumentError(
            f"the draft model's vocabulary ({model.vocab_size}) is larger than the target's "
            f"({target.model.vocab_size}); it must share the target's tokenizer", field="draft_model_path")
    return dataclasses.replace(
        target, model_path=path, model=model, cuda_graph_max_bs=0, load_format="auto",
        cache=CacheConfig(page_size=1, max_total_tokens=num_slots, enable_prefix_cache=False),
        scheduler=SchedulerConfig(max_running_requests=target.scheduler.max_running_requests),
        spec=dataclasses.replace(target.spec, method=None),
    )


class DraftModel:
    """A draft model, its KV cache and the per-sequence draft state."""

    def __init__(self, target: EngineConfig, num_slots: int) -> None:
        config = draft_engine_config(target, num_slots)
        self.model_config = config.model
        self.vocab_size = target.model.vocab_size
        # The target weight version these weights go with (None: none, e.g. after a failed push);
        # set by the speculator at start and by every update that carries ``draft.`` tensors.
        self.weight_version: int | None = None
        self.runner = ModelRunner(config)
        self.cache = KVCacheManager(
            num_slots=self.runner.num_slots, page_size=1, max_requests=config.scheduler.max_running_requests + 1,
            max_context=target.context_length + 32, device=self.runner.device, enable_prefix_cache=False)
        self.runner.bind_req_table(self.cache.req_table)
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

    @torch.inference_mode()
    def draft(self, seqs: list[Sequence], ks: list[int], banned: list[list[list[int] | None]]) -> Drafts:
        """Draw ``max(ks)`` drafts for each of ``seqs`` (``banned[i][j]``: ids draft ``j`` of sequence
        ``i`` must not be); call ``reserve`` for each first."""
        runner = self.runner
        k = max(ks)
        states = [self.seqs[s.uid] for s in seqs]
        rows, prefix, ext, ids, slots = [], [], [], [], []
        for seq, st in zip(seqs, states):
            n = st.drafted_at = seq.total_len
            rows.append(st.handle.row)
            prefix.append(st.computed)
            ext.append(n - st.computed)
            ids.extend(seq.token_slice(st.computed, n))
            slots.extend(self.cache.slot_list(st.handle, st.computed, n))
        tokens, probs = [], []
        for j in range(k):
            plan = BatchPlan(rows=rows, prefix_lens=prefix, extend_lens=ext, input_ids=ids, out_slots=slots,
                             sample=[True] * len(seqs), sampling=[s.sampling for s in seqs],
                             seeds=[s.seed for s in seqs], steps=[s.num_outputs + j for s in seqs],
                             banned=[b[j] for b in banned], return_logprob=False, return_raw_logprob=False,
                             top_logprobs_num=0, future_inputs=j > 0)
            batch = runner._build_batch(plan)
            runner.attn_backend.prepare(batch)
            hidden = runner.model(batch)[batch.logits_indices]  # (N, hidden)
            logits = runner._logits(hidden, len(seqs))  # (N, V_draft)
            if logits.shape[1] < self.vocab_size:  # ids past the draft's vocabulary get no mass
                logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[1]), value=float("-inf"))
            banned_j = [b[j] or [] for b in banned]
            sb = SamplingBatch.build(plan.sampling, plan.seeds, plan.steps, banned_j if any(banned_j) else None,
                                     runner.device)
            q_logp, _ = sampling_logprobs(logits, sb)  # (N, V)
            u = torch.tensor(salted_uniforms(plan.seeds, plan.steps, DRAFT_SALT), dtype=torch.float64)
            d = _inverse_cdf(q_logp, u.to(runner.device, non_blocking=True))  # (N,)
            tokens.append(d)
            probs.append(q_logp.exp())
            if j == k - 1:
                break
            runner._last_tokens = d  # the next forward reads d on the device (-1 - i below)
            prefix = [p + e for p, e in zip(prefix, ext)]
            ext = [1] * len(seqs)
            ids = [-1 - i for i in range(len(seqs))]
            slots = [self.cache.slot_list(st.handle, p, p + 1)[0] for st, p in zip(states, prefix)]
        return Drafts(torch.stack(tokens, 1), torch.stack(probs, 1))

    def accepted(self, seqs: list[Sequence], ks: list[int], accepted: list[int]) -> None:
        """After the verify of ``seqs``' drafts, ``accepted[i]`` of them taken.

        The draft forwards of a sequence of length ``n`` wrote positions ``n - 1`` (its last token)
        to ``n + k - 2`` (drafts ``d_1 .. d_{k-1}``); draft ``d_j`` is the sequence's token iff
        ``j <= a``, so the draft KV is valid for ``n + min(a, k - 1)`` tokens.
        """
        k = max(ks)
        for seq, a in zip(seqs, accepted):
            st = self.seqs[seq.uid]
            st.computed = st.drafted_at + min(a, k - 1)
            self.cache.truncate(st.handle, st.computed)

    def close(self) -> None:
        self.runner.close()
