"""The verify step: one target forward over each sequence's last token and its drafts, then the
exact rule of ``sampling/rejection.py`` on every row.

For sampled entry ``i`` of a plan with ``k_i`` drafts, its last ``k_i + 1`` tokens are verify rows::

    entry inputs   | ... x_n d_1 d_2 |        (k = 2; x_n is the last known token)
    verify rows    |     r0  r1  r2  |        row j: the target's next-token logits after d_1..d_j
    row j checks   |     d_1 d_2 -   |        (- : the bonus row)

Every row is sampled with the sampler at step ``num_outputs + j`` of its sequence and its banned
ids, so each emitted token carries the logprob plain sampling would report. Drafts that are point
masses (n-gram) are accepted iff the row's own draw equals them, which is the rejection rule for
``q = delta_d`` (see ``rejection.py``) and emits, for the same seed, the tokens plain decoding would.

The whole step's results are copied to the host at once; the engine collects a speculative step
before planning the next (the next inputs depend on how many drafts were accepted), so no step
refers to these samples on the device. All shapes are fixed by (batch size, k): a CUDA graph per
(k, batch bucket) can capture the forward as the decode graphs do.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from rollout.batch import BatchPlan, StepResult
from rollout.runner.model_runner import ModelRunner, QueuedStep
from rollout.sampling.rejection import DraftLayout, accepted_counts, salted_uniforms
from rollout.sampling.sampling_batch import SamplingBatch

# The oracle's stream of acceptance coins, apart from every sampling draw.
ORACLE_SALT = 0x0AC1E


def verify_rows(plan: BatchPlan) -> tuple[list[int], list[int]]:
    """Token-axis index of every verify row, and per row the input token it checks (-1: bonus row)."""
    assert plan.spec is not None
    ends = list(accumulate(plan.extend_lens))
    rows: list[int] = []
    drafts: list[int] = []
    j = 0
    for end, sampled in zip(ends, plan.sample):
        if not sampled:
            continue
        k = plan.spec.num_drafts[j]
        j += 1
        first = end - 1 - k
        rows.extend(range(first, end))
        drafts.extend(plan.input_ids[first + 1: end])
        drafts.append(-1)
    return rows, drafts


class Verifier:
    """Runs speculative steps on the target ``ModelRunner``."""

    def __init__(self, runner: ModelRunner, oracle_acceptance: float | None = None) -> None:
        self.runner = runner
        # Benchmarks only: accept each draft with this probability instead of checking it.
        self.oracle_acceptance = oracle_acceptance

    @torch.inference_mode()
    def run(self, plan: BatchPlan) -> tuple[StepResult, list[int]]:
        """The step's verify rows as a ``StepResult`` (row-major) and, per sampled entry, how many
        of its drafts were accepted."""
        assert plan.spec is not None and not plan.future_inputs, "verify steps run on a quiet engine"
        runner = self.runner
        dev = runner.device
        rows, drafts = verify_rows(plan)
        layout = DraftLayout(plan.spec.num_drafts)
        batch = runner._build_batch(plan)
        runner.attn_backend.prepare(batch)
        hidden = runner.model(batch)  # (T, hidden)
        index = torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)
        logits = runner._logits(hidden[index], len(rows))  # (R, vocab)
        reps = [k + 1 for k in plan.spec.num_drafts]
        seeds = [s for s, r in zip(plan.seeds, reps) for _ in range(r)]
        steps = [s + j for s, r in zip(plan.steps, reps) for j in range(r)]
        params = [p for p, r in zip(plan.sampling, reps) for _ in range(r)]
        banned = [b or [] for b in plan.spec.banned]
        sb = SamplingBatch.build(params, seeds, steps, banned if any(banned) else None, dev)
        res = runner.sampler.sample(logits, sb, return_logprob=plan.return_logprob,
                                    return_raw_logprob=plan.return_raw_logprob,
                                    top_logprobs_num=plan.top_logprobs_num)
        draft_ids = torch.tensor(drafts, dtype=torch.int64).to(dev, non_blocking=True)
        match = self.accept(res.token_ids, draft_ids, seeds, steps)
        accepted = accepted_counts(match, layout).to("cpu", non_blocking=True)

        def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)

        done = None
        if dev.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        queued = QueuedStep(to_host(res.token_ids), to_host(res.logprobs), to_host(res.raw_logprobs),
                            to_host(res.top_ids), to_host(res.top_logprobs), done)
        result = runner.collect(queued)  # waits for the copies
        return result, accepted.tolist()

    def accept(self, sampled: torch.Tensor, drafts: torch.Tensor, seeds: list[int], steps: list[int]) -> torch.Tensor:
        """Per verify row (R,) bool: whether its point-mass draft is accepted, i.e. whether the row's
        own draw ``sampled`` equals it (the exact rule for ``q = delta_d``). The oracle instead
        tosses a seeded coin of its acceptance probability."""
        if self.oracle_acceptance is None:
            return sampled == drafts
        coins = torch.tensor(salted_uniforms(seeds, steps, ORACLE_SALT), dtype=torch.float64)
        return (coins < self.oracle_acceptance).to(sampled.device, non_blocking=True)
