"""The shared weights pool: one arena, views per model, the (model, layer, expert) -> slot table."""

from __future__ import annotations

import torch

from crosspool_sgl.layers.moe import run_ffn
from crosspool_sgl.mem.weight_pool import WeightPool
from kernels.fused_moe import fused_moe_ref


def _expert(inter: int, hidden: int, gen: torch.Generator):
    return (
        torch.randn(inter, hidden, generator=gen),
        torch.randn(inter, hidden, generator=gen),
        torch.randn(hidden, inter, generator=gen),
    )


def test_experts_of_two_models_share_one_arena_and_are_addressed_by_slot():
    gen = torch.Generator().manual_seed(0)
    pool = WeightPool(torch.float32)
    pool.reserve(10)  # deliberately too small: growth must keep earlier offsets valid
    a = {(layer, e): _expert(12, 8, gen) for layer in range(2) for e in range(3)}
    b = {(0, e): _expert(20, 16, gen) for e in range(2)}
    for (layer, e), w in a.items():
        pool.add_expert("a", layer, e, *w)
    for (layer, e), w in b.items():
        pool.add_expert("b", layer, e, *w)
    for model, weights in (("a", a), ("b", b)):
        for (layer, e), (gate, up, down) in weights.items():
            slot = pool.expert_to_slot[(model, layer, e)]
            assert torch.equal(pool.w13(slot), torch.cat([gate, up]))
            assert torch.equal(pool.w2(slot), down)
            assert pool.w13(slot).untyped_storage().data_ptr() == pool.arena.untyped_storage().data_ptr()
    assert pool.model_bytes == {"a": 6 * 3 * 12 * 8 * 4, "b": 2 * 3 * 20 * 16 * 4}
    assert pool.used_bytes == sum(pool.model_bytes.values())
    assert pool.slots("b", 0, 2) == [6, 7]


def test_one_ffn_call_serves_tokens_of_two_models():
    gen = torch.Generator().manual_seed(1)
    pool = WeightPool(torch.float32)
    for e in range(4):
        pool.add_expert("a", 0, e, *_expert(12, 8, gen))
    for e in range(3):
        pool.add_expert("b", 0, e, *_expert(20, 16, gen))
    x = torch.zeros(5, 16)
    x[:3, :8] = torch.randn(3, 8, generator=gen)  # model a tokens (hidden 8)
    x[3:] = torch.randn(2, 16, generator=gen)  # model b tokens (hidden 16)
    ids = torch.tensor([[0, 2], [1, 3], [3, 0], [4, 6], [5, 4]])
    weights = torch.rand(5, 2, generator=gen)
    out = run_ffn(pool, x, ids, weights)
    t = pool.tables()
    ref = fused_moe_ref(x, ids, weights, pool.arena, t.w13_offset, t.w2_offset, t.hidden_size, t.inter_size)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.all(out[:3, 8:] == 0)
