"""KV cache bookkeeping: the page allocator and the radix prefix cache (the manager: test_cache_manager)."""

from __future__ import annotations

import pytest
import torch

from rollout.cache.allocator import PageAllocator
from rollout.cache.radix_tree import RadixCache

# ---- helpers ---------------------------------------------------------------------------------------


def take_slots(alloc: PageAllocator, n_tokens: int) -> torch.Tensor:
    """Allocate whole pages for ``n_tokens`` tokens and return their slots."""
    ps = alloc.page_size
    pages = alloc.alloc(n_tokens // ps)
    assert pages is not None
    return (pages[:, None] * ps + torch.arange(ps)).reshape(-1)


def make_tree(page_size: int, num_pages: int = 64) -> tuple[PageAllocator, RadixCache]:
    alloc = PageAllocator(num_pages, page_size)
    return alloc, RadixCache(alloc, page_size)


def prefix_hashes(namespace: int, tokens: list[int]) -> torch.Tensor:
    """Stand-in KV content of each position: a hash of the namespace and the whole prefix."""
    h, out = namespace * 1_000_003 + 7, []
    for t in tokens:
        h = (h * 1_315_423_911 + t + 1) % (2**61 - 1)
        out.append(h)
    return torch.tensor(out, dtype=torch.int64)


# ---- allocator ---------------------------------------------------------------------------------------


def test_allocator_alloc_free_and_counts():
    alloc = PageAllocator(9, 4)
    assert (alloc.total_pages, alloc.num_free_pages, alloc.num_free_slots) == (8, 8, 32)
    a = alloc.alloc(3)
    b = alloc.alloc(2)
    assert a is not None and b is not None and a.dtype == torch.int64
    assert a.tolist() == [1, 2, 3]
    ids = a.tolist() + b.tolist()
    assert len(set(ids)) == 5 and min(ids) >= 1 and max(ids) <= 8
    assert alloc.num_free_pages == 3 and alloc.num_free_slots == 12
    alloc.free(a)
    assert alloc.num_free_pages == 6
    assert alloc.is_free(a).all() and not alloc.is_free(b).any()
    assert alloc.alloc(0).numel() == 0
    alloc.reset()
    assert alloc.num_free_pages == 8


def test_allocator_exhaustion_takes_nothing_and_never_gives_page_zero():
    alloc = PageAllocator(5, 2)
    assert alloc.alloc(5) is None
    assert alloc.num_free_pages == 4
    pages = alloc.alloc(4)
    assert pages is not None and sorted(pages.tolist()) == [1, 2, 3, 4]
    assert alloc.alloc(1) is None
    alloc.free(pages[:2])
    again = alloc.alloc(2)
    assert again is not None and sorted(again.tolist()) == sorted(pages[:2].tolist())


@pytest.mark.parametrize(
    "bad", [[0], [9], [-1], [2, 2]], ids=["page0", "out_of_range", "negative", "repeated_in_call"]
)
def test_allocator_rejects_bad_frees_without_changing_state(bad):
    alloc = PageAllocator(9, 1)
    taken = alloc.alloc(8)
    assert taken is not None
    with pytest.raises(RuntimeError):
        alloc.free(torch.tensor(bad))
    assert alloc.num_free_pages == 0


def test_allocator_double_free():
    alloc = PageAllocator(9, 1)
    pages = alloc.alloc(3)
    alloc.free(pages[:1])
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(pages)
    assert alloc.num_free_pages == 6  # the failed call freed nothing


def test_allocator_large_pool_small_moves():
    alloc = PageAllocator(1_000_000, 1)
    for _ in range(200):
        p = alloc.alloc(16)
        alloc.free(p)
    assert alloc.num_free_pages == 999_999


# ---- radix tree --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ps", [1, 4])
def test_tree_insert_match_and_page_rounding(ps):
    alloc, tree = make_tree(ps)
    assert tree.match_prefix([1, 2, 3]).length == 0
    toks = list(range(100, 100 + 4 * ps))
    slots = take_slots(alloc, len(toks))
    assert tree.insert(toks, slots) == 0
    assert tree.total_size == len(toks) == tree.evictable_size
    full = tree.match_prefix(toks + [7, 7, 7])
    assert full.length == len(toks) and torch.equal(full.slots, slots)
    # Diverging in the middle of the third page: only whole pages match.
    probe = toks[: 2 * ps + ps // 2] + [-1] * ps
    part = tree.match_prefix(probe)
    assert part.length == 2 * ps and torch.equal(part.slots, slots[: 2 * ps])
    # max_len is rounded down to pages.
    capped = tree.match_prefix(toks, max_len=3 * ps - 1)
    assert capped.length == 2 * ps
    assert tree.match_prefix(toks, max_len=0).length == 0
    tree.check_integrity()


def test_tree_split_on_page_boundaries():
    ps = 4
    alloc, tree = make_tree(ps)
    a = list(range(1, 13))  # three pages
    sa = take_slots(alloc, 12)
    tree.insert(a, sa)
    # Same first page, then a page that differs only in its last token: shares exactly one page.
    b = a[:4] + [5, 6, 7, 99]
    sb = take_slots(alloc, 8)
    assert tree.insert(b, sb) == 4
    alloc.free(sb[:4][::ps] // ps)  # the duplicate first page is ours to free
    assert tree.num_nodes == 3 and tree.total_size == 16
    mb = tree.match_prefix(b)
    assert mb.length == 8 and torch.equal(mb.slots, torch.cat([sa[:4], sb[4:]]))
    # A match ending inside a node splits it so the node covers exactly the match.
    m = tree.match_prefix(a, max_len=8)
    assert m.length == 8 and torch.equal(tree.path_slots(m.node), sa[:8])
    assert tree.num_nodes == 4 and tree.total_size == 16
    # Re-inserting a fully cached sequence reports all of it as already cached.
    dup = take_slots(alloc, 12)
    assert tree.insert(a, dup) == 12
    alloc.free(dup[::ps] // ps)
    tree.check_integrity()


def test_tree_page_size_one_token_split():
    alloc, tree = make_tree(1)
    tree.insert([1, 2, 3, 4], take_slots(alloc, 4))
    s2 = take_slots(alloc, 4)
    assert tree.insert([1, 2, 9, 9], s2) == 2
    alloc.free(s2[:2])
    assert tree.match_prefix([1, 2, 9]).length == 3
    assert tree.match_prefix([1, 5]).length == 1
    tree.check_integrity()


def test_tree_insert_validation():
    alloc, tree = make_tree(4)
    with pytest.raises(ValueError):
        tree.insert([1, 2, 3, 4], torch.arange(4, 7))
    with pytest.raises(ValueError):
        tree.insert([1, 2, 3, 4, 5, 6], torch.arange(4, 10))


def test_tree_namespaces_are_isolated():
    alloc, tree = make_tree(2)
    toks = [5, 6, 7, 8]
    s0 = take_slots(alloc, 4)
    tree.insert(toks, s0, namespace=0)
    assert tree.match_prefix(toks, namespace=1).length == 0
    s1 = take_slots(alloc, 4)
    assert tree.insert(toks, s1, namespace=1) == 0  # not shared across namespaces
    assert torch.equal(tree.match_prefix(toks, namespace=1).slots, s1)
    assert torch.equal(tree.match_prefix(toks, namespace=0).slots, s0)
    tree.check_integrity()


def test_tree_lock_refs_protect_from_eviction():
    ps = 2
    alloc, tree = make_tree(ps, num_pages=16)
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 9, 9]
    tree.insert(a, take_slots(alloc, 6))
    sb = take_slots(alloc, 4)
    tree.insert(b, sb)
    alloc.free(sb[:2][::ps] // ps)
    node = tree.match_prefix(a).node
    tree.inc_lock_ref(node)
    tree.inc_lock_ref(node)
    assert tree.protected_size == 6 and tree.evictable_size == 2
    free_before = alloc.num_free_pages
    assert tree.evict(100) == 2  # only [9, 9] is unlocked
    assert alloc.num_free_pages == free_before + 1
    assert tree.match_prefix(a).length == 6 and tree.match_prefix(b).length == 2
    tree.dec_lock_ref(node)
    assert tree.evict(100) == 0  # still locked once
    tree.dec_lock_ref(node)
    assert tree.protected_size == 0 and tree.evictable_size == 6
    with pytest.raises(RuntimeError):
        tree.dec_lock_ref(node)
    assert tree.evict(100) == 6  # the parent [1, 2] becomes a leaf and goes too
    assert tree.total_size == 0 and alloc.num_free_pages == alloc.total_pages
    tree.check_integrity()


def test_tree_evicts_least_recently_used_first():
    alloc, tree = make_tree(1)
    seqs = [[1, 1], [2, 2], [3, 3]]
    for s in seqs:
        tree.insert(s, take_slots(alloc, 2))
    tree.match_prefix(seqs[0])  # now [2, 2] is the oldest
    assert tree.evict(1) == 2
    assert [tree.match_prefix(s).length for s in seqs] == [2, 0, 2]
    tree.match_prefix(seqs[0])
    assert tree.evict(1) == 2
    assert [tree.match_prefix(s).length for s in seqs] == [2, 0, 0]
    tree.check_integrity()


def test_tree_evict_namespaces_keeps_locked_until_unlocked():
    alloc, tree = make_tree(1)
    tree.insert([1, 2, 3], take_slots(alloc, 3), namespace=0)
    tree.insert([4, 5], take_slots(alloc, 2), namespace=0)
    tree.insert([1, 2, 3], take_slots(alloc, 3), namespace=1)
    locked = tree.match_prefix([1, 2, 3], namespace=0).node
    tree.inc_lock_ref(locked)
    assert tree.evict_namespaces(keep=1) == 2
    assert tree.total_size == 6 and tree.protected_size == 3
    assert tree.match_prefix([1, 2, 3], namespace=1).length == 3
    tree.check_integrity()
    tree.dec_lock_ref(locked)
    assert tree.evict(100) == 6
    assert alloc.num_free_pages == alloc.total_pages


def test_tree_reset_and_integrity_checks_catch_corruption():
    alloc, tree = make_tree(2)
    slots = take_slots(alloc, 4)
    tree.insert([1, 2, 3, 4], slots)
    node = tree.match_prefix([1, 2, 3, 4]).node
    tree.inc_lock_ref(node)
    with pytest.raises(RuntimeError, match="locked"):
        tree.reset()
    tree.dec_lock_ref(node)
    # A tree page that the allocator thinks is free is a leak waiting to happen.
    alloc.free(slots[:1] // 2)
    with pytest.raises(RuntimeError, match="free"):
        tree.check_integrity()
    alloc.alloc(1)
    tree.check_integrity()
    tree._evictable += 2  # a counter drifting from the truth is caught by the full walk
    with pytest.raises(RuntimeError, match="counters"):
        tree.check_integrity()
    tree._evictable -= 2
    tree.reset()
    assert tree.total_size == 0 and alloc.num_free_pages == alloc.total_pages
    tree.check_integrity()


def test_tree_deep_chain_has_no_recursion_limit():
    alloc, tree = make_tree(1, num_pages=1500)
    toks: list[int] = []
    for i in range(1200):  # one more token per insert: a chain deeper than the recursion limit
        toks.append(i)
        cached = tree.match_prefix(toks)
        assert cached.length == i
        assert tree.insert(toks, torch.cat([cached.slots, take_slots(alloc, 1)])) == i
    assert tree.num_nodes == 1200
    tree.check_integrity()
    assert tree.evict(10**6) == 1200
    assert alloc.num_free_pages == alloc.total_pages
