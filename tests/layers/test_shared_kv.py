"""SharedKVWrite (layers/attention/shared_kv.py): one indexed copy per layer index for several models'
K/V must leave the arena byte-identical to each model's own write (AttentionBackend.write_kv); SharedKVGather
the same keys and values as each model's `kv_planes`.

Three views of one arena with different layers, KV heads, head dims (so G = gcd(Hkv * D) is smaller
than some models' rows) and token counts; the shallow model drops out after its last layer.
"""

from __future__ import annotations

import torch

from crosspool_sgl.layers.attention.base import AttentionBackend, AttentionMetadata, kv_planes
from crosspool_sgl.layers.attention.shared_kv import SharedKVGather, SharedKVWrite, shares_arena

PT = 4
CPU = torch.device("cpu")
GEOMETRIES = [(3, 2, 16), (1, 1, 8), (2, 4, 8)]  # (layers, Hkv, D)
# per model, per sequence; byte-disjoint across models (pages of 768, 64 and 512 floats)
PAGES = [[[0, 2], [1]], [[37, 36, 38]], [[5], [7, 6]]]
SEQ_LENS = [[6, 3], [9], [2, 7]]


def views(arena: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for layers, hkv, d in GEOMETRIES:
        page = layers * 2 * PT * hkv * d
        out.append(arena[: (arena.numel() // page) * page].view(-1, layers, 2, PT, hkv, d))
    return out


def run(new_tokens: list[list[int]], shared: bool) -> torch.Tensor:
    torch.manual_seed(0)
    arena = torch.zeros(4096)
    kvs = views(arena)
    metas = [
        AttentionMetadata.build(PAGES[j], SEQ_LENS[j], new_tokens[j], PT, CPU) for j in range(len(GEOMETRIES))
    ]
    perm = (0, 2, 1)  # the writer's models, deepest first; order: positions in that list
    depths = [GEOMETRIES[j][0] for j in perm]
    order = [[p for p in range(3) if depths[p] > i] for i in range(max(depths))]
    writer = SharedKVWrite([kvs[j] for j in perm], [metas[j] for j in perm], order)
    for layer, live in enumerate(order):
        ks, vs = [], []
        for p in live:
            j = perm[p]
            _, hkv, d = GEOMETRIES[j]
            t = sum(new_tokens[j])
            k, v = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
            ks.append(k)
            vs.append(v)
            if not shared:
                AttentionBackend.write_kv(kvs[j], layer, metas[j], k, v)
        if shared:
            writer.write(layer, ks, vs)
    return arena


def test_views_of_one_arena_share_it() -> None:
    arena = torch.zeros(4096)
    assert shares_arena(views(arena))
    assert not shares_arena([views(arena)[0], views(torch.zeros(4096))[1]])


def test_one_copy_per_layer_equals_each_models_own_write() -> None:
    for new in ([[1, 1], [1], [1, 1]], [[6, 2], [4], [2, 3]]):  # a decode step, then extends
        want = run(new, shared=False)
        assert want.count_nonzero() > 0
        assert torch.equal(run(new, shared=True), want), new


def test_one_gather_per_layer_equals_each_models_kv_planes() -> None:
    torch.manual_seed(1)
    arena = torch.randn(4096)
    kvs = views(arena)
    metas = [AttentionMetadata.build(PAGES[j], SEQ_LENS[j], [1] * len(PAGES[j]), PT, CPU) for j in range(3)]
    perm = (0, 2, 1)
    depths = [GEOMETRIES[j][0] for j in perm]
    order = [[p for p in range(3) if depths[p] > i] for i in range(max(depths))]
    gather = SharedKVGather([kvs[j] for j in perm], [metas[j] for j in perm], order)
    for layer, live in enumerate(order):
        got = gather.gather(layer)
        assert len(got) == len(live)
        for p, (keys, values) in zip(live, got, strict=True):
            j = perm[p]
            pages = metas[j].page_table[:, : -(-max(SEQ_LENS[j]) // PT)].long()
            want_k, want_v = kv_planes(kvs[j], pages, layer, None)
            assert torch.equal(keys, want_k.flatten(1, 2)), (layer, j)
            assert torch.equal(values, want_v.flatten(1, 2)), (layer, j)
