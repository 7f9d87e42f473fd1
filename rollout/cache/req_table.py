"""Request -> token table: the KV slot of every position of every running request.

Row ``r`` belongs to one live sequence; ``table[r, j]`` is the KV slot of its position ``j``. The
attention kernels read it on the device (or the runner gathers a step's ``kv_indices`` from it),
so the table lives on the device. One extra row, ``padding_row``, is never handed out: the padding
entries of a CUDA-graph batch write and read it (slot 0 at position 0).
"""

from __future__ import annotations

import torch

from rollout.errors import InvalidArgumentError


class ReqToTokenTable:
    """A (max_requests + 1, max_context) int64 table of KV slots with recycled rows (the last one is
    the padding row)."""

    def __init__(self, max_requests: int, max_context: int, device: torch.device | str) -> None:
        if max_requests < 1:
            raise InvalidArgumentError(f"must be >= 1, got {max_requests}", field="max_requests")
        if max_context < 1:
            raise InvalidArgumentError(f"must be >= 1, got {max_context}", field="max_context")
        self.max_requests = max_requests
        self.max_context = max_context
        self.device = torch.device(device)
        self.table = torch.zeros((max_requests + 1, max_context), dtype=torch.int64, device=self.device)
        self.padding_row = max_requests
        # Popped from the end: low rows first, so a lightly loaded engine touches few rows.
        self._free_rows = list(range(max_requests - 1, -1, -1))
        self._row_free = bytearray(b"\x01" * max_requests)
        # With tensor-parallel ranks the other ranks keep a copy of the table: every ``write`` is also
        # noted here (row, start, slots) until the engine ships the notes with its next step.
        self.journal: list[tuple[int, int, list[int]]] | None = None

    @property
    def num_free_rows(self) -> int:
        """Rows not held by a live sequence."""
        return len(self._free_rows)

    def alloc_row(self) -> int | None:
        """Take a free row, or None when every row is in use."""
        if not self._free_rows:
            return None
        row = self._free_rows.pop()
        self._row_free[row] = 0
        return row

    def free_row(self, row: int) -> None:
        """Give a row back; RuntimeError if it is out of range or already free."""
        if not 0 <= row < self.max_requests or self._row_free[row]:
            raise RuntimeError(f"freeing request row {row}, which is not in use")
        self._row_free[row] = 1
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """Set positions ``[start, start + len(slots))`` of ``row`` to ``slots`` (copied to the device).

        The copy is queued behind the device's work like a kernel: a blocking copy from pageable
        memory would wait for every queued step first, which undoes overlap scheduling.
        """
        n = slots.numel()
        if not 0 <= row < self.max_requests or self._row_free[row]:
            raise RuntimeError(f"writing request row {row}, which is not in use")
        if start < 0 or start + n > self.max_context:
            raise RuntimeError(f"positions [{start}, {start + n}) exceed max_context {self.max_context}")
        if n and self.journal is not None:
            self.journal.append((row, start, slots.reshape(-1).tolist()))
        if n:
            src = slots.reshape(-1)  # (n,)
            if self.table.is_cuda and not src.is_cuda:
                src = src.pin_memory()
            self.table[row, start : start + n].copy_(src, non_blocking=True)

    def take_journal(self) -> list[tuple[int, int, list[int]]]:
        """The writes noted since the last call (empty when no journal is kept)."""
        if not self.journal:
            return []
        notes, self.journal = self.journal, []
        return notes

    def apply_journal(self, notes: list[tuple[int, int, list[int]]]) -> None:
        """Make the writes another rank's table noted (``take_journal``), in order, in one scatter.

        The rows are held on that rank: this copy keeps no row bookkeeping of its own."""
        if not notes:
            return
        # The last note of a position wins, as it did on the noting rank (a scatter with repeated
        # indices would keep an unspecified one).
        last: dict[tuple[int, int], int] = {}
        for row, start, slots in notes:
            for i, slot in enumerate(slots):
                last[(row, start + i)] = slot
        host = torch.tensor([[r for r, _ in last], [p for _, p in last], list(last.values())], dtype=torch.int64)
        if self.table.is_cuda:
            host = host.pin_memory()  # queued behind the device's work, like ``write``
        dev = host.to(self.device, non_blocking=True)
        self.table[dev[0], dev[1]] = dev[2]

    def write_tokens(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Record one step's new tokens: ``table[rows[t], positions[t]] = slots[t]`` (device tensors,
        (T,) each). One scatter queued on the device; the model runner calls it before the forward,
        so every write to the table stays in this class."""
        self.table[rows, positions] = slots
