"""WeightStore on CUDA: pinned host copies, side-stream page-in with per-layer events (needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from crosspool_sgl.mem.weight_pool import WeightPool
from crosspool_sgl.mem.weight_store import WeightStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_evict_to_pinned_and_page_in_on_a_side_stream():
    gen = torch.Generator().manual_seed(0)
    pool = WeightPool(torch.float16, "cuda")
    want = {}
    for model, inter in (("a", 64), ("b", 96)):
        for layer in range(3):
            for e in range(4):
                w = [torch.randn(s, generator=gen).half() for s in ((inter, 128), (inter, 128), (128, inter))]
                want[pool.add_expert(model, layer, e, *(t.cuda() for t in w))] = w
    store = WeightStore(pool)
    assert store.pin
    store.evict("a")
    assert store.host["a"].buffer.is_pinned() and store.pinned_bytes == pool.model_bytes["a"]
    store.begin_page_in("a")
    if not store.advance("a"):  # everything enqueued; usually still in flight
        assert len(store.jobs["a"].events) == 3  # one event per layer
    store.wait("a")
    assert store.pinned_bytes == 0 and pool.model_resident_bytes["a"] == pool.model_bytes["a"]
    for slot, (gate, up, down) in want.items():
        assert torch.equal(pool.w13(slot).cpu(), torch.cat([gate, up]))
        assert torch.equal(pool.w2(slot).cpu(), down)
