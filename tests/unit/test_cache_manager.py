"""KV cache bookkeeping: the req table and the cache manager."""

from __future__ import annotations

import random

import pytest
import torch

from rollout.cache.manager import KVCacheManager
from rollout.cache.req_table import ReqToTokenTable
from rollout.errors import OutOfRangeError
from tests.unit.test_cache import prefix_hashes

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
