"""StopChecker on its own: stop strings that straddle token boundaries, and the min_new_tokens edge.

The tokenizer here maps each token id to a fixed piece of text, so a test chooses exactly where a
stop string is cut between tokens. The checker scans only the text that is new since its last call
plus ``len(longest stop) - 1`` characters before it; the cases below put the match's first character
at the very start of that overlap, so a window one character short misses them.
"""

from __future__ import annotations

import pytest

from rollout.scheduler.sequence import Sequence
from rollout.scheduler.stop import StopChecker
from rollout.types import FinishReason, SamplingParams

EOS = 0
STOP_ID = 1


class PieceTokenizer:
    """Token ``i`` decodes to ``pieces[i]``; a sequence decodes to the concatenation."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        raise AssertionError("the checker decodes each new token once (decode_stream), never the whole output")

    def decode_stream(self):
        return lambda token_id: self.pieces[token_id]


def run(pieces: list[str], sampling: SamplingParams) -> tuple[Sequence, int | None]:
    """Feed the tokens ``0..len(pieces)-1`` one at a time (ids 0 and 1 are reserved; pieces start at 2).

    Returns the sequence and how many tokens it had when the checker ended it (None: never).
    """
    vocab = ["<eos>", "<stop>", *pieces]
    checker = StopChecker((EOS,), context_length=1000, tokenizer=PieceTokenizer(vocab))  # type: ignore[arg-type]
    seq = Sequence(uid=1, request_id="r", index=0, prompt_ids=[2], sampling=sampling, seed=0, prompt_key=0,
                   arrival=0)
    for token in range(2, 2 + len(pieces)):
        seq.output_ids.append(token)
        if checker.check(seq):
            return seq, len(seq.output_ids)
    return seq, None


@pytest.mark.parametrize(
    "pieces, stop, ends_at",
    [
        (["ab", "cd", "ef"], ["bc"], 2),  # "b|c": the stop's first char is the last of the earlier token
        (["xa", "bc", "de"], ["ab"], 2),  # "a|b": the match starts inside the earlier token
        (["xab", "cy", "zz"], ["abc"], 2),  # "ab|c": only the stop's last char is new text
        (["a", "b", "c", "d"], ["abc"], 3),  # one stop string over three tokens
        (["q", "xabcd", "ey"], ["zz", "abcde"], 3),  # two stop strings: the longer sets the window, "abcd|e"
        (["wxyz", "abc", "d"], ["zabcd"], 3),  # "z|abc|d": the match starts in the token before the last but one
    ],
    ids=["b|c", "a|b", "ab|c", "a|b|c", "two-stops", "z|abc|d"],
)
def test_stop_string_split_across_tokens_ends_the_sample(pieces, stop, ends_at) -> None:
    seq, got = run(pieces, SamplingParams(max_new_tokens=len(pieces), stop=stop))
    assert got == ends_at, f"the checker ended the sample after {got} tokens, not when {stop} completed"
    assert seq.finish_reason is FinishReason.STOP and seq.matched_stop in stop


def test_the_stop_reported_is_the_one_that_starts_first() -> None:
    """The text is cut at the reported stop, so it must be the first in the text, not in the list."""
    seq, got = run(["x", "ab"], SamplingParams(max_new_tokens=5, stop=["b", "a"]))
    assert got == 2 and seq.matched_stop == "a"


def test_a_stop_string_never_produced_does_not_end_the_sample() -> None:
    # "bd" is made of the pieces' characters but never adjacent: only the length limit ends the sample.
    seq, got = run(["ab", "cd", "ba"], SamplingParams(max_new_tokens=3, stop=["bd", "ca"]))
    assert got == 3 and seq.finish_reason is FinishReason.LENGTH and seq.matched_stop is None


def test_stop_string_completed_by_the_min_new_tokens_th_token_ends_the_sample() -> None:
    # The stop string is complete once 3 tokens exist: min_new_tokens=3 lets it end the sample there.
    seq, got = run(["a", "b", "c", "d", "e"], SamplingParams(max_new_tokens=5, min_new_tokens=3, stop=["bc"]))
    assert got == 3, f"with min_new_tokens=3 the checker ended the sample after {got} tokens, not 3"
    assert seq.finish_reason is FinishReason.STOP and seq.matched_stop == "bc"
    # One token more required: the sample must not end at 3 tokens.
    _, got = run(["a", "b", "c", "d", "e"], SamplingParams(max_new_tokens=5, min_new_tokens=4, stop=["bc"]))
    assert got is None or got >= 4, f"min_new_tokens=4 but the sample ended after {got} tokens"


def test_a_stop_string_wholly_before_min_new_tokens_does_not_count() -> None:
    """"ab" is complete after 2 tokens, before min_new_tokens=3: it is output, not a stop (as in vLLM).
    A later "ab" ends the sample, and so does one the min_new_tokens-th token completes."""
    seq, got = run(["a", "b", "c", "d", "e"], SamplingParams(max_new_tokens=9, min_new_tokens=3, stop=["ab"]))
    assert got is None and seq.finish_reason is None
    seq, got = run(["a", "b", "c", "a", "b"], SamplingParams(max_new_tokens=9, min_new_tokens=3, stop=["ab"]))
    assert got == 5 and seq.finish_reason is FinishReason.STOP


def test_a_short_stop_before_min_new_tokens_does_not_count_beside_a_longer_one() -> None:
    """The text kept for the longer stop ("zzz") holds a whole "a" from before min_new_tokens=3: it is
    not a stop; a later "a" is, and so is a stop that straddles the kept text and the new."""
    seq, got = run(["x", "a", "c", "d", "e"], SamplingParams(max_new_tokens=9, min_new_tokens=3, stop=["a", "zzz"]))
    assert got is None and seq.finish_reason is None
    seq, got = run(["x", "a", "c", "a", "e"], SamplingParams(max_new_tokens=9, min_new_tokens=3, stop=["a", "zzz"]))
    assert got == 4 and seq.matched_stop == "a"
    seq, got = run(["z", "z", "c", "z", "z", "z"], SamplingParams(max_new_tokens=9, stop=["zc", "zzz"]))
    assert got == 3 and seq.matched_stop == "zc"


def test_stop_ids_are_banned_exactly_until_min_new_tokens() -> None:
    checker = StopChecker((EOS,), context_length=1000, tokenizer=None)
    sp = SamplingParams(max_new_tokens=10, min_new_tokens=3, stop_token_ids=[STOP_ID])
    seq = Sequence(uid=1, request_id="r", index=0, prompt_ids=[2], sampling=sp, seed=0, prompt_key=0, arrival=0)
    banned = []
    for n in range(5):
        seq.output_ids = [5] * n
        banned.append(checker.banned_ids(seq))
    # Tokens at indices 0, 1, 2 are drawn with the stop ids masked; index 3 (the 4th token) may stop.
    assert banned == [[EOS, STOP_ID]] * 3 + [None, None]
    seq.output_ids = [5, 5]
    seq.pending = 1  # a token sampled by a queued step counts: the next draw is index 3
    assert checker.banned_ids(seq) is None
    ignore = SamplingParams(max_new_tokens=10, min_new_tokens=3, stop_token_ids=[STOP_ID], ignore_eos=True)
    seq = Sequence(uid=2, request_id="r", index=0, prompt_ids=[2], sampling=ignore, seed=0, prompt_key=0, arrival=0)
    assert checker.banned_ids(seq) == [STOP_ID]  # EOS is not masked when it does not stop the sample


class FailingStreamTokenizer:
    """Tokens are bytes; whole decodes replace incomplete characters with U+FFFD (as byte-level BPE
    does); the stream decoder raises at its third token (tokenizers' "Invalid prefix encountered")."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    def decode_stream(self):
        seen = [0]

        def step(token_id: int) -> str:
            seen[0] += 1
            if seen[0] == 3:
                raise Exception("Invalid prefix encountered while decoding stream")
            return self.pieces[token_id].decode()

        return step


def run_failing_stream(pieces: list[bytes], stop: list[str]) -> tuple[int | None, Sequence]:
    """Feed tokens 2.. of ``pieces`` (ids 0, 1 reserved) until a stop; how many tokens, and the sample."""
    tokenizer = FailingStreamTokenizer([b"<eos>", b"<stop>", *pieces])
    checker = StopChecker((EOS,), context_length=1000, tokenizer=tokenizer)  # type: ignore[arg-type]
    sp = SamplingParams(max_new_tokens=9, stop=stop)
    seq = Sequence(uid=1, request_id="r", index=0, prompt_ids=[2], sampling=sp, seed=0, prompt_key=0, arrival=0)
    for token in range(2, 2 + len(pieces)):
        seq.output_ids.append(token)
        if checker.check(seq):
            return len(seq.output_ids), seq
    return None, seq


def test_a_failing_stream_decoder_falls_back_to_whole_decodes() -> None:
    """The failure is that one sample's: it decodes whole outputs from then on and still stops where
    the text says (before, the error failed every request of the step)."""
    ended, seq = run_failing_stream([b"ab", b"cd", b"e", b"fg", b"hi"], ["ef"])
    assert ended == 4 and seq.matched_stop == "ef"


def test_after_the_fallback_a_character_split_over_tokens_still_matches() -> None:
    """"中" comes as three byte tokens after the stream decoder failed: the whole decodes end in
    U+FFFD until it completes, and the stop still matches when it does."""
    ended, seq = run_failing_stream([b"a", b"b", b"c", b"\xe4", b"\xb8", b"\xad", b"d"], ["\u4e2d"])
    assert ended == 6 and seq.matched_stop == "\u4e2d"
