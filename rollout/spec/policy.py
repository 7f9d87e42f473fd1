"""How many tokens to draft in the next step (adaptive speculation).

Verifying ``k`` drafts costs a forward over ``k + 1`` tokens per sequence. At small batch a decode
step is bound by reading the weights, so those extra tokens are nearly free and every accepted draft
saves a whole step; at large batch the step is compute-bound and rejected drafts cost real time.
So the policy drafts

- nothing while more than ``max_batch_size`` sequences decode,
- at most 2 tokens while more than half of that decode,
- 1 token, one step in ``PROBE_EVERY``, while the running acceptance rate is under
  ``min_acceptance`` (it keeps probing, so a workload whose drafts start to match gets its full
  ``k`` back; in between, steps do not speculate and keep overlap scheduling, which a speculative
  step gives up: probing every step cost 9-14% of plain decoding on the H200 for nothing),
- ``num_draft_tokens`` otherwise.
"""

from __future__ import annotations

from rollout.config import SpecConfig

# Weight of the latest step in the running acceptance rate.
ACCEPTANCE_EMA = 0.1
# At low acceptance, one step in this many probes with one draft.
PROBE_EVERY = 8


class AdaptivePolicy:
    """Per-step draft length from the batch size and the acceptance seen so far."""

    def __init__(self, config: SpecConfig) -> None:
        self.config = config
        self.acceptance = 1.0  # accepted / drafted, exponential moving average; start optimistic
        self.drafted = 0  # totals, for info and benchmarks
        self.accepted = 0
        self.verified = 0  # sequence-steps that verified drafts
        self.low_steps = 0  # steps since acceptance fell under min_acceptance (probes at multiples of PROBE_EVERY)

    def num_drafts(self, num_decoding: int) -> int:
        """Drafts per sequence for a step in which ``num_decoding`` sequences decode (0: no speculation)."""
        cfg = self.config
        if num_decoding == 0 or num_decoding > cfg.max_batch_size:
            return 0
        k = cfg.num_draft_tokens
        if 2 * num_decoding > cfg.max_batch_size:
            k = min(k, 2)
        if self.acceptance < cfg.min_acceptance:
            k = 1 if self.low_steps % PROBE_EVERY == 0 else 0
        return k

    def advance(self) -> None:
        """One step planned (call once per step, after drafting): moves the probing clock."""
        self.low_steps = self.low_steps + 1 if self.acceptance < self.config.min_acceptance else 0

    def record(self, drafted: int, accepted: int, sequences: int = 1) -> None:
        """Account for one verify step: ``drafted`` tokens proposed by ``sequences`` sequences,
        ``accepted`` of them taken."""
        if drafted <= 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.verified += sequences
        self.acceptance += ACCEPTANCE_EMA * (accepted / drafted - self.acceptance)
