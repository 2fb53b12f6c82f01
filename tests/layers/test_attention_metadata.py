"""A step's attention metadata built for every model at once, and the torch backend's KV plumbing.

`AttentionMetadata.build_many` must give each batch exactly what its own `build` gives (the
metadata of M models is views of two tensors, so an offset slip would hand one model another's
pages); the torch backend's one-write K/V scatter and index_select gathers must match plain
indexing of the pool.
"""

from __future__ import annotations

import torch

from crosspool_sgl.layers.attention.base import AttentionMetadata, kv_planes
from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend

PT = 4
FIELDS = ("page_table", "seq_lens", "extend_lens", "write_pages", "write_slots")


def reference(pages, seq_lens, extend_lens) -> dict[str, torch.Tensor]:
    """The fields written out one request at a time."""
    table = torch.zeros(len(pages), max(len(p) for p in pages), dtype=torch.int32)
    wp, ws = [], []
    for i, (p, total, new) in enumerate(zip(pages, seq_lens, extend_lens, strict=True)):
        table[i] = p[-1]  # padding: the row's own last page (never another model's or unmapped page 0)
        table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
        wp += [p[pos // PT] for pos in range(total - new, total)]
        ws += [pos % PT for pos in range(total - new, total)]
    return {
        "page_table": table,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "extend_lens": torch.tensor(extend_lens, dtype=torch.int32),
        "write_pages": torch.tensor(wp),
        "write_slots": torch.tensor(ws),
    }


def test_build_many_gives_each_batch_its_own_metadata() -> None:
    batches = [
        ([[3, 9], [4]], [6, 2], [1, 2]),  # a decode and a 2-token prefill chunk
        ([[7, 1, 5]], [12], [5]),
        ([[2], [8], [6, 0]], [1, 3, 5], [1, 1, 1]),
    ]
    metas = AttentionMetadata.build_many(batches, PT, torch.device("cpu"))
    assert len(metas) == len(batches)
    for meta, batch in zip(metas, batches, strict=True):
        want = reference(*batch)
        for name in FIELDS:
            got = getattr(meta, name)
            assert got.dtype == want[name].dtype and torch.equal(got, want[name]), name
        assert meta.seq_lens_cpu == batch[1] and meta.extend_lens_cpu == batch[2]


def test_kv_write_and_gather_match_plain_indexing() -> None:
    torch.manual_seed(4)
    kv = torch.zeros(10, 3, 2, PT, 2, 8)  # [N, L, P, PT, Hkv, D]
    meta = AttentionMetadata.build([[3, 9], [4, 6]], [6, 5], [2, 1], PT, torch.device("cpu"))
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    want = kv.clone()
    want[meta.write_pages, 1, 0, meta.write_slots] = k
    want[meta.write_pages, 1, 1, meta.write_slots] = v
    TorchAttentionBackend().forward(q, k, v, kv, 1, meta, 0.3, None)
    assert torch.equal(kv, want)
    pages = meta.page_table.long()
    keys, values = kv_planes(kv, pages, 1, None)
    assert torch.equal(keys, kv[pages, 1, 0]) and torch.equal(values, kv[pages, 1, 1])
