"""What the scheduler hands the model runner for one step: plain lists, no request objects."""

from __future__ import annotations

from dataclasses import dataclass

from rollout.types import SamplingParams


@dataclass(slots=True)
class BatchPlan:
    """The token work of one forward step.

    Entry ``i`` computes ``extend_lens[i]`` tokens of the sequence in req-table row ``rows[i]``,
    starting at position ``prefix_lens[i]``; ``sample[i]`` says whether its last token's logits are
    sampled (false for a prompt chunk that is not the last).
    """

    rows: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    input_ids: list[int]  # the new tokens of all entries, entry-major
    out_slots: list[int]  # the KV slot of every new token
    sample: list[bool]
    # Per sampled entry, in entry order:
    sampling: list[SamplingParams]
    seeds: list[int]
    steps: list[int]
    banned: list[list[int] | None]
    return_logprob: bool
    return_raw_logprob: bool
    top_logprobs_num: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)
