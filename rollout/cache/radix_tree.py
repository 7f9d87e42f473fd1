"""Radix tree over token ids: the prefix cache.

Each node holds a run of token ids (``key``) and the KV slots of those tokens (``value``, int64 CPU).
The tree is page granular: every key is a whole number of pages, matches are rounded down to pages
and nodes split only on page boundaries, so a tree page is always owned by exactly one node. The
root has one child per namespace (the weight version), and a namespace's subtree is never matched
under another::

    root ── ns 3 ── [a b c d] ── [e f g h]        page_size 4: children keyed by their first page
        │                    └── [x y z w]
        └── ns 4 ── [a b c d] ...

Lock refs pin a node and its ancestors (a running request's prefix). Unlocked leaves are evicted in
least-recently-used order through a heap with lazy deletion: an entry is acted on only if it still
describes an unlocked leaf with the same access time, so no entry is ever removed in place.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import torch

from rollout.cache.allocator import PageAllocator
from rollout.cache.tree_node import MatchResult, TreeNode, as_key
from rollout.errors import InvalidArgumentError


class RadixCache:
    """Page-granular radix tree of KV slots with namespaces, lock refs and LRU eviction."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        if page_size != allocator.page_size:
            raise InvalidArgumentError(
                f"{page_size} differs from the allocator's {allocator.page_size}", field="page_size"
            )
        self.allocator = allocator
        self.page_size = page_size
        self._ids = itertools.count()
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = TreeNode((), torch.empty(0, dtype=torch.int64), None, None, next(self._ids))
        self._clock = 0  # logical time: deterministic LRU order, unlike wall time
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._num_nodes = 0  # nodes that hold tokens
        self._total = 0
        self._evictable = 0
        self._protected = 0

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def total_size(self) -> int:
        """Tokens held by the tree."""
        return self._total

    @property
    def evictable_size(self) -> int:
        """Tokens in unlocked nodes (all of them can be evicted, leaves first)."""
        return self._evictable

    @property
    def protected_size(self) -> int:
        """Tokens in locked nodes."""
        return self._protected

    @property
    def num_nodes(self) -> int:
        """Nodes holding tokens (root and namespace nodes excluded)."""
        return self._num_nodes

    # ---- match / insert ------------------------------------------------------------------------

    def match_prefix(
        self, tokens: Sequence[int], namespace: int = 0, max_len: int | None = None
    ) -> MatchResult:
        """Longest cached page-aligned prefix of ``tokens`` (at most ``max_len``) in ``namespace``."""
        key = as_key(tokens)
        ps = self.page_size
        n = len(key) if max_len is None else max(0, min(len(key), max_len))
        n -= n % ps
        self._clock += 1
        node = self.root.children.get(namespace)
        if node is None:
            return MatchResult(torch.empty(0, dtype=torch.int64), self.root, 0)
        off, parts = 0, []
        while off < n:
            child = node.children.get(key[off : off + ps])
            if child is None:
                break
            klen = len(child.key)
            if off + klen > n or child.key != key[off : off + klen]:
                # The match ends inside this node: split so the returned node covers exactly it.
                klen = self._common_len(child.key, key, off, n - off)
                child = self._split(child, klen)
            child.last_access = self._clock
            parts.append(child.value)
            node, off = child, off + klen
        if node.key and not node.children:
            self._push(node)
        slots = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)  # (off,)
        return MatchResult(slots, node, off)

    def insert(self, tokens: Sequence[int], slots: torch.Tensor, namespace: int = 0) -> int:
        """Insert ``tokens`` with their ``slots``; return the length of the prefix already cached.

        The pages of ``slots[prefix_len:]`` now belong to the tree. The pages of
        ``slots[:prefix_len]`` stay the caller's (the tree keeps its own copies of that prefix).
        """
        key = as_key(tokens)
        n, ps = len(key), self.page_size
        if slots.dim() != 1 or slots.numel() != n:
            raise ValueError(f"slots must be 1-D with one slot per token ({n}), got {tuple(slots.shape)}")
        if n % ps:
            raise ValueError(f"insert length {n} is not a multiple of page_size {ps}")
        if n == 0:
            return 0
        slots = slots.to(device="cpu", dtype=torch.int64)
        self._clock += 1
        node = self.root.children.get(namespace)
        if node is None:
            node = TreeNode((), torch.empty(0, dtype=torch.int64), self.root, namespace, next(self._ids))
            self.root.children[namespace] = node
        off = 0
        while off < n:
            child = node.children.get(key[off : off + ps])
            if child is None:
                leaf = TreeNode(key[off:], slots[off:].clone(), node, namespace, next(self._ids))
                leaf.last_access = self._clock
                node.children[key[off : off + ps]] = leaf
                self._num_nodes += 1
                self._total += n - off
                self._evictable += n - off
                self._push(leaf)
                return off
            klen = len(child.key)
            if off + klen > n or child.key != key[off : off + klen]:
                klen = self._common_len(child.key, key, off, n - off)
                child = self._split(child, klen)
            child.last_access = self._clock
            node, off = child, off + klen
        if not node.children and node.lock_ref == 0:
            self._push(node)
        return n

    def _common_len(self, node_key: tuple[int, ...], key: tuple[int, ...], off: int, limit: int) -> int:
        """Tokens of ``node_key`` equal to ``key[off:]``, whole pages only, at most ``limit``."""
        ps = self.page_size
        lim = min(len(node_key), limit)
        m = 0
        while m + ps <= lim and node_key[m : m + ps] == key[off + m : off + m + ps]:
            m += ps
        return m

    def _split(self, child: TreeNode, m: int) -> TreeNode:
        """Cut ``child`` after ``m`` tokens; return the new upper node. ``child`` keeps its identity
        as the lower part, so a lock held on it still ends at the same depth."""
        assert 0 < m < len(child.key) and m % self.page_size == 0, (m, len(child.key))
        ps = self.page_size
        parent = child.parent
        assert parent is not None
        mid = TreeNode(child.key[:m], child.value[:m].clone(), parent, child.namespace, next(self._ids))
        mid.lock_ref = child.lock_ref  # same lock count: sizes stay exact without any update
        mid.last_access = child.last_access
        child.key = child.key[m:]
        child.value = child.value[m:].clone()
        child.parent = mid
        mid.children[child.key[:ps]] = child
        parent.children[mid.key[:ps]] = mid
        self._num_nodes += 1
        return mid

    # ---- locks ---------------------------------------------------------------------------------

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Pin ``node`` and its ancestors against eviction. No-op on the root or a namespace node."""
        if node.key and node.parent is None:
            raise RuntimeError(f"locking {node}, which was evicted")
        while node.key:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one ``inc_lock_ref(node)``."""
        if node.key and node.lock_ref <= 0:
            raise RuntimeError(f"unlocking {node}, which is not locked")
        bottom = node
        while node.key:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent  # type: ignore[assignment]
        if bottom.key and bottom.lock_ref == 0 and not bottom.children:
            self._push(bottom)

    # ---- eviction ------------------------------------------------------------------------------

    def _push(self, node: TreeNode) -> None:
        heapq.heappush(self._heap, (node.last_access, node.id, node))
        if len(self._heap) > 2 * self._num_nodes + 1024:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        """Drop stale entries (amortised: runs after at least num_nodes + 1024 pushes)."""
        self._heap = [
            (n.last_access, n.id, n) for n in self._walk() if not n.children and n.lock_ref == 0
        ]
        heapq.heapify(self._heap)

    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves, least recently used first, until ``num_tokens`` are freed or none
        is left. Returns the number of tokens freed (their pages go back to the allocator)."""
        freed, pages = 0, []
        while freed < num_tokens and self._heap:
            t, _, node = heapq.heappop(self._heap)
            if node.parent is None or node.children or node.lock_ref or node.last_access != t:
                continue  # stale entry
            parent = node.parent
            pages.append(self._detach(node))
            freed += len(node.key)
            if parent.key:
                if not parent.children and parent.lock_ref == 0:
                    self._push(parent)
            elif not parent.children:
                del self.root.children[parent.namespace]
        self._free_pages(pages)
        return freed

    def evict_namespaces(self, keep: int) -> int:
        """Free every unlocked node outside namespace ``keep``; returns tokens freed. Locked nodes
        stay until unlocked and are then evicted by LRU like any other."""
        freed, pages = 0, []
        for ns_id, ns in list(self.root.children.items()):
            if ns_id == keep:
                continue
            stack = [ns]
            while stack:
                node = stack.pop()
                for child in list(node.children.values()):
                    if child.lock_ref == 0:
                        # Lock refs never grow downwards, so the whole subtree is unlocked.
                        freed += self._drop_subtree(child, pages)
                    else:
                        stack.append(child)
            if not ns.children:
                del self.root.children[ns_id]
        self._free_pages(pages)
        return freed

    def _detach(self, node: TreeNode) -> torch.Tensor:
        """Unlink an unlocked node from its parent; returns its page starts (slots)."""
        parent = node.parent
        assert parent is not None and node.lock_ref == 0
        del parent.children[node.key[: self.page_size]]
        node.parent = None
        self._num_nodes -= 1
        self._total -= len(node.key)
        self._evictable -= len(node.key)
        return node.value[:: self.page_size]

    def _drop_subtree(self, top: TreeNode, pages: list[torch.Tensor]) -> int:
        dropped = 0
        stack = [top]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.children = {}
            dropped += len(node.key)
            if node is top:
                pages.append(self._detach(node))
            else:
                node.parent = None
                self._num_nodes -= 1
                self._total -= len(node.key)
                self._evictable -= len(node.key)
                pages.append(node.value[:: self.page_size])
        return dropped

    def _free_pages(self, page_starts: list[torch.Tensor]) -> None:
        if page_starts:
            self.allocator.free(torch.cat(page_starts) // self.page_size)

    def reset(self) -> None:
        """Drop every node and return its pages to the allocator. RuntimeError if any is locked."""
        if self._protected:
            raise RuntimeError(f"cannot reset the prefix cache: {self._protected} tokens are locked")
        slots = self.all_slots()
        self._free_pages([slots[:: self.page_size]])
        self._init_tree()

    # ---- inspection ----------------------------------------------------------------------------

    def _walk(self) -> list[TreeNode]:
        """Every node holding tokens (iterative: chains of decode inserts can be very deep)."""
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.key:
                out.append(node)
            stack.extend(node.children.values())
        return out

    def all_slots(self) -> torch.Tensor:
        """Every slot held by the tree, (total_size,) int64."""
        values = [n.value for n in self._walk()]
        return torch.cat(values) if values else torch.empty(0, dtype=torch.int64)

    def path_slots(self, node: TreeNode) -> torch.Tensor:
        """Slots of the prefix that ends at ``node`` (root to node), (len,) int64."""
        parts = []
        while node.key:
            parts.append(node.value)
            node = node.parent  # type: ignore[assignment]
        return torch.cat(parts[::-1]) if parts else torch.empty(0, dtype=torch.int64)

    def check_integrity(self) -> None:
        """Walk the whole tree; raise RuntimeError describing the first broken invariant."""
        ps = self.page_size
        total = evictable = protected = count = 0
        values: list[torch.Tensor] = []
        stack: list[TreeNode] = []
        for ns_id, ns in self.root.children.items():
            if ns.key or ns.namespace != ns_id or ns.parent is not self.root:
                raise RuntimeError(f"radix tree: bad namespace node {ns} under key {ns_id}")
            stack.append(ns)
        while stack:
            node = stack.pop()
            for k, child in node.children.items():
                n = len(child.key)
                where = f"radix tree node {child} (namespace {node.namespace})"
                if child.parent is not node or child.namespace != node.namespace:
                    raise RuntimeError(f"{where}: wrong parent or namespace link")
                if n == 0 or n % ps or tuple(child.value.shape) != (n,) or child.value.dtype != torch.int64:
                    raise RuntimeError(f"{where}: key/value not whole pages ({n}, {child.value.shape})")
                if k != child.key[:ps]:
                    raise RuntimeError(f"{where}: child stored under {k}, its key starts {child.key[:ps]}")
                if child.lock_ref < 0 or (node.key and child.lock_ref > node.lock_ref):
                    raise RuntimeError(f"{where}: lock_ref {child.lock_ref} vs parent {node.lock_ref}")
                total += n
                count += 1
                if child.lock_ref:
                    protected += n
                else:
                    evictable += n
                values.append(child.value)
                stack.append(child)
        counters = (self._total, self._evictable, self._protected, self._num_nodes)
        if counters != (total, evictable, protected, count):
            raise RuntimeError(
                f"radix tree counters (total, evictable, protected, nodes) = {counters}, "
                f"a full walk gives {(total, evictable, protected, count)}"
            )
        if not values:
            return
        slots = torch.cat(values)  # (total,)
        if torch.unique(slots).numel() != slots.numel():
            raise RuntimeError("radix tree: a slot is held by two tree positions")
        runs = slots.view(-1, ps)  # (total // ps, ps)
        starts = runs[:, 0]
        if bool((starts % ps != 0).any()) or bool((runs - starts[:, None] != torch.arange(ps)).any()):
            raise RuntimeError("radix tree: slots are not whole pages")
        pages = starts // ps
        if int(pages.min()) < 1 or int(pages.max()) >= self.allocator.num_pages:
            raise RuntimeError("radix tree: holds page 0 or a page outside the pool")
        free = self.allocator.is_free(pages)
        if bool(free.any()):
            raise RuntimeError(f"radix tree: holds pages marked free: {pages[free][:8].tolist()}")
