"""Speculator: the engine's speculative-decoding part (drafting before a step, verifying it).

The engine core asks it, before each step, whether the step may speculate (``wants_quiet``: then
the core first collects the step still running, because drafting needs every sequence's last token
on the host and the verify needs its KV position settled), lets it ``propose`` drafts onto the
running sequences (``Sequence.drafts``; the scheduler plans ``1 + len(drafts)`` tokens for them),
and runs a plan that carries drafts through ``run``. Overlap scheduling is thus off for the steps
that speculate and stays on for the others (e.g. above ``max_batch_size``, where the policy drafts
nothing).

Methods: ``ngram`` drafts on the host from the sequence's own tokens; ``draft`` runs a small model
(``draft_model.py``) on the device; ``eagle`` runs an EAGLE head over the target's own hidden states
(``eagle.py``, ``eagle_head.py``); ``oracle`` (benchmarks only)
drafts placeholders and accepts each with probability ``oracle_acceptance`` regardless of the
target: its output is not the target's distribution, it only reproduces the cost of a drafter of
that acceptance rate.

Weight updates (methods ``draft`` and ``eagle``): the target's path is unchanged, and the draft
model (or head) takes its weights from the same updates. Tensors named ``draft.<name>``
(``draft.model.norm.weight``; ``draft.fc.weight`` for a head) in a
group push, shared-memory / CUDA IPC update, or disk update (the ``draft.`` keys of the checkpoint
and the checkpoint in its ``draft/`` subdirectory) go to the draft model's loader; the others go to
the target (``rollout/control/draft_weights.py``). Such names on an engine without a draft model
are refused with INVALID_ARGUMENT and nothing is written. The draft goes with a target version
(``DraftModel.weight_version``):

- an update that carries draft tensors makes the draft current with the update's version (and
  drops the draft KV computed with the old draft weights): drafting goes on;
- an update of the target only leaves the draft at its old version. Once the target's version has
  moved on, ``on_stale_weights="disable"`` (the default) stops drafting until an update carries
  the draft's weights again, and ``"keep"`` drafts on with the old draft.

The output is exact either way (only the acceptance rate depends on the drafter).
"""

from __future__ import annotations

from itertools import accumulate

from rollout.batch import BatchPlan, StepResult
from rollout.config import EngineConfig
from rollout.runner.model_runner import ModelRunner
from rollout.scheduler.sequence import Sequence
from rollout.spec.draft_model import DraftModel
from rollout.spec.drafting import Drafter
from rollout.spec.eagle import EagleDrafter
from rollout.spec.ngram import NgramDrafter, NgramIndex
from rollout.spec.policy import AdaptivePolicy
from rollout.spec.verify import Verifier

# Largest batch a verify graph is captured for (speculation beyond it is rare: see policy.py).
MAX_VERIFY_GRAPH_BS = 64


class Speculator:
    """Drafts for the running sequences and verifies them on the target model."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, weight_version: int = 0) -> None:
        """``weight_version``: the target's version now, the one the draft model starts current with."""
        spec = config.spec
        assert spec.method is not None
        self.config = spec
        self.context_length = config.context_length
        self.policy = AdaptivePolicy(spec)
        self.ngram = NgramDrafter(spec.ngram_min_match, spec.ngram_max_match) if spec.method == "ngram" else None
        oracle = spec.oracle_acceptance if spec.method == "oracle" else None
        self.verifier = Verifier(runner, oracle_acceptance=oracle)
        self.draft: Drafter | None = None
        if spec.method == "draft":
            self.draft = DraftModel(config, runner.num_slots)
        elif spec.method == "eagle":
            self.draft = EagleDrafter(config, runner)
        if self.draft is not None:
            self.draft.weight_version = weight_version
        # The policy's draft lengths (full, halved at large batch, one at low acceptance) get graphs.
        ks = {spec.num_draft_tokens, min(spec.num_draft_tokens, 2), 1}
        sched = config.scheduler
        runner.capture_verify_graphs(sorted(ks), min(spec.max_batch_size, config.cuda_graph_max_bs or 0,
                                                     sched.max_running_requests, MAX_VERIFY_GRAPH_BS))

    def stale(self, weight_version: int) -> bool:
        """Whether the draft model lags the target's weights and must not draft (see the module doc)."""
        if self.draft is None or self.config.on_stale_weights == "keep":
            return False
        return weight_version != self.draft.weight_version

    def _decoding(self, running: list[Sequence]) -> list[Sequence]:
        return [s for s in running if not s.in_prompt_prefill]

    def wants_quiet(self, running: list[Sequence], waiting: int = 0) -> bool:
        """Whether the next step may speculate (so the step still running must be collected first):
        the policy allows drafts and some sequence would look for them (n-gram lookups back off).
        ``waiting``: requests not yet admitted; with the running ones they are the load the policy
        weighs (a large batch arriving speculates in none of its steps, not in its first few)."""
        if self.policy.num_drafts(len(running) + waiting) == 0:
            return False
        if self.ngram is None:
            return True
        return any(s.spec_state is None or s.spec_state.due(s.total_len) for s in self._decoding(running))

    def propose(self, running: list[Sequence], free_slots: int, weight_version: int = 0, waiting: int = 0) -> None:
        """Set ``drafts`` on every running sequence (empty where it does not speculate this step).

        Only sequences whose last token is known and whose KV covers all tokens before it draft;
        drafts never push a sequence past ``max_new_tokens`` or the context, and all drafts of a
        step fit in ``free_slots`` beside the tokens every sequence computes anyway (drafts never cause retraction).
        """
        for seq in running:
            seq.drafts = []
        if self.draft is not None:
            self.draft.kv.forget_others(running)
        decoding = self._decoding(running)
        k = 0 if self.stale(weight_version) else self.policy.num_drafts(len(running) + waiting)
        self.policy.advance()
        budget = free_slots - sum(s.tokens_to_compute for s in running)
        if k == 0 or budget <= 0:
            return
        for seq in decoding:
            if seq.pending or seq.tokens_to_compute != 1:
                continue
            # Emitting kk + 1 tokens must stay within max_new_tokens and the context.
            kk = min(k, seq.sampling.max_new_tokens - seq.num_outputs - 1,
                     self.context_length - seq.total_len - 1, budget)
            if kk <= 0:
                continue
            if self.ngram is not None:
                state = seq.spec_state
                if state is None:
                    state = seq.spec_state = NgramIndex()
                if not state.due(seq.total_len):
                    continue
                drafts = self.ngram.propose(seq.all_ids, kk, state)
                state.found(drafts, seq.total_len)
            elif self.draft is not None and not self.draft.kv.reserve(seq, k):  # all draft k forwards
                continue
            else:
                drafts = [0] * kk  # placeholders: drafted on the device (draft model) or never checked (oracle)
            seq.drafts = drafts
            budget -= len(drafts)

    def run(self, plan: BatchPlan, seqs: list[Sequence]) -> tuple[StepResult, list[int]]:
        """Verify a plan with drafts; returns its rows and the accepted drafts per sampled entry."""
        spec = plan.spec
        assert spec is not None
        if self.draft is None:
            result, accepted = self.verifier.run(plan)
        else:
            sampled = [s for s, x in zip(seqs, plan.sample) if x]
            firsts = [0, *accumulate(k + 1 for k in spec.num_drafts)]
            picked = [(s, k, spec.banned[f: f + k]) for s, k, f in zip(sampled, spec.num_drafts, firsts) if k]
            drafters = [s for s, _, _ in picked]
            ks = [k for _, k, _ in picked]
            kmax = max(ks)
            banned = [b + [None] * (kmax - len(b)) for _, _, b in picked]
            drafts = self.draft.draft(drafters, ks, banned)
            result, accepted = self.verifier.run(plan, drafts.tokens, drafts.probs)
            self.draft.accepted(drafters, ks, [a for a, k in zip(accepted, spec.num_drafts) if k])
        pairs = [(a, k) for a, k in zip(accepted, spec.num_drafts) if k]
        self.policy.record(sum(k for _, k in pairs), sum(a for a, _ in pairs), len(pairs),
                           rejected=sum(1 for a, k in pairs if a < k))
        return result, accepted

    def close(self) -> None:
        """Free the draft model's memory."""
        if self.draft is not None:
            self.draft.close()
