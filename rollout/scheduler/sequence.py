"""One sample being generated: its tokens, outputs and progress through the KV cache."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from rollout.scheduler.routed_rows import RoutedRows
from rollout.types import FinishReason, SamplingParams, TopLogprobs


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued (new or retracted); holds no KV
    RUNNING = "running"  # holds KV; prefilling or decoding
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Sample ``index`` of request ``request_id``.

    ``num_computed`` counts the leading tokens of ``prompt_ids + output_ids`` whose KV is in the
    cache (or is being written by a queued step). A running sequence always has at least one token
    left to compute: the last sampled token (decode) or the rest of its prompt (prefill, possibly in
    chunks).

    With overlap scheduling a step is queued before the previous one's tokens reach the host:
    ``pending`` counts sampled tokens not yet in ``output_ids`` (0 or 1), and ``pending_row`` is the
    row of the last queued step's sampled tokens that holds it. The next step takes that token as
    input on the device, so ``total_len`` (known + pending) is what scheduling counts.
    """

    uid: int
    request_id: str
    index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    prompt_key: int  # hash of the prompt: samples of one prompt share its prefill
    arrival: int  # admission order; retraction picks the newest
    return_logprob: bool = False
    return_raw_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = False
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int = -1  # prompt tokens served from the prefix cache at first admission (-1: not yet)
    prefix_shared: bool = False  # prompt KV handed to the prefix cache already
    kv_epoch: int = 0  # weights epoch (see Scheduler.kv_epoch) under which this sequence's KV began
    handle: Any = None  # cache.manager.SeqHandle while RUNNING
    emitted: int = 0  # output tokens already sent out in chunks
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    stop_text: Any = None  # scheduler.stop.StopText: the output decoded for stop strings so far
    pending: int = 0  # sampled tokens of queued steps not yet in output_ids
    pending_row: int = -1  # row of the pending token among the last queued step's samples
    drafts: list[int] = field(default_factory=list)  # tokens proposed for the next step to verify
    spec_state: Any = None  # the drafter's own per-sequence state (e.g. an n-gram index)
    routing: RoutedRows | None = None  # routed experts received so far (when the request asked)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output, without building the whole list."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.output_ids[:end - p]

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def total_len(self) -> int:
        """Tokens including the pending one(s) whose values only the device knows yet."""
        return len(self.prompt_ids) + len(self.output_ids) + self.pending

    @property
    def num_outputs(self) -> int:
        """Output tokens sampled so far, pending ones included."""
        return len(self.output_ids) + self.pending

    @property
    def tokens_to_compute(self) -> int:
        return self.total_len - self.num_computed

    @property
    def in_prompt_prefill(self) -> bool:
        """Still computing its prompt (other samples of the same prompt wait to share it)."""
        return self.num_computed < len(self.prompt_ids)

    @property
    def remaining_new_tokens(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)
