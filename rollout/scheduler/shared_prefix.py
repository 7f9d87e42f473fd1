"""Prompts being computed right now, so a waiting prompt that shares a long prefix with one of them
can wait for that prefix to reach the prefix cache instead of computing it a second time.

The case it serves is the RL rollout step: many prompts that share a system prompt arrive at once.
Admitted in the same step, each would compute the shared part itself (none of it is cached yet);
held back one prefill, all but the first find it in the radix tree. Only prefixes of at least
``MIN_SHARED`` tokens beyond what the cache already holds are worth the wait (SGLang uses the same
32-token threshold for its in-batch prefix check).
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_SHARED = 32  # tokens


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slice comparisons: C speed)."""
    n = min(len(a), len(b))
    lo, step = 0, 256
    while lo < n:  # gallop in blocks, then bisect the first block that differs
        hi = min(lo + step, n)
        if a[lo:hi] == b[lo:hi]:
            lo = hi
            continue
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a[lo:mid] == b[lo:mid]:
                lo = mid
            else:
                hi = mid
        return lo if a[lo] != b[lo] else lo + 1
    return n


class InflightPrefixes:
    """The prompts of sequences in prompt prefill, indexed by their first ``MIN_SHARED`` tokens."""

    def __init__(self) -> None:
        self._by_head: dict[tuple[int, ...], list[Sequence[int]]] = {}

    def add(self, prompt: Sequence[int]) -> None:
        if len(prompt) >= MIN_SHARED:
            self._by_head.setdefault(tuple(prompt[:MIN_SHARED]), []).append(prompt)

    def shared(self, prompt: Sequence[int]) -> int:
        """The longest prefix ``prompt`` shares with a prompt being computed (0 below ``MIN_SHARED``)."""
        if len(prompt) < MIN_SHARED:
            return 0
        return max((common_prefix(prompt, other) for other in self._by_head.get(tuple(prompt[:MIN_SHARED]), ())),
                   default=0)
