"""How many tokens to draft in the next step (adaptive speculation).

Verifying ``k`` drafts costs a forward over ``k + 1`` tokens per sequence. At small batch a decode
step is bound by reading the weights, so those extra tokens are nearly free and every accepted draft
saves a whole step; at large batch the step is compute-bound and rejected drafts cost real time.
So the policy drafts, with the load being the sequences running plus the requests waiting to be
admitted (a large batch arriving would otherwise speculate in its first steps, while only a few of
it decode, and finish unevenly: 0.97x plain decoding at 128 sequences on the H200),

- nothing while the load is more than ``max_batch_size``,
- at most 2 tokens while it is more than half of that,
- 1 token, one step in ``PROBE_EVERY``, while the acceptance rate is under ``min_acceptance``, or
  under ``LARGE_BATCH_MIN_ACCEPTANCE`` while the load is more than half of ``max_batch_size``. It keeps
  probing, so a workload whose drafts start to match gets its full ``k`` back; in between, steps do
  not speculate and keep overlap scheduling, which a speculative step gives up (probing every step
  cost 9-14% of plain decoding on the H200 for nothing),
- ``num_draft_tokens`` otherwise.

The acceptance rate is per draft token given the ones before it were taken: accepted drafts over
accepted drafts plus rejections (one per sequence-step that did not take all its drafts), a running
average. Unlike accepted over drafted, it does not fall as ``k`` grows. H200, Llama-8B shape: at 32
sequences and k = 2, a rate of 0.5 ran at 0.92x plain decoding and 0.8 at 1.10x; at 1 and 8
sequences, k = 4, 0.5 gave 1.41x and 1.29x.
"""

from __future__ import annotations

from rollout.config import SpecConfig

# Weight of the latest step in the running acceptance rate.
ACCEPTANCE_EMA = 0.1
# At low acceptance, one step in this many probes with one draft.
PROBE_EVERY = 8
# Acceptance rate under which a batch of more than half of max_batch_size stops speculating.
LARGE_BATCH_MIN_ACCEPTANCE = 0.6


class AdaptivePolicy:
    """Per-step draft length from the batch size and the acceptance seen so far."""

    def __init__(self, config: SpecConfig) -> None:
        self.config = config
        self.acceptance = 1.0  # per-draft acceptance rate (module doc), moving average; start optimistic
        self.drafted = 0  # totals, for info and benchmarks
        self.accepted = 0
        self.verified = 0  # sequence-steps that verified drafts
        self.low_steps = 0  # steps since acceptance fell under its floor (probes at multiples of PROBE_EVERY)
        self._low = False  # whether the last num_drafts found acceptance under its floor

    def num_drafts(self, load: int) -> int:
        """Drafts per sequence for a step under ``load`` sequences, running or waiting (0: no speculation)."""
        cfg = self.config
        if load == 0 or load > cfg.max_batch_size:
            return 0
        k = cfg.num_draft_tokens
        floor = cfg.min_acceptance
        if 2 * load > cfg.max_batch_size:
            k = min(k, 2)
            floor = max(floor, LARGE_BATCH_MIN_ACCEPTANCE)
        self._low = self.acceptance < floor
        if not self._low:
            self.low_steps = 0
        elif self.low_steps % PROBE_EVERY:
            k = 0
        else:
            k = 1
        return k

    def advance(self) -> None:
        """One step planned (call once per step, after drafting): moves the probing clock."""
        self.low_steps = self.low_steps + 1 if self._low else 0

    def record(self, drafted: int, accepted: int, sequences: int = 1, rejected: int | None = None) -> None:
        """Account for one verify step: ``drafted`` tokens proposed by ``sequences`` sequences,
        ``accepted`` of them taken, ``rejected`` sequences that did not take all of theirs (None: as
        if each sequence drafted one token)."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.verified += sequences
        if rejected is None:
            rejected = drafted - accepted
        if accepted + rejected:
            self.acceptance += ACCEPTANCE_EMA * (accepted / (accepted + rejected) - self.acceptance)
