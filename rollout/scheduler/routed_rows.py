"""The routed experts of one sample, gathered step by step (``return_routed_experts``).

Row ``p`` holds the top-k expert ids of every MoE layer for the token at position ``p`` of prompt +
output, as computed when that token was fed through the model. The last output token is never fed
through (nothing is sampled after it), so a sample of ``P`` prompt and ``n`` output tokens has
``P + n - 1`` rows, split where the rows meet the tokens they produced::

    positions   0 ............ P-2 | P-1 ........... P+n-2 | P+n-1 (last token: no row)
    rows        prompt rows (P - 1) | output rows (n)       |
    produced                        | output_ids[0 .. n-1]  |

Output row ``j`` comes from the forward that sampled ``output_ids[j]``, so it lines up with that
token, its logprob and its weight version. The rows are opaque here: the scheduler only passes
slices of each step's array along.
"""

from __future__ import annotations

import numpy as np


class RoutedRows:
    """Rows received so far, and how far the steps launched have asked."""

    __slots__ = ("prompt_len", "row_shape", "next_pos", "num_rows", "_prompt", "_output", "prompt_sent")

    def __init__(self, prompt_len: int, row_shape: tuple[int, int]) -> None:
        self.prompt_len = prompt_len
        self.row_shape = row_shape  # (MoE layers, top_k)
        self.next_pos = 0  # first position no launched step asked for yet
        self.num_rows = 0  # rows received (positions [0, num_rows))
        self._prompt: list[np.ndarray] = []  # pieces of the prompt rows, in order
        self._output: list[np.ndarray] = []  # one (1, L, k) row per output token
        self.prompt_sent = False

    def want_from(self, end: int) -> int:
        """The first position whose row a step computing positions up to ``end`` (exclusive) should
        bring, or -1 when it brings none (e.g. a prefix recomputed after a retraction)."""
        return self.next_pos if self.next_pos < end else -1

    def launched(self, end: int) -> None:
        """A step that brings every row below ``end`` is on its way."""
        self.next_pos = max(self.next_pos, end)

    def add(self, start: int, rows: np.ndarray) -> None:
        """Rows of positions ``[start, start + len(rows))``, which arrive in position order."""
        assert start == self.num_rows, f"routing rows from {start} after {self.num_rows} received"
        split = min(max(self.prompt_len - 1 - start, 0), len(rows))
        if split:
            self._prompt.append(rows[:split])
        self._output.extend(rows[i: i + 1] for i in range(split, len(rows)))
        self.num_rows += len(rows)

    @property
    def num_output_rows(self) -> int:
        return len(self._output)

    def _empty(self) -> np.ndarray:
        return np.zeros((0, *self.row_shape), dtype=np.int16)

    def output_rows(self, a: int, b: int) -> np.ndarray:
        """Rows of output tokens ``[a, b)``: (b - a, L, k)."""
        return np.concatenate(self._output[a:b]) if b > a else self._empty()

    def for_chunk(self, a: int, b: int, final: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """``(output rows [a, b), prompt rows or None)`` for a chunk of output tokens ``[a, b)``.

        The prompt rows go once, on the first chunk that carries a token (they are complete by
        then: the forward that sampled the first token computed the prompt's last position). A
        sample that ends before its first token (aborted) gets an empty prompt array on its final
        chunk rather than part of its prompt.
        """
        prompt = None
        if not self.prompt_sent and (b > a or final):
            self.prompt_sent = True
            if b > a:
                assert self.num_rows >= self.prompt_len - 1, "a token arrived before its prompt's rows"
            prompt = np.concatenate(self._prompt) if b > a and self._prompt else self._empty()
        return self.output_rows(a, b), prompt
