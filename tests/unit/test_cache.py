"""KV cache bookkeeping: page allocator, radix prefix cache, req table and the cache manager."""

from __future__ import annotations

import random

import pytest
import torch

from rollout.cache.allocator import PageAllocator
from rollout.cache.manager import KVCacheManager
from rollout.cache.radix_tree import RadixCache
from rollout.cache.req_table import ReqToTokenTable
from rollout.errors import OutOfRangeError

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


# ---- req table ---------------------------------------------------------------------------------------


def test_req_table_rows_and_writes():
    table = ReqToTokenTable(2, 8, "cpu")
    r0, r1 = table.alloc_row(), table.alloc_row()
    assert {r0, r1} == {0, 1} and table.alloc_row() is None and table.num_free_rows == 0
    table.write(r1, 2, torch.tensor([5, 6, 7]))
    assert table.table[r1, 2:5].tolist() == [5, 6, 7]
    with pytest.raises(RuntimeError):
        table.write(r1, 6, torch.tensor([1, 2, 3]))
    table.free_row(r0)
    with pytest.raises(RuntimeError):
        table.free_row(r0)
    assert table.alloc_row() == r0


# ---- manager -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ps,plen", [(1, 10), (4, 13), (4, 12), (4, 3)])
def test_n_samples_share_the_prompt(ps, plen):
    mgr = KVCacheManager(num_slots=256, page_size=ps, max_requests=8, max_context=64, device="cpu")
    prompt = list(range(1000, 1000 + plen))
    first = mgr.new_seq()
    assert mgr.match(first, prompt, len(prompt) - 1) == 0
    assert mgr.ensure_capacity(first, plen)
    mgr.cache_prefix(first, prompt)
    mgr.check_integrity()
    want = (plen - 1) // ps * ps
    used_before = mgr.used_tokens()
    others = [mgr.new_seq() for _ in range(4)]
    for seq in others:
        assert mgr.match(seq, prompt, len(prompt) - 1) == want
        assert torch.equal(mgr.slots_for(seq, 0, want), mgr.slots_for(first, 0, want))
        assert mgr.ensure_capacity(seq, plen + 5)
    mgr.check_integrity()
    # Each sample only adds pages for what it does not share.
    extra = -(-(plen + 5) // ps) * ps - want
    assert mgr.used_tokens() == used_before + len(others) * extra
    for seq in [first, *others]:
        mgr.release(seq, prompt)
    mgr.check_integrity()
    assert mgr.used_tokens() == 0
    assert mgr.available_tokens() == mgr.total_slots


def test_manager_release_twice_and_flush_rules():
    mgr = KVCacheManager(num_slots=64, page_size=2, max_requests=2, max_context=16, device="cpu")
    seq = mgr.new_seq()
    assert mgr.ensure_capacity(seq, 5)
    with pytest.raises(RuntimeError):
        mgr.flush()
    mgr.release(seq, [1, 2, 3, 4, 5])
    with pytest.raises(RuntimeError):
        mgr.release(seq, [1, 2, 3, 4, 5])
    assert mgr.cached_tokens() == 4  # the partial last page is not cached
    mgr.flush()
    assert mgr.cached_tokens() == 0 and mgr.allocator.num_free_pages == mgr.allocator.total_pages
    mgr.check_integrity()


def test_manager_row_exhaustion_and_capacity_limits():
    mgr = KVCacheManager(num_slots=20, page_size=2, max_requests=2, max_context=40, device="cpu")
    assert mgr.total_slots == 18
    a, b = mgr.new_seq(), mgr.new_seq()
    assert mgr.new_seq() is None
    assert mgr.ensure_capacity(a, 10)
    assert not mgr.ensure_capacity(b, 10)  # 8 slots left
    assert b.pages == [] and mgr.available_tokens() == 8
    with pytest.raises(OutOfRangeError):
        mgr.ensure_capacity(b, 41)
    mgr.release(a, list(range(10)))  # 10 tokens cached, all evictable
    assert mgr.cached_tokens() == 10
    assert mgr.ensure_capacity(b, 16)  # needs eviction of 8 tree tokens
    assert mgr.cached_tokens() <= 2
    mgr.check_integrity()


def test_manager_disabled_prefix_cache():
    mgr = KVCacheManager(64, 1, 4, 32, "cpu", enable_prefix_cache=False)
    toks = list(range(20))
    s = mgr.new_seq()
    mgr.ensure_capacity(s, 20)
    mgr.cache_prefix(s, toks)
    mgr.release(s, toks)
    t = mgr.new_seq()
    assert mgr.match(t, toks, 19) == 0 and mgr.cached_tokens() == 0
    mgr.check_integrity()


def test_manager_namespace_switch_drops_and_stops_caching_old_versions():
    mgr = KVCacheManager(128, 2, 4, 32, "cpu")
    toks = list(range(10))
    old = mgr.new_seq(namespace=3)
    mgr.ensure_capacity(old, 10)
    mgr.cache_prefix(old, toks)
    done = mgr.new_seq(namespace=3)
    assert mgr.match(done, toks, 9) == 8
    mgr.release(done, toks[:8])
    mgr.evict_namespaces(keep=4)
    assert mgr.cached_tokens() == 10  # still locked by `old`
    fresh = mgr.new_seq(namespace=4)
    assert mgr.match(fresh, toks, 9) == 0
    mgr.release(old, toks)  # KV of a replaced version is not cached again
    mgr.tree.evict(10**6)
    assert mgr.cached_tokens() == 0
    mgr.release(fresh, [])
    mgr.check_integrity()
    assert mgr.allocator.num_free_pages == mgr.allocator.total_pages


@pytest.mark.parametrize("ps,seed", [(1, 0), (4, 1), (2, 2)])
def test_manager_randomized_stress(ps, seed):
    rng = random.Random(seed)
    max_ctx = 48
    mgr = KVCacheManager(num_slots=96, page_size=ps, max_requests=6, max_context=max_ctx, device="cpu")
    kv = torch.full((mgr.allocator.num_pages * ps,), -1, dtype=torch.int64)  # fake KV pool content
    bases = [[rng.randrange(50) for _ in range(max_ctx)] for _ in range(3)]
    live: list[dict] = []
    ns = 0
    stats = {"hits": 0, "fail": 0, "evicted": 0}

    def check_contents() -> None:
        for e in live:
            got = kv[mgr.slots_for(e["seq"], 0, e["done"])]
            assert torch.equal(got, prefix_hashes(e["seq"].namespace, e["toks"][: e["done"]]))
        stack = [(node, []) for node in mgr.tree.root.children.values()]
        while stack:  # every cached node holds the KV of exactly its key's prefix
            node, prefix = stack.pop()
            for child in node.children.values():
                path = prefix + list(child.key)
                want = prefix_hashes(child.namespace, path)[len(prefix) :]
                assert torch.equal(kv[child.value], want)
                stack.append((child, path))

    for _ in range(1500):
        r = rng.random()
        if r < 0.2:
            seq = mgr.new_seq(namespace=ns)
            if seq is None:
                continue
            base = rng.choice(bases)
            plen = rng.randint(1, 30)
            toks = base[:plen] + [rng.randrange(50) for _ in range(rng.randint(0, max_ctx - plen))]
            hit = mgr.match(seq, toks, plen - 1)
            assert hit % ps == 0 and hit <= plen - 1
            stats["hits"] += hit
            live.append({"seq": seq, "toks": toks, "done": hit})
        elif r < 0.6 and live:
            e = rng.choice(live)
            k = min(rng.randint(1, 9), len(e["toks"]) - e["done"])
            if k == 0:
                continue
            if mgr.ensure_capacity(e["seq"], e["done"] + k):
                kv[mgr.slots_for(e["seq"], e["done"], e["done"] + k)] = prefix_hashes(
                    e["seq"].namespace, e["toks"][: e["done"] + k]
                )[e["done"] :]
                e["done"] += k
            else:  # retract: no memory left for it
                stats["fail"] += 1
                live.remove(e)
                mgr.release(e["seq"], e["toks"][: e["done"]], cache=rng.random() < 0.5)
        elif r < 0.72 and live:
            e = rng.choice(live)
            mgr.cache_prefix(e["seq"], e["toks"][: e["done"]])
        elif r < 0.84 and live:
            e = rng.choice(live)
            live.remove(e)
            mgr.release(e["seq"], e["toks"][: e["done"]], cache=rng.random() < 0.8)
        elif r < 0.98:
            stats["evicted"] += mgr.tree.evict(rng.randint(1, 20))
        else:
            ns += 1
            mgr.evict_namespaces(keep=ns)
        mgr.check_integrity()
        assert mgr.used_tokens() + mgr.available_tokens() == mgr.total_slots
        check_contents()
    assert stats["hits"] > 0 and stats["fail"] > 0 and stats["evicted"] > 0  # every path was exercised

    for e in live:
        mgr.release(e["seq"], e["toks"][: e["done"]])
        mgr.check_integrity()
    assert mgr.num_live_seqs() == 0 and mgr.used_tokens() == 0
    assert mgr.allocator.num_free_slots + mgr.cached_tokens() == mgr.total_slots
    mgr.flush()
    mgr.check_integrity()
    assert mgr.allocator.num_free_pages == mgr.allocator.total_pages and mgr.cached_tokens() == 0
