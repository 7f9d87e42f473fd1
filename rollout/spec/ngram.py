"""N-gram drafting: propose the tokens that followed the latest earlier occurrence of the current suffix.

No weights: the lookup runs over the sequence's own prompt and output. Each sequence keeps an index
(in ``Sequence.spec_state``) from every n-gram of ``min_match .. max_match`` tokens to the position
right after its latest occurrence; new tokens are indexed incrementally, so a step costs
O(new tokens x n-gram sizes) per sequence, not a scan of the whole context::

    tokens   a b c d a b c ?       suffix "a b c" (n=3) last seen at 0..2, followed by "d a b"
    drafts   d a b                 (k = 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class NgramIndex:
    """n-gram -> position after its latest occurrence, for the first ``indexed`` tokens' n-grams."""

    maps: dict[int, dict[tuple[int, ...], int]] = field(default_factory=dict)
    indexed: int = 0  # n-grams followed by a token at positions < indexed are in the maps
    # Back-off after lookups that found nothing: the next lookup waits until the sequence has
    # ``retry_at`` tokens (2, 4, .. MAX_BACKOFF tokens later), so a sequence that repeats nothing
    # does not stop overlap scheduling every step (see ``Speculator.wants_quiet``).
    misses: int = 0
    retry_at: int = 0

    def due(self, length: int) -> bool:
        """Whether a sequence of ``length`` tokens should look up drafts now."""
        return length >= self.retry_at

    def found(self, drafts: list[int], length: int) -> None:
        """Record a lookup's outcome at ``length`` tokens."""
        if drafts:
            self.misses = 0
            return
        self.misses += 1
        self.retry_at = length + min(1 << self.misses, MAX_BACKOFF)


MAX_BACKOFF = 16


class NgramDrafter:
    """Proposes up to ``k`` tokens by suffix lookup (longest match first)."""

    def __init__(self, min_match: int, max_match: int) -> None:
        self.min_match = min_match
        self.max_match = max_match

    def propose(self, tokens: list[int], k: int, index: NgramIndex) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of ``tokens``' longest
        indexed suffix; [] when no suffix of ``min_match`` tokens or more occurred before."""
        self._extend(tokens, index)
        n_tok = len(tokens)
        for n in range(min(self.max_match, n_tok - 1), self.min_match - 1, -1):
            at = index.maps.get(n, {}).get(tuple(tokens[n_tok - n:]))
            if at is not None:
                return tokens[at: at + k]
        return []

    def _extend(self, tokens: list[int], index: NgramIndex) -> None:
        """Index the n-grams that end right before each position in ``[indexed, len - 1]``: an n-gram
        is indexed once a token follows it, so the current suffix never finds itself."""
        end = len(tokens)  # positions 1 .. end - 1 can be "the token after an n-gram"
        for pos in range(max(index.indexed, 1), end):
            for n in range(self.min_match, min(self.max_match, pos) + 1):
                index.maps.setdefault(n, {})[tuple(tokens[pos - n: pos])] = pos
        index.indexed = max(index.indexed, end)
