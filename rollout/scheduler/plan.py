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
    # The new tokens of all entries, entry-major. -1 - j stands for row j of the previous step's
    # sampled tokens (overlap scheduling: the host does not know them yet).
    input_ids: list[int]
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
    future_inputs: bool = False  # some input_ids refer to the previous step's samples

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)
