"""The per-model prefix cache over the shared KV pool (pure bookkeeping, no model)."""

from __future__ import annotations

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
