"""Incremental detokenization: the text each stream chunk adds, never half a character.

A byte-level tokenizer can split one character over several tokens (an emoji is four bytes, often
four tokens); decoding each chunk on its own would give replacement characters. ``SampleText``
feeds one sample's ids through the tokenizer's streaming decoder, which holds such bytes back until
the character is complete. When the sample ends, whatever the stream still holds is flushed from a
full decode, so the deltas joined equal ``tokenizer.decode(all ids)``.

``TextDeltas`` keeps one ``SampleText`` per sample of a request and sets ``StreamChunk.text``. The
front ends use it (gRPC servicer, in-process ``Engine.stream``, the HTTP server); the engine loop
never decodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from rollout.tokenizer import Tokenizer
    from rollout.types import StreamChunk


class SampleText:
    """The decoded output of one sample, built up as its tokens arrive."""

    __slots__ = ("_tokenizer", "_step", "_skip", "ids", "text")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._step = tokenizer.decode_stream(skip_special_tokens)
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything returned so far

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; returns the text they complete (empty while a character is unfinished)."""
        parts = []
        for t in token_ids:
            self.ids.append(t)
            piece = self._step(t)
            if piece:
                parts.append(piece)
        delta = "".join(parts)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The last of the text (bytes held back at the very end decode as the full decode does them)."""
        full = self._tokenizer.decode(self.ids, skip_special_tokens=self._skip)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += rest
        return rest


class TextDeltas:
    """Sets ``chunk.text`` on the chunks of one request (all its samples, by index)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._samples: dict[int, SampleText] = {}

    def add(self, chunk: StreamChunk) -> SampleText:
        """Decode ``chunk``'s tokens into ``chunk.text``; returns its sample's text so far (whole once
        the chunk is the sample's last)."""
        sample = self._samples.get(chunk.index)
        if sample is None:
            sample = self._samples[chunk.index] = SampleText(self._tokenizer, self._skip)
        chunk.text = sample.push(chunk.token_ids)
        if chunk.finished:
            chunk.text += sample.finish()
            del self._samples[chunk.index]
        return sample
