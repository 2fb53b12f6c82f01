"""The cross-model KV pool: byte accounting, per-model views, chunk ownership, no leaks."""

from __future__ import annotations

import random

import pytest
import torch

from crosspool_sgl.mem.kv_pool import KVGeometry, KVPool

SMALL = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)  # 2 KiB pages at PT=8
BIG = KVGeometry(num_layers=3, num_kv_heads=1, head_dim=24, dtype=torch.float16)  # 2304 B pages: straddle


def make_pool(chunks: int = 8, chunk_bytes: int = 16 << 10) -> KVPool:
    pool = KVPool(chunks * chunk_bytes, page_tokens=8, chunk_bytes=chunk_bytes)
    pool.add_model("small", SMALL)
    pool.add_model("big", BIG)
    return pool


def test_views_have_each_models_geometry_over_one_arena():
    pool = make_pool()
    small, big = pool.kv_view("small"), pool.kv_view("big")
    assert small.shape[1:] == (2, 2, 8, 2, 8) and small.dtype == torch.float32
    assert big.shape[1:] == (3, 2, 8, 1, 24) and big.dtype == torch.float16
    assert small.untyped_storage().data_ptr() == big.untyped_storage().data_ptr() == pool.arena.data_ptr()
    assert pool.page_bytes("small") == 2 * 2 * 8 * 2 * 8 * 4


def test_pages_of_different_models_never_overlap_in_bytes():
    pool = make_pool()
    rng = random.Random(0)
    held = {"small": [], "big": []}
    for _ in range(200):
        model = rng.choice(["small", "big"])
        if held[model] and rng.random() < 0.4:
            pages = held[model].pop(rng.randrange(len(held[model])))
            pool.free(model, pages)
        else:
            pages = pool.alloc(model, rng.randint(1, 5))
            if pages is not None:
                held[model].append(pages)
        spans = [
            (p * pool.page_bytes(m), (p + 1) * pool.page_bytes(m), m)
            for m, groups in held.items()
            for g in groups
            for p in g
        ]
        spans.sort()
        for (_, e1, m1), (s2, _, m2) in zip(spans, spans[1:], strict=False):
            assert e1 <= s2, f"{m1} and {m2} pages overlap"
    for model, groups in held.items():
        for g in groups:
            pool.free(model, g)
    snap = pool.snapshot()
    assert snap.total_used_pages == 0 and snap.num_free_chunks == pool.num_chunks


def test_writes_through_one_model_view_do_not_touch_another_models_pages():
    pool = make_pool()
    a = pool.alloc("small", 3)
    b = pool.alloc("big", 3)
    pool.kv_view("small")[a] = 1.0
    pool.kv_view("big")[b] = 2.0
    assert torch.all(pool.kv_view("small")[a] == 1.0)
    assert torch.all(pool.kv_view("big")[b] == 2.0)


def test_alloc_returns_none_and_rolls_back_when_full():
    pool = make_pool(chunks=2)
    first = pool.alloc("small", 10)
    assert first is not None
    before = pool.snapshot()
    assert pool.alloc("big", 1000) is None
    assert pool.snapshot() == before
    assert not pool.can_alloc("big", 1000)


def test_memory_follows_demand_no_per_model_reservation():
    pool = make_pool(chunks=4)
    # one model may take (almost) the whole arena while the other is idle
    pages = pool.alloc("small", pool.num_chunks * (pool.chunk_bytes // pool.page_bytes("small")))
    assert pages is not None and pool.snapshot().num_free_chunks == 0
    assert pool.alloc("big", 1) is None
    pool.free("small", pages)
    assert pool.alloc("big", 20) is not None  # freed chunks are usable by the other model at once


def test_double_free_is_an_error():
    pool = make_pool()
    pages = pool.alloc("small", 2)
    pool.free("small", pages)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free("small", pages)


def test_snapshot_accounts_bytes_per_model():
    pool = make_pool()
    pool.alloc("small", 3)
    pool.alloc("big", 2)
    snap = pool.snapshot()
    assert snap.used_pages == {"small": 3, "big": 2}
    assert snap.used_bytes == {"small": 3 * pool.page_bytes("small"), "big": 2 * pool.page_bytes("big")}
    assert snap.free_bytes + sum(snap.owned_bytes.values()) == snap.total_bytes


def test_physical_backing_follows_chunk_ownership():
    """Only owned chunks are mapped (on GPU: CUDA VMM; on CPU the same accounting)."""
    pool = make_pool(chunks=6)
    rng = random.Random(1)
    held = []
    for _ in range(150):
        if held and rng.random() < 0.45:
            model, pages = held.pop(rng.randrange(len(held)))
            pool.free(model, pages)
        else:
            model = rng.choice(["small", "big"])
            pages = pool.alloc(model, rng.randint(1, 6))
            if pages is not None:
                held.append((model, pages))
        owned = {c for v in pool.views.values() for c in v.owned_chunks}
        assert pool.backing.mapped == owned
        assert pool.backing.mapped_bytes == sum(pool.snapshot().owned_bytes.values())
    for model, pages in held:
        pool.free(model, pages)
    assert pool.backing.mapped_bytes == 0
