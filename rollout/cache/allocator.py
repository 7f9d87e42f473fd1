"""Page allocator: hands out pages of KV token slots.

Page ``p`` owns the token slots ``p * page_size .. p * page_size + page_size - 1``. Page 0 is never
handed out, so slot 0 stays free for padding tokens (CUDA graph padding writes there harmlessly).

The free list is a tensor used as a stack, so alloc and free cost O(pages moved) with no Python loop
over the pool (pools can hold a million pages). A per-page flag catches double frees.
"""

from __future__ import annotations

import torch

from rollout.errors import InvalidArgumentError


class PageAllocator:
    """Free-list allocator of KV pages ``1 .. num_pages - 1`` (page 0 is reserved)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise InvalidArgumentError(
                f"must be >= 2 (page 0 is reserved), got {num_pages}", field="num_pages"
            )
        if page_size < 1:
            raise InvalidArgumentError(f"must be >= 1, got {page_size}", field="page_size")
        self.num_pages = num_pages
        self.page_size = page_size
        self._stack = torch.empty(num_pages - 1, dtype=torch.int64)  # (num_pages - 1,) free ids in [:_top]
        self._is_free = torch.zeros(num_pages, dtype=torch.bool)  # (num_pages,) page 0 stays False
        # numpy views of the same memory for the decode path's few pages a step: a numpy index costs
        # a fraction of a torch op, and (unlike torch ops) does not hand the GIL to other threads.
        self._stack_np = self._stack.numpy()
        self._is_free_np = self._is_free.numpy()
        self._top = 0
        self.reset()

    def reset(self) -> None:
        """Mark every usable page free (forgets all allocations)."""
        # Descending, so the top of the stack holds the low page ids: easier to read in logs and tests.
        torch.arange(self.num_pages - 1, 0, -1, out=self._stack)
        self._is_free.fill_(True)
        self._is_free[0] = False
        self._top = self.num_pages - 1

    @property
    def total_pages(self) -> int:
        """Usable pages (page 0 excluded)."""
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages that can be allocated now."""
        return self._top

    @property
    def num_free_slots(self) -> int:
        """Token slots in the free pages."""
        return self._top * self.page_size

    def alloc(self, n_pages: int) -> torch.Tensor | None:
        """Take ``n_pages`` pages; int64 ids (n_pages,), or None (and nothing taken) if too few are free."""
        out = self.alloc_list(n_pages)
        return None if out is None else torch.tensor(out, dtype=torch.int64)

    def alloc_list(self, n_pages: int) -> list[int] | None:
        """``alloc`` returning a Python list: the decode path takes one page per sequence per step,
        and a list costs a fraction of the tensor ops."""
        if n_pages < 0:
            raise InvalidArgumentError(f"must be >= 0, got {n_pages}", field="n_pages")
        if n_pages > self._top:
            return None
        taken = self._stack_np[self._top - n_pages : self._top]
        self._is_free_np[taken] = False
        self._top -= n_pages
        # Reversed: pops come off the top of the stack, and a fresh pool then yields 1, 2, 3, ...
        return taken[::-1].tolist()

    def free(self, page_ids: torch.Tensor) -> None:
        """Return pages to the pool.

        Raises RuntimeError on page 0, an out-of-range id, a page that is already free, or an id
        repeated in ``page_ids``: each means the caller's bookkeeping is broken.
        """
        ids = torch.as_tensor(page_ids, dtype=torch.int64).reshape(-1).cpu()  # (n,)
        n = ids.numel()
        if n == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 1 or hi >= self.num_pages:
            raise RuntimeError(f"freeing page ids outside [1, {self.num_pages}): min {lo}, max {hi}")
        already = self._is_free[ids]  # (n,)
        if bool(already.any()):
            bad = ids[already][:8].tolist()
            raise RuntimeError(f"double free of KV pages {bad}")
        if n > 1 and torch.unique(ids).numel() != n:
            raise RuntimeError("the same KV page is freed twice in one call")
        self._stack[self._top : self._top + n] = ids
        self._top += n
        self._is_free[ids] = True

    def is_free(self, page_ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor, same shape as ``page_ids``: which of them are free now."""
        return self._is_free[torch.as_tensor(page_ids, dtype=torch.int64).cpu()]

    def free_mask(self) -> torch.Tensor:
        """Copy of the per-page free flags, (num_pages,) bool; page 0 is False."""
        return self._is_free.clone()
