"""The verify step: one target forward over each sequence's last token and its drafts, then the
exact rule of ``sampling/rejection.py`` on every row.

For sampled entry ``i`` of a plan with ``k_i`` drafts, its last ``k_i + 1`` tokens are verify rows::

    entry inputs   | ... x_n d_1 d_2 |        (k = 2; x_n is the last known token)
    verify rows    |     r0  r1  r2  |        row j: the target's next-token logits after d_1..d_j
    row j checks   |     d_1 d_2 -   |        (- : the bonus row)

Every row is judged at step ``num_outputs + j`` of its sequence with its banned ids, so each
emitted token carries the logprob plain sampling would report. Point-mass drafts (n-gram) are
accepted iff the sampler's own draw for the row equals them, which is the rejection rule for
``q = delta_d`` (see ``rejection.py``) and emits, for the same seed, the tokens plain decoding
would. Drafts of a draft model come with their ``q`` and go through ``rejection_sample``; they are
made on the device and written into the forward's input ids there.

The whole step's results are copied to the host at once; the engine collects a speculative step
before planning the next (the next inputs depend on how many drafts were accepted), so no step
refers to these samples on the device. A step whose entries all verify (or plainly decode) replays
a CUDA graph of the forward (``rollout/runner/verify_graph.py``, shorter entries padded with
fillers); a step that also carries a prompt chunk runs eagerly.
"""

from __future__ import annotations

from itertools import accumulate

import torch

from rollout.batch import BatchPlan, StepResult
from rollout.runner.model_runner import ModelRunner, QueuedStep
from rollout.sampling.rejection import (
    ACCEPT_SALT,
    RESIDUAL_SALT,
    DraftLayout,
    accepted_counts,
    rejection_sample,
    salted_uniforms,
)
from rollout.sampling.sampler import Sampler
from rollout.sampling.sampling_batch import SamplingBatch

# The oracle's stream of acceptance coins, apart from every sampling draw.
ORACLE_SALT = 0x0AC1E


def verify_rows(plan: BatchPlan) -> tuple[list[int], list[int], list[int]]:
    """Token-axis index of every verify row; per row the input token it checks (-1: bonus row);
    per draft input, its token-axis index (entry-major, the drafts of spec entries in order)."""
    assert plan.spec is not None
    ends = list(accumulate(plan.extend_lens))
    rows: list[int] = []
    drafts: list[int] = []
    draft_pos: list[int] = []
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
        draft_pos.extend(range(first + 1, end))
    return rows, drafts, draft_pos


class Verifier:
    """Runs speculative steps on the target ``ModelRunner``."""

    def __init__(self, runner: ModelRunner, oracle_acceptance: float | None = None) -> None:
        self.runner = runner
        # Benchmarks only: accept each draft with this probability instead of checking it.
        self.oracle_acceptance = oracle_acceptance

    @torch.inference_mode()
    def run(self, plan: BatchPlan, draft_tokens: torch.Tensor | None = None,
            draft_probs: torch.Tensor | None = None) -> tuple[StepResult, list[int]]:
        """The step's verify rows as a ``StepResult`` (row-major) and, per sampled entry, how many
        of its drafts were accepted.

        ``draft_tokens`` (N, k) / ``draft_probs`` (N, k, V): drafts made on the device for the
        entries with drafts, in order (entry ``i`` uses its first ``num_drafts`` of them); None:
        the plan's input ids are the drafts, point masses.
        """
        assert plan.spec is not None and not plan.future_inputs, "verify steps run on a quiet engine"
        runner = self.runner
        dev = runner.device
        rows, drafts, draft_pos = verify_rows(plan)
        num_drafts = plan.spec.num_drafts
        layout = DraftLayout(num_drafts)
        flat = None
        if draft_tokens is not None:
            # Row-major picks of (entry, j) from the (N, k) drafts: the draft inputs, then per row.
            k = draft_tokens.shape[1]
            picks = [e * k + j for e, n in enumerate(x for x in num_drafts if x) for j in range(n)]
            flat = draft_tokens.reshape(-1)[torch.tensor(picks, dtype=torch.int64).to(dev)]  # (sum k_i,)
        graphs = runner.verify_graphs
        width = graphs.fits(plan) if graphs is not None else None  # the graph's drafts per sequence
        if width is not None:  # every token of the plan is a verify row, in order
            hidden = graphs.run(plan, width, draft_pos if flat is not None else None, flat)  # (R, hidden)
        else:
            batch = runner._build_batch(plan)
            if flat is not None:
                batch.input_ids[torch.tensor(draft_pos, dtype=torch.int64).to(dev)] = flat
            runner.attn_backend.prepare(batch)
            hidden = runner.model(batch)  # (T, hidden)
            hidden = hidden[torch.tensor(rows, dtype=torch.int64).to(dev, non_blocking=True)]
        logits = runner._logits(hidden, len(rows))  # (R, vocab)
        reps = [k + 1 for k in num_drafts]
        seeds = [s for s, r in zip(plan.seeds, reps) for _ in range(r)]
        steps = [s + j for s, r in zip(plan.steps, reps) for j in range(r)]
        params = [p for p, r in zip(plan.sampling, reps) for _ in range(r)]
        banned = [b or [] for b in plan.spec.banned]
        sb = SamplingBatch.build(params, seeds, steps, banned if any(banned) else None, dev)
        lp_args = dict(return_raw_logprob=plan.return_raw_logprob, top_logprobs_num=plan.top_logprobs_num)
        if draft_tokens is None:
            res = runner.sampler.sample(logits, sb, return_logprob=plan.return_logprob, **lp_args)
            draft_ids = torch.tensor(drafts, dtype=torch.int64).to(dev, non_blocking=True)
            match = self.accept(res.token_ids, draft_ids, seeds, steps)
            accepted = accepted_counts(match, layout)
        else:
            row_drafts, row_q = self._per_row(draft_tokens, draft_probs, num_drafts, logits.shape[1])
            u_acc = torch.tensor(salted_uniforms(seeds, steps, ACCEPT_SALT), dtype=torch.float64).to(dev)
            u_res = torch.tensor(salted_uniforms(seeds, steps, RESIDUAL_SALT), dtype=torch.float64).to(dev)
            out = rejection_sample(logits, sb, row_drafts, row_q, u_acc, u_res, layout)
            res = Sampler._with_raw(logits, out.token_ids, out.logprobs if plan.return_logprob else None,
                                    **lp_args)
            accepted = out.accepted

        def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to("cpu", non_blocking=True)

        accepted = to_host(accepted)
        done = None
        if dev.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        queued = QueuedStep(to_host(res.token_ids), to_host(res.logprobs), to_host(res.raw_logprobs),
                            to_host(res.top_ids), to_host(res.top_logprobs), done)
        result = runner.collect(queued)  # waits for the copies
        return result, accepted.tolist()

    @staticmethod
    def _per_row(tokens: torch.Tensor, probs: torch.Tensor, num_drafts: list[int],
                 vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each verify row's draft and q (R,) / (R, V); rows that check nothing get token 0 and a
        uniform q, which the rule never reads."""
        n, k = tokens.shape
        flat_t = torch.cat([tokens.reshape(-1), tokens.new_zeros(1)])  # (N*k + 1,) last: the filler
        filler = torch.full((1, probs.shape[-1]), 1.0 / probs.shape[-1], device=probs.device)
        flat_q = torch.cat([probs.reshape(-1, probs.shape[-1]), filler])  # (N*k + 1, V)
        picks, e = [], 0
        for kk in num_drafts:
            if kk:
                picks.extend(e * k + j for j in range(kk))
                e += 1
            picks.append(n * k)
        idx = torch.tensor(picks, dtype=torch.int64).to(tokens.device)
        q = flat_q[idx]  # (R, V_draft)
        if q.shape[1] < vocab:
            q = torch.nn.functional.pad(q, (0, vocab - q.shape[1]))
        return flat_t[idx], q[:, :vocab]

    def accept(self, sampled: torch.Tensor, drafts: torch.Tensor, seeds: list[int], steps: list[int]) -> torch.Tensor:
        """Per verify row (R,) bool: whether its point-mass draft is accepted, i.e. whether the row's
        own draw ``sampled`` equals it (the exact rule for ``q = delta_d``). The oracle instead
        tosses a seeded coin of its acceptance probability."""
        if self.oracle_acceptance is None:
            return sampled == drafts
        coins = torch.tensor(salted_uniforms(seeds, steps, ORACLE_SALT), dtype=torch.float64)
        return (coins < self.oracle_acceptance).to(sampled.device, non_blocking=True)
