"""Continuous batching over a waiting queue and a running list.

Each step the scheduler builds one batch under a token budget:

1. every running sequence gets its next tokens (one when decoding, a chunk when its prompt is
   still being prefilled), oldest first; when KV runs short the newest running sequences are
   retracted (KV freed, back to the front of the queue, recomputed later) until the rest fit;
2. waiting sequences are admitted while budget, running slots and KV allow, those whose prompt is
   cached first, with samples of one prompt held back while a sibling computes that prompt so
   the prompt is computed once and then shared through the prefix cache, and likewise prompts
   that share a long prefix with a prompt being computed (``shared_prefix.py``).

The scheduler works on ``Sequence`` objects and the ``KVCacheManager``; it never touches tensors.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

from rollout.batch import BatchPlan, SpecPlan, StepResult
from rollout.cache.manager import KVCacheManager
from rollout.config import SchedulerConfig
from rollout.scheduler.sequence import SeqStatus, Sequence
from rollout.scheduler.shared_prefix import MIN_SHARED, InflightPrefixes
from rollout.scheduler.stop import StopChecker
from rollout.types import FinishReason, PauseMode, TopLogprobs

# Share of the remaining new tokens of running sequences kept free before admitting more work.
# Too low thrashes through retractions, too high leaves KV idle; retraction keeps it correct.
DECODE_RESERVE_RATIO = 0.3


class Scheduler:
    """Waiting queue, running list, pause state and the step-by-step batching policy."""

    def __init__(self, config: SchedulerConfig, cache: KVCacheManager, stop: StopChecker) -> None:
        self.config = config
        self.cache = cache
        self.stop = stop
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.paused: PauseMode | None = None
        # The weight version (the trainer's label) has this one owner: each step's plan is stamped with
        # it when scheduled, and its tokens carry the plan's stamp.
        self.weight_version = 0
        # A new epoch on every weight write, whatever version label the caller gives, and on a flush
        # while requests run: the prefix cache is keyed by it, so old KV is never reused.
        self.kv_epoch = 0
        self._arrivals = 0
        self.num_retractions = 0  # sequences sent back to the queue for lack of KV (a pressure gauge)
        # Called with every sequence that ends (finished, aborted) after its KV is released.
        self.on_finish: Callable[[Sequence], None] = lambda seq: None

    # ------------------------------------------------------------------ weights and prefix cache
    def new_weights(self, version: int) -> None:
        """New weights were written: later steps carry ``version``, and no prefix computed under the
        earlier weights is reused (running requests keep their KV, as an IN_PLACE pause promises)."""
        self.weight_version = version
        self.new_kv_epoch()

    def new_kv_epoch(self) -> None:
        """Stop reusing every cached prefix: later KV is cached under a new epoch."""
        self.kv_epoch += 1
        self.cache.evict_namespaces(keep=self.kv_epoch)

    def flush_prefix_cache(self) -> None:
        """Drop the prefix cache (entries locked by running requests go when those finish)."""
        if self.cache.num_live_seqs() == 0:
            self.cache.flush()
        else:
            self.new_kv_epoch()  # running requests' KV is never cached; later requests cache again

    # ------------------------------------------------------------------ queue management
    def add(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            self._arrivals += 1
            seq.arrival = self._arrivals
            seq.status = SeqStatus.WAITING
            self.waiting.append(seq)

    @property
    def num_queued(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        """Whether a step would do anything now."""
        if self.paused is not None:
            return False
        return bool(self.running or self.waiting)

    def abort(self, request_ids: set[str] | None) -> list[Sequence]:
        """End the matching sequences (all when None) with reason abort; returns them."""
        hit = [s for s in (*self.running, *self.waiting) if request_ids is None or s.request_id in request_ids]
        for seq in hit:
            seq.finish_reason = FinishReason.ABORT
            self._finish(seq)
        return hit

    def drop_running(self) -> set[str]:
        """After a failed step: remove every request that has a running sample or a queued one owed a
        token by the step (retracted while it ran), all its samples with it, without caching their
        KV; returns their ids. No finish events are made. The step's KV is unknown, and prefixes
        were handed to the prefix cache when it was queued (``launched``), so a new KV epoch
        retires every cached prefix: later requests compute theirs again."""
        failed = {s.request_id for s in self.running} | {s.request_id for s in self.waiting if s.pending}
        for seq in self.running:
            self.cache.release(seq.handle, [], cache=False)
            seq.handle = None
            seq.status = SeqStatus.FINISHED
        self.running = []
        kept = [s for s in self.waiting if s.request_id not in failed]
        for seq in self.waiting:
            if seq.request_id in failed:
                seq.status = SeqStatus.FINISHED
        self.waiting = deque(kept)
        self.new_kv_epoch()
        return failed

    def pause(self, mode: PauseMode) -> None:
        """Pause: abort, retract or freeze what is in flight; new requests wait until continue."""
        if mode is PauseMode.ABORT:
            self.abort(None)
        elif mode is PauseMode.RETRACT:
            self.retract_running()
        self.paused = mode

    def retract_running(self) -> None:
        """Send every running sequence back to the queue, KV freed (it is recomputed when readmitted);
        the pause mode stays what it was."""
        for seq in reversed(list(self.running)):
            self._retract(seq)

    def resume(self) -> None:
        self.paused = None

    # ------------------------------------------------------------------ batching
    def schedule(self) -> tuple[BatchPlan, list[Sequence]] | None:
        """Pick the next batch; None when there is nothing to run (or paused)."""
        if self.paused is not None:
            return None
        budget = self.config.max_num_batched_tokens
        chunk = self.config.chunked_prefill_size
        picked: list[tuple[Sequence, int]] = []
        # 1. Running sequences, oldest first; retract from the newest end when KV is short. When
        # the free pages cover them all (the usual decode step), one allocation serves every one.
        # A sequence whose pending token ends it by length gets no further step.
        cands = self.running
        if any(s.pending for s in cands):
            cands = [s for s in cands if not self.stop.will_finish(s)]
        work = []
        left = budget
        for seq in cands:
            if left <= 0:
                break
            n = min(seq.tokens_to_compute + len(seq.drafts), left, chunk)
            work.append((seq, n))
            left -= n
        if work and self.cache.ensure_capacity_all([s.handle for s, _ in work],
                                                   [s.num_computed + n for s, n in work]):
            picked, budget = work, left
        i = len(picked)
        if cands is self.running:
            cands = list(cands)  # retraction shrinks self.running; keep cands in step with it
        while i < len(cands) and budget > 0:
            seq = cands[i]
            n = min(seq.tokens_to_compute + len(seq.drafts), budget, chunk)
            while not self.cache.ensure_capacity(seq.handle, seq.num_computed + n):
                victim = self.running[-1]
                self._retract(victim)
                if cands and cands[-1] is victim:
                    cands.pop()
                if victim is seq:
                    break
            else:
                picked.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was retracted: it was the newest, nothing after it
        # 2. Admit waiting sequences.
        if budget > 0 and self.waiting:
            budget = self._admit(picked, budget, chunk)
        if not picked:
            return None
        return self._plan(picked), [s for s, _ in picked]

    def _admit(self, picked: list[tuple[Sequence, int]], budget: int, chunk: int) -> int:
        prefilling = {s.prompt_key for s in self.running if s.in_prompt_prefill}
        inflight = InflightPrefixes()
        for s in self.running:
            if s.in_prompt_prefill:
                inflight.add(s.prompt_ids)
        reserve = sum(s.remaining_new_tokens for s in self.running) * DECODE_RESERVE_RATIO
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            seq = self.waiting.popleft()
            if seq.pending:
                deferred.append(seq)  # retracted with a token in flight: admit it once the token is known
                continue
            if seq.prompt_key in prefilling and seq.num_computed == 0 and not seq.output_ids:
                deferred.append(seq)  # a sibling is computing this prompt; share it next step
                continue
            handle = self.cache.new_seq(namespace=self.kv_epoch)
            if handle is None:
                self.waiting.appendleft(seq)
                break
            ids = seq.all_ids
            cached = self.cache.match(handle, ids, max_len=len(ids) - 1)
            fresh = seq.num_computed == 0 and not seq.output_ids
            if fresh and min(inflight.shared(ids), len(ids) - 1) >= cached + MIN_SHARED:
                # Another prompt is computing a long prefix of this one: take it from the cache next.
                self.cache.release(handle, ids[:cached], cache=False)
                deferred.append(seq)
                continue
            n = min(len(ids) - cached, budget, chunk)
            need_free = n + reserve + seq.remaining_new_tokens * DECODE_RESERVE_RATIO
            fits = not self.running or self.cache.available_tokens() >= need_free
            if not fits or not self.cache.ensure_capacity(handle, cached + n):
                self.cache.release(handle, ids[:cached], cache=False)
                self.waiting.appendleft(seq)
                break
            seq.handle = handle
            seq.num_computed = cached
            seq.kv_epoch = self.kv_epoch
            if seq.cached_tokens < 0:
                seq.cached_tokens = min(cached, len(seq.prompt_ids))
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            prefilling.add(seq.prompt_key)
            inflight.add(seq.prompt_ids)
            reserve += seq.remaining_new_tokens * DECODE_RESERVE_RATIO
            picked.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return budget

    def _plan(self, picked: list[tuple[Sequence, int]]) -> BatchPlan:
        rows, prefix, ext, ids, slots, sample = [], [], [], [], [], []
        sampling, seeds, steps, banned = [], [], [], []
        routed_from: list[int] = []
        want_lp = want_raw = want_routed = False
        future = False
        top_n = 0
        num_drafts: list[int] = []
        sampled: list[Sequence] = []
        banned_ids, slot_list = self.stop.banned_ids, self.cache.slot_list  # called once or twice a row
        for seq, n in picked:
            start = seq.num_computed
            rows.append(seq.handle.row)
            prefix.append(start)
            ext.append(n)
            known = len(seq.prompt_ids) + len(seq.output_ids)
            total = known + seq.pending
            k = max(start + n - total, 0)  # draft inputs (a short budget may cut some)
            end = start + n - k
            if end > known:
                # The last input is the pending token: a reference to its row of the last step's samples.
                if start < known:
                    ids.extend(seq.token_slice(start, known))
                ids.append(-1 - seq.pending_row)
                future = True
            else:
                ids.extend(seq.token_slice(start, end))
            if k:
                ids.extend(seq.drafts[:k])
            slots.extend(slot_list(seq.handle, start, start + n))
            # Routing rows of drafted tokens are not recorded (speculation and routed experts are exclusive).
            lo = seq.routing.want_from(end) if seq.routing is not None else -1
            routed_from.append(lo)
            want_routed |= lo >= 0
            samples = end == total
            sample.append(samples)
            if samples:
                sampling.append(seq.sampling)
                seeds.append(seq.seed)
                steps.append(total - len(seq.prompt_ids))  # outputs sampled so far, pending ones included
                banned.append(banned_ids(seq))
                num_drafts.append(k)
                sampled.append(seq)
                want_lp |= seq.return_logprob
                want_raw |= seq.return_raw_logprob
                top_n = max(top_n, seq.top_logprobs_num)
        spec = None
        if any(num_drafts):  # each verify row's bans: a draft sampled j tokens ahead
            spec = SpecPlan(num_drafts, [banned_ids(seq, ahead=j) for seq, k in zip(sampled, num_drafts)
                                         for j in range(k + 1)])
        return BatchPlan(
            rows=rows, prefix_lens=prefix, extend_lens=ext, input_ids=ids,
            out_slots=slots, sample=sample, sampling=sampling, seeds=seeds, steps=steps,
            banned=banned, return_logprob=want_lp, return_raw_logprob=want_raw, top_logprobs_num=top_n,
            future_inputs=future, weight_version=self.weight_version, spec=spec,
            routed_from=routed_from if want_routed else [],
        )

    # ------------------------------------------------------------------ results
    def launched(self, plan: BatchPlan, seqs: list[Sequence]) -> None:
        """Account for a step now queued on the device: its KV positions count as computed (later
        steps are ordered after it) and each of its samples is pending until ``collect``."""
        row = 0
        for seq, n, sampled in zip(seqs, plan.extend_lens, plan.sample):
            seq.num_computed += n
            if seq.routing is not None:
                seq.routing.launched(seq.num_computed)
            if sampled:
                seq.pending += 1
                seq.pending_row = row
                row += 1
            if seq.status is not SeqStatus.RUNNING:
                continue
            if not seq.prefix_shared and seq.num_computed >= len(seq.prompt_ids):
                # Hand the prompt's KV to the prefix cache now, so other samples reuse it.
                seq.prefix_shared = True
                if seq.kv_epoch == self.kv_epoch:
                    self.cache.cache_prefix(seq.handle, seq.all_ids[:seq.num_computed])

    def collect(self, plan: BatchPlan, seqs: list[Sequence], result: StepResult,
                accepted: list[int] | None = None) -> list[Sequence]:
        """Record a finished step's sampled tokens; returns the sequences that got a new token.

        A sequence that finished or was aborted while the step ran drops its token; one retracted
        meanwhile keeps it (it was sampled from complete KV) and is readmitted with it.

        A speculative step (``plan.spec``) has ``num_drafts[j] + 1`` result rows per sampled entry
        ``j``, of which the first ``accepted[j] + 1`` are new tokens; they are appended one by one
        with the stop checks between them, so a stop inside an accepted run ends it there. The KV
        slots of rejected drafts are given back.
        """
        if result.routed_experts is not None:  # before the tokens: a token that ends a sample needs its row
            off = 0
            for i, lo, count in plan.routed_rows():
                if seqs[i].status is not SeqStatus.FINISHED:
                    seqs[i].routing.add(lo, result.routed_experts[off: off + count])
                off += count
        out: list[Sequence] = []
        j = -1
        row = 0
        for seq, sampled in zip(seqs, plan.sample):
            if not sampled:
                continue
            j += 1
            seq.pending -= 1
            k = plan.spec.num_drafts[j] if plan.spec is not None else 0
            first, row = row, row + k + 1
            if seq.status is SeqStatus.FINISHED:
                continue
            taken = accepted[j] if k else 0
            # Only the drafts accepted have KV that is the sequence's (the last new token has none yet).
            seq.num_computed -= k - taken
            for r in range(first, first + taken + 1):
                self._append(seq, result, r, plan.weight_version)
                if self.stop.check(seq):
                    self._finish(seq)
                    break
            if k and seq.status is SeqStatus.RUNNING:
                self.cache.truncate(seq.handle, seq.num_computed)
            out.append(seq)
        return out

    def _append(self, seq: Sequence, result: StepResult, r: int, version: int) -> None:
        seq.output_ids.append(result.token_ids[r])
        seq.weight_versions.append(version)
        if seq.return_logprob:
            seq.logprobs.append(result.logprobs[r])
        if seq.return_raw_logprob:
            seq.raw_logprobs.append(result.raw_logprobs[r])
        if seq.top_logprobs_num:
            top = result.top_logprobs[r]
            k = seq.top_logprobs_num
            seq.top_logprobs.append(TopLogprobs(top.token_ids[:k], top.logprobs[:k]))

    # ------------------------------------------------------------------ internals
    def _retract(self, seq: Sequence) -> None:
        """Free a running sequence's KV and queue it first; it is recomputed when readmitted."""
        self.running.remove(seq)
        self.cache.release(seq.handle, seq.all_ids[:seq.num_computed], cache=seq.kv_epoch == self.kv_epoch)
        self.num_retractions += 1
        seq.handle = None
        seq.drafts = []
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.cache.release(
                seq.handle, seq.all_ids[:seq.num_computed], cache=seq.kv_epoch == self.kv_epoch
            )
            seq.handle = None
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        if seq.cached_tokens < 0:
            seq.cached_tokens = 0
        self.on_finish(seq)
