"""The per-model prefix cache over the shared KV pool (pure bookkeeping, no model)."""

from __future__ import annotations

import itertools
import random
import time

import torch

from crosspool_sgl.mem.kv_pool import KVGeometry, KVPool
from crosspool_sgl.mem.prefix_cache import PrefixCache

GEOM = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32)  # 256 B pages at PT=4


def setup():
    pool = KVPool(64 << 10, page_tokens=4, chunk_bytes=4 << 10)
    pool.add_model("a", GEOM)
    pool.add_model("b", GEOM)
    return pool, PrefixCache(pool)


def _finish(pool, cache, model, tokens, nodes=()):
    """A request that computed all of `tokens` (after reusing `nodes`) releases its pages."""
    nodes = list(nodes)
    need = -(-len(tokens) // 4) - len(nodes)
    pages = [n.page for n in nodes] + pool.alloc(model, need)
    cache.release(model, tokens, pages, len(tokens), nodes)
    return pages


def test_full_pages_are_reused_and_partial_pages_freed():
    pool, cache = setup()
    tokens = list(range(10))  # 2 full pages + 2 tokens
    pages = _finish(pool, cache, "a", tokens)
    assert cache.cached_pages("a") == 2 and pool.used_pages("a") == 2
    hit = cache.match("a", tokens + [99])
    assert [n.page for n in hit] == pages[:2]
    assert cache.evictable_pages("a") == 0  # referenced by the new request
    cache.release("a", tokens + [99], [n.page for n in hit], 8, hit)
    assert cache.evictable_pages("a") == 2


def test_match_leaves_one_token_to_compute_and_never_crosses_models():
    pool, cache = setup()
    tokens = list(range(8))
    _finish(pool, cache, "a", tokens)
    assert len(cache.match("a", tokens)) == 1  # the last token must be recomputed for its logits
    assert cache.match("b", tokens + [1]) == []


def test_divergent_suffixes_branch_and_evict_leaves_first():
    pool, cache = setup()
    common = list(range(8))
    _finish(pool, cache, "a", common + [50, 51, 52, 53])
    _finish(pool, cache, "a", common + [60, 61, 62, 63], cache.match("a", common + [60, 61, 62, 63])[:2])
    assert cache.cached_pages("a") == 4  # 2 shared + 2 branches
    assert cache.evict("a", 2) == 2
    assert cache.cached_pages("a") == 2
    assert len(cache.match("a", common + [70])) == 2  # the shared trunk survived


def test_flush_returns_every_page_and_chunk():
    pool, cache = setup()
    _finish(pool, cache, "a", list(range(16)))
    _finish(pool, cache, "b", list(range(12)))
    assert cache.flush() == 7
    assert pool.used_pages() == 0 and pool.snapshot().num_free_chunks == pool.num_chunks


# ---- randomized check against brute-force counts ---------------------------------------------
def _brute(cache, model):
    """(cached, evictable, evictable leaves) recomputed from the nodes: the oracle."""
    mine = [n for n in cache.nodes.values() if n.model == model]
    free = [n for n in mine if n.refs == 0]
    children = {}
    for n in mine:
        if n.parent is not None:
            children[n.parent.node_id] = children.get(n.parent.node_id, 0) + 1
    for n in mine:
        assert n.num_children == children.get(n.node_id, 0)
        assert n.parent is None or cache.nodes.get(n.parent.key) is n.parent  # no orphans
        assert n.parent is None or n.parent.refs >= n.refs
    return len(mine), len(free), [n for n in free if n.num_children == 0]


def _expected_evictions(cache, model, k):
    """Keys `evict(model, k)` must remove: rounds of the current leaves, oldest use (then oldest
    node) first; a parent left childless joins from the next round on. Brute force, no mutation."""
    children = {}
    for n in cache.nodes.values():
        if n.parent is not None:
            children[n.parent.key] = children.get(n.parent.key, 0) + 1
    gone = []
    while len(gone) < k:
        leaves = [
            n
            for n in cache.nodes.values()
            if n.model == model and n.refs == 0 and not children.get(n.key) and n.key not in gone
        ]
        if not leaves:
            break
        for n in sorted(leaves, key=lambda n: (n.last_used, n.node_id))[: k - len(gone)]:
            gone.append(n.key)
            if n.parent is not None:
                children[n.parent.key] -= 1
    return gone


def test_random_traffic_keeps_counts_and_lru_leaf_order_exact():
    pool, cache = setup()
    rng = random.Random(3)
    live = []  # (model, tokens, pages, nodes)
    for step in range(2500):
        model = rng.choice("ab")
        r = rng.random()
        if r < 0.45:  # a request arrives: reuse its cached prefix, allocate the rest
            tokens = [rng.randint(0, 1) for _ in range(rng.randint(1, 14))]
            nodes = cache.match(model, tokens)
            fresh = pool.alloc(model, -(-len(tokens) // 4) - len(nodes))
            if fresh is None:
                cache.release(model, tokens, [n.page for n in nodes], len(nodes) * 4, nodes)
            else:
                live.append((model, tokens, [n.page for n in nodes] + fresh, nodes))
        elif r < 0.85 and live:  # one finishes (or is preempted) having computed part of it
            model, tokens, pages, nodes = live.pop(rng.randrange(len(live)))
            cache.release(model, tokens, pages, rng.randint(len(nodes) * 4, len(tokens)), nodes)
        elif r < 0.98:
            _, before, _ = _brute(cache, model)
            k = rng.choice([1, 1, 2, 5, 12])
            expected = _expected_evictions(cache, model, k)
            kept = set(cache.nodes)
            assert cache.evict(model, k) == min(k, before) == len(expected), f"step {step}"
            assert kept - set(cache.nodes) == set(expected), f"step {step}"
        else:
            cache.flush()
            assert cache.evictable_pages() == 0
        held = {m: sum(len(p) - len(n) for mm, _, p, n in live if mm == m) for m in "ab"}
        for m in "ab":
            cached, evictable, _ = _brute(cache, m)
            assert (cache.cached_pages(m), cache.evictable_pages(m)) == (cached, evictable), f"step {step}"
            assert pool.used_pages(m) == cached + held[m]
        assert cache.evictable_pages() == sum(cache.evictable_pages(m) for m in "ab")
        assert cache.cached_pages() == len(cache.nodes)
    for model, tokens, pages, nodes in live:
        cache.release(model, tokens, pages, len(tokens), nodes)
    cache.flush()
    assert pool.used_pages() == 0 and not cache.nodes


# ---- cost: queries O(1), eviction grows with pages evicted, not with the cache ---------------
def _filled(num_pages: int):
    """A cache of `num_pages` one-page prefixes, all unreferenced."""
    pool = KVPool(num_pages * 256, page_tokens=4, chunk_bytes=4 << 10)
    pool.add_model("a", GEOM)
    pool.add_model("b", GEOM)
    cache = PrefixCache(pool)
    for i in range(num_pages):
        cache.release("a", [i, i, i, i], pool.alloc("a", 1), 4, [])
    return pool, cache


def _query_evict_seconds(pool, cache, rounds: int = 40, repeats: int = 5) -> float:
    best = float("inf")
    fresh = itertools.count(1)
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(rounds):
            cache.evictable_pages("a"), cache.evictable_pages(), cache.cached_pages("a")
            cache.evict("a", 1)
            cache.release("a", [-next(fresh)] * 4, pool.alloc("a", 1), 4, [])  # keep the size
        best = min(best, time.perf_counter() - t)
    return best


def test_queries_and_eviction_cost_does_not_grow_with_the_cache():
    small, large = _filled(512), _filled(51_200)
    _query_evict_seconds(*small, rounds=5, repeats=1)  # warm up
    ratio = _query_evict_seconds(*large) / _query_evict_seconds(*small)
    assert ratio < 4.0, f"queries + evict on a 100x larger cache took {ratio:.1f}x longer"
    assert large[1].cached_pages("a") == 51_200
