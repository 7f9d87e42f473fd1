"""Decides when a sample is finished: stop tokens, stop strings, length limits."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from rollout.scheduler.sequence import Sequence
from rollout.types import FinishReason

if TYPE_CHECKING:
    from rollout.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class StopChecker:
    """Checks a sequence after each new token. Stop strings are matched on the decoded output."""

    def __init__(self, eos_token_ids: tuple[int, ...], context_length: int, tokenizer: Tokenizer | None) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.context_length = context_length
        self.tokenizer = tokenizer

    def banned_ids(self, seq: Sequence, ahead: int = 0) -> list[int] | None:
        """Token ids masked out of the next draw (``ahead``: of the draw that many tokens later, for
        verifying drafts): stop ids until ``min_new_tokens`` are produced."""
        if seq.num_outputs + ahead >= seq.sampling.min_new_tokens:
            return None
        ids = set(seq.sampling.stop_token_ids)
        if not seq.sampling.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids) or None

    def will_finish(self, seq: Sequence) -> bool:
        """Whether a pending token is certain to end ``seq`` by length (so nothing follows it)."""
        return seq.pending > 0 and (seq.num_outputs >= seq.sampling.max_new_tokens
                                    or seq.total_len >= self.context_length)

    def check(self, seq: Sequence) -> bool:
        """Set ``finish_reason`` / ``matched_stop`` on ``seq`` if its last token ends it."""
        token = seq.output_ids[-1]
        n_out = len(seq.output_ids)
        if n_out >= seq.sampling.min_new_tokens:
            if token in seq.sampling.stop_token_ids or (
                not seq.sampling.ignore_eos and token in self.eos_token_ids
            ):
                seq.finish_reason, seq.matched_stop = FinishReason.STOP, token
                return True
            if seq.sampling.stop and self.tokenizer is not None:
                matched = self._match_stop_string(seq)
                if matched is not None:
                    seq.finish_reason, seq.matched_stop = FinishReason.STOP, matched
                    return True
        if n_out >= seq.sampling.max_new_tokens or seq.seq_len >= self.context_length:
            seq.finish_reason = FinishReason.LENGTH
            return True
        return False

    def _match_stop_string(self, seq: Sequence) -> str | None:
        assert self.tokenizer is not None
        state = seq.stop_text
        longest = max(len(s) for s in seq.sampling.stop)
        if state is None:
            # The first check (at min_new_tokens outputs, or the first token): what came before the
            # last token is context only, as later checks see it; a stop string wholly inside it
            # does not count (it came before min_new_tokens).
            state = seq.stop_text = StopText(self.tokenizer.decode_stream(), self.tokenizer.decode)
            before = state.feed(seq.output_ids[:-1])
            state.tail = before[len(before) - longest + 1:] if longest > 1 else ""
        new = state.feed(seq.output_ids)
        if not new:  # nothing decoded since the last check (e.g. a character's bytes still incomplete)
            return None
        # Only text that appeared since the last check (plus room for a stop string that straddles
        # the boundary) can hold a new match.
        old = len(state.tail)
        window = state.tail + new
        state.tail = window[len(window) - longest + 1:] if longest > 1 else ""
        # The stop that starts first in the text (OpenAI cuts there), whatever the list order. A match
        # must end in the new text: a shorter stop wholly inside the kept tail was seen (or came
        # before min_new_tokens) already.
        found = [(at, i) for i, s in enumerate(seq.sampling.stop)
                 if (at := window.find(s, max(0, old - len(s) + 1))) >= 0]
        return seq.sampling.stop[min(found)[1]] if found else None


class StopText:
    """A sample's output decoded incrementally for stop strings: each token is decoded once (the
    tokenizer's stream decoder, whose pieces add up to the decoded output), and only the last
    ``len(longest stop) - 1`` characters are kept. Decoding the whole output at every token cost
    0.2-0.5 ms per sequence at 1,000-4,000 tokens, growing with the length.

    The tokenizers library's stream decoder raises on some id sequences ("Invalid prefix encountered",
    huggingface/tokenizers#1705). Such a sample then decodes its whole output at each check instead:
    slower for that one sample, where the error would have failed the whole step's batch."""

    __slots__ = ("step", "decode", "fed", "chars", "tail")

    def __init__(self, step: Callable[[int], str | None], decode: Callable[[list[int]], str]) -> None:
        self.step: Callable[[int], str | None] | None = step
        self.decode = decode
        self.fed = 0  # output tokens decoded so far
        self.chars = 0  # characters they gave
        self.tail = ""  # the end of the text already scanned

    def feed(self, output_ids: list[int]) -> str:
        """The text the tokens after the ones already fed add."""
        if self.step is not None:
            try:
                pieces = [self.step(t) for t in output_ids[self.fed:]]
            except Exception as e:  # noqa: BLE001 - any decoder failure: whole decodes from here on
                logger.warning("the stream decoder failed (%s); this sample decodes its whole output for "
                               "stop strings from here on", e)
                self.step = None
            else:
                self.fed = len(output_ids)
                text = "".join(p for p in pieces if p)
                self.chars += len(text)
                return text
        # A character whose bytes are still incomplete decodes to U+FFFD: not text yet (its bytes
        # are scanned once it completes).
        text = self.decode(output_ids).rstrip("\ufffd")
        self.fed = len(output_ids)
        new, self.chars = text[self.chars:], max(self.chars, len(text))
        return new
