"""KV cache manager: the one cache API the scheduler uses.

It composes the page allocator, the radix prefix cache and the request -> token table, and works on
``SeqHandle`` objects (never on requests). A live sequence's pages split in two runs::

    seq.pages = [ tree pages (locked via seq.node) | own pages (allocated for this sequence) ]
                  0 .. num_tree_pages-1              num_tree_pages .. len(pages)-1

Every usable page is at any time exactly one of: free, owned by the tree, or owned by one live
sequence (``check_integrity`` proves it).

All methods must be called between forward steps: ``cache_prefix`` and ``release`` free pages that
may be handed out again at once, so no in-flight step may still read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from rollout.cache.allocator import PageAllocator
from rollout.cache.radix_tree import RadixCache
from rollout.cache.req_table import ReqToTokenTable
from rollout.cache.tree_node import TreeNode
from rollout.errors import InvalidArgumentError, OutOfRangeError


@dataclass(slots=True)
class SeqHandle:
    """The cache state of one live sequence (the scheduler keeps it on its request)."""

    row: int  # row in the req table (-1 once released)
    pages: list[int]  # page ids backing positions [0, len(pages) * page_size)
    num_tree_pages: int = 0  # leading pages owned by the radix tree (locked via `node`)
    node: object | None = None  # locked tree node (None: nothing locked)
    namespace: int = 0  # weight version the cached prefix belongs to


class KVCacheManager:
    """Pages, prefix cache and req table behind one interface."""

    def __init__(
        self,
        num_slots: int,
        page_size: int,
        max_requests: int,
        max_context: int,
        device: torch.device | str,
        enable_prefix_cache: bool = True,
    ) -> None:
        if page_size < 1:
            raise InvalidArgumentError(f"must be >= 1, got {page_size}", field="page_size")
        if num_slots // page_size < 2:
            raise InvalidArgumentError(
                f"{num_slots} slots hold fewer than 2 pages of {page_size} (page 0 is reserved)",
                field="num_slots",
            )
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self.allocator = PageAllocator(num_slots // page_size, page_size)
        self.tree = RadixCache(self.allocator, page_size)
        self.req_table = ReqToTokenTable(max_requests, max_context, device)
        self._live: dict[int, SeqHandle] = {}  # row -> handle
        self._own_pages = 0  # pages held by live sequences outside the tree
        # Namespaces (weight versions) that were replaced: their KV is never cached again.
        self._retired: set[int] = set()
        self._page_offsets = torch.arange(page_size, dtype=torch.int64)  # (page_size,)

    @property
    def total_slots(self) -> int:
        """Usable token slots (page 0 excluded)."""
        return self.allocator.total_pages * self.page_size

    @property
    def max_context(self) -> int:
        """Longest sequence a table row can hold."""
        return self.req_table.max_context

    # ---- sequence lifecycle --------------------------------------------------------------------

    def new_seq(self, namespace: int = 0) -> SeqHandle | None:
        """A handle with a table row and no pages, or None when every row is taken."""
        row = self.req_table.alloc_row()
        if row is None:
            return None
        seq = SeqHandle(row=row, pages=[], namespace=namespace)
        self._live[row] = seq
        return seq

    def match(self, seq: SeqHandle, tokens: Sequence[int], max_len: int) -> int:
        """Reuse the longest cached prefix of ``tokens`` (at most ``max_len``, page aligned).

        Locks it, makes it the sequence's first pages and writes their slots to the row. Returns the
        number of cached tokens (0 when the prefix cache is off). Call once, before any allocation.
        """
        self._check_live(seq)
        if seq.pages:
            raise RuntimeError("match() must come before any page of the sequence is allocated")
        if not self._caching(seq):
            return 0
        res = self.tree.match_prefix(tokens, seq.namespace, min(max_len, self.max_context))
        if res.length == 0:
            return 0
        self.tree.inc_lock_ref(res.node)
        seq.node = res.node
        seq.pages = (res.slots[:: self.page_size] // self.page_size).tolist()
        seq.num_tree_pages = len(seq.pages)
        self.req_table.write(seq.row, 0, res.slots)
        return res.length

    def ensure_capacity(self, seq: SeqHandle, num_tokens: int) -> bool:
        """Back positions ``[0, num_tokens)`` with pages, evicting cached prefixes when short.

        False, with the sequence unchanged, when even a full eviction would not free enough.
        """
        self._check_live(seq)
        if num_tokens > self.max_context:
            raise OutOfRangeError(f"{num_tokens} exceeds max_context {self.max_context}", field="num_tokens")
        ps = self.page_size
        have = len(seq.pages)
        need = -(-num_tokens // ps) - have
        if need <= 0:
            return True
        short = need - self.allocator.num_free_pages
        if short > 0:
            # Every unlocked tree token can be evicted (locks never grow downwards), so this check
            # is exact and a doomed call evicts nothing.
            if short * ps > self.tree.evictable_size:
                return False
            self.tree.evict(short * ps)
        pages = self.allocator.alloc_list(need)
        assert pages is not None, "eviction freed less than the evictable size promised"
        seq.pages.extend(pages)
        self._own_pages += need
        # The table rows of new positions are written by the model runner when it computes them
        # (one vectorised write per step), not here: a per-sequence device copy per step is costly.
        return True

    def ensure_capacity_all(self, seqs: Sequence[SeqHandle], num_tokens: Sequence[int]) -> bool:
        """``ensure_capacity`` for many sequences at once, all or nothing, from free pages only.

        One allocation for the whole batch (a decode step needs a page for most sequences). False,
        with nothing changed, when the free pages do not cover every sequence: the caller then goes
        sequence by sequence, evicting or retracting as needed.
        """
        ps = self.page_size
        needs = [max(-(-n // ps) - len(s.pages), 0) for s, n in zip(seqs, num_tokens, strict=True)]
        total = sum(needs)
        if total == 0:
            return True
        if total > self.allocator.num_free_pages or max(num_tokens) > self.max_context:
            return False
        for s in seqs:
            self._check_live(s)
        pages = self.allocator.alloc_list(total)
        assert pages is not None
        i = 0
        for s, k in zip(seqs, needs):
            if k:
                s.pages.extend(pages[i:i + k])
                i += k
        self._own_pages += total
        return True

    def truncate(self, seq: SeqHandle, num_tokens: int) -> None:
        """Give back the sequence's own pages past position ``num_tokens`` (the slots of rejected
        draft tokens); pages the tree owns are never among them."""
        self._check_live(seq)
        keep = max(-(-num_tokens // self.page_size), seq.num_tree_pages)
        extra = seq.pages[keep:]
        if extra:
            self.allocator.free(torch.tensor(extra, dtype=torch.int64))
            self._own_pages -= len(extra)
            del seq.pages[keep:]

    def cache_prefix(self, seq: SeqHandle, tokens: Sequence[int]) -> None:
        """Put the full pages of ``tokens`` (all tokens whose KV is computed) into the tree.

        Pages the tree already had are freed and the sequence switches to the tree's copies, so
        samples of one prompt share its KV; the lock moves to the new deepest node.
        """
        self._check_live(seq)
        if self._caching(seq):
            self._insert(seq, tokens)

    def release(self, seq: SeqHandle, tokens: Sequence[int], cache: bool = True) -> None:
        """End a sequence: optionally cache its computed full pages, free the rest, unlock, free the row.

        Releasing a handle twice raises RuntimeError.
        """
        self._check_live(seq)
        if cache and self._caching(seq):
            self._insert(seq, tokens)
        own = seq.pages[seq.num_tree_pages :]
        if own:
            self.allocator.free(torch.tensor(own, dtype=torch.int64))
            self._own_pages -= len(own)
        if seq.node is not None:
            self.tree.dec_lock_ref(cast(TreeNode, seq.node))
        self.req_table.free_row(seq.row)
        del self._live[seq.row]
        seq.row, seq.pages, seq.num_tree_pages, seq.node = -1, [], 0, None

    def _insert(self, seq: SeqHandle, tokens: Sequence[int]) -> None:
        ps = self.page_size
        n = min(len(tokens), self.max_context) // ps * ps
        if n > len(seq.pages) * ps:
            raise RuntimeError(f"caching {n} tokens but only {len(seq.pages) * ps} positions have pages")
        first = seq.num_tree_pages
        if n <= first * ps:
            return
        key = tokens[:n]
        prefix = self.tree.insert(key, self.slots_for(seq, 0, n), seq.namespace)
        assert prefix >= first * ps, "the locked prefix vanished from the tree"
        res = self.tree.match_prefix(key, seq.namespace)
        assert res.length == n, (res.length, n)
        self.tree.inc_lock_ref(res.node)  # lock the new node before unlocking the old one
        if seq.node is not None:
            self.tree.dec_lock_ref(cast(TreeNode, seq.node))
        seq.node = res.node
        # Pages [first, prefix) duplicate tree pages computed by another sequence: ours go back to
        # the pool. Pages [prefix, n) were just given to the tree.
        dup = seq.pages[first : prefix // ps]
        if dup:
            self.allocator.free(torch.tensor(dup, dtype=torch.int64))
        seq.pages[: n // ps] = (res.slots[::ps] // ps).tolist()
        self._own_pages -= n // ps - first
        seq.num_tree_pages = n // ps
        self.req_table.write(seq.row, first * ps, res.slots[first * ps :])

    # ---- queries -------------------------------------------------------------------------------

    def slot_list(self, seq: SeqHandle, start: int, end: int) -> list[int]:
        """``slots_for`` as a Python list (cheap for the one or few positions of a decode step)."""
        ps = self.page_size
        if not 0 <= start <= end <= len(seq.pages) * ps:
            raise RuntimeError(f"positions [{start}, {end}) are not backed ({len(seq.pages)} pages)")
        pages = seq.pages
        if ps == 1:
            return pages[start:end]
        return [pages[p // ps] * ps + p % ps for p in range(start, end)]

    def slots_for(self, seq: SeqHandle, start: int, end: int) -> torch.Tensor:
        """KV slots of positions ``[start, end)``, (end - start,) int64 on the CPU."""
        ps = self.page_size
        if not 0 <= start <= end <= len(seq.pages) * ps:
            raise RuntimeError(f"positions [{start}, {end}) are not backed ({len(seq.pages)} pages)")
        if start == end:
            return torch.empty(0, dtype=torch.int64)
        first, last = start // ps, (end - 1) // ps + 1
        pages = torch.tensor(seq.pages[first:last], dtype=torch.int64)  # (last - first,)
        slots = (pages[:, None] * ps + self._page_offsets).reshape(-1)  # ((last - first) * ps,)
        off = start - first * ps
        return slots[off : off + end - start]

    def available_tokens(self) -> int:
        """Tokens that can be allocated now: free slots plus evictable cached tokens."""
        return self.allocator.num_free_slots + self.tree.evictable_size

    def used_tokens(self) -> int:
        """Tokens pinned by live sequences: their own pages plus locked tree tokens."""
        return self._own_pages * self.page_size + self.tree.protected_size

    def cached_tokens(self) -> int:
        """Tokens held by the prefix cache."""
        return self.tree.total_size

    def num_live_seqs(self) -> int:
        """Sequences created and not yet released."""
        return len(self._live)

    # ---- whole-cache operations ----------------------------------------------------------------

    def evict_namespaces(self, keep: int) -> None:
        """Weights changed to version ``keep``: drop cached prefixes of every other version, and
        never cache KV of the older versions again (live sequences of those still run)."""
        seen = set(self.tree.root.children) | {s.namespace for s in self._live.values()}
        self._retired |= seen
        self._retired.discard(keep)
        self.tree.evict_namespaces(keep)

    def flush(self) -> None:
        """Drop the prefix cache; RuntimeError while any sequence is live."""
        if self._live:
            raise RuntimeError(f"cannot flush the prefix cache: {len(self._live)} sequences are live")
        self.tree.reset()

    def check_integrity(self) -> None:
        """Prove every usable page is exactly one of: free, tree-owned, owned by one live sequence.

        Also checks the tree, each sequence's locked prefix and its table row. RuntimeError on the
        first problem found.
        """
        self.tree.check_integrity()
        ps = self.page_size
        owners = self.allocator.free_mask().to(torch.int32)  # (num_pages,) 1 where free
        tree_pages = self.tree.all_slots()[::ps] // ps
        owners.index_add_(0, tree_pages, torch.ones_like(tree_pages, dtype=torch.int32))
        own_total = 0
        for row, seq in self._live.items():
            where = f"sequence at row {row}"
            if seq.row != row or not 0 <= seq.num_tree_pages <= len(seq.pages):
                raise RuntimeError(f"{where}: bad handle {seq}")
            if (seq.node is None) != (seq.num_tree_pages == 0):
                raise RuntimeError(f"{where}: {seq.num_tree_pages} tree pages but locked node {seq.node}")
            n_tree = seq.num_tree_pages * ps
            if seq.node is not None:
                node = cast(TreeNode, seq.node)
                if node.parent is None or node.lock_ref <= 0 or node.namespace != seq.namespace:
                    raise RuntimeError(f"{where}: its prefix node {node} is evicted, unlocked or foreign")
                if not torch.equal(self.tree.path_slots(node), self.slots_for(seq, 0, n_tree)):
                    raise RuntimeError(f"{where}: its tree pages differ from its locked prefix")
            own = torch.tensor(seq.pages[seq.num_tree_pages :], dtype=torch.int64)
            if own.numel() and (int(own.min()) < 1 or int(own.max()) >= self.allocator.num_pages):
                raise RuntimeError(f"{where}: holds page 0 or a page outside the pool")
            owners.index_add_(0, own, torch.ones_like(own, dtype=torch.int32))
            own_total += own.numel()
            # The cached prefix is written to the row here (match / cache_prefix); later positions
            # are written by the model runner as it computes them, so only the prefix is checked.
            end = min(n_tree, self.max_context)
            if not torch.equal(self.req_table.table[row, :end].cpu(), self.slots_for(seq, 0, end)):
                raise RuntimeError(f"{where}: req table row differs from its cached prefix")
        if own_total != self._own_pages:
            raise RuntimeError(f"own-page counter {self._own_pages} but live sequences hold {own_total}")
        if int(owners[0]) != 0:
            raise RuntimeError("page 0 is free, cached or owned")
        bad = (owners[1:] != 1).nonzero().reshape(-1)[:8] + 1
        if bad.numel():
            detail = {int(p): int(owners[p]) for p in bad}
            raise RuntimeError(f"pages with owner count != 1 (0 = leaked, 2+ = shared): {detail}")
        if self.req_table.num_free_rows + len(self._live) != self.req_table.max_requests:
            raise RuntimeError("req table rows leaked")

    def _check_live(self, seq: SeqHandle) -> None:
        if self._live.get(seq.row) is not seq:
            raise RuntimeError(f"sequence handle (row {seq.row}) is not live: released already?")

    def _caching(self, seq: SeqHandle) -> bool:
        return self.enable_prefix_cache and seq.namespace not in self._retired
