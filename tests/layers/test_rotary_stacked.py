"""rotary.stacked_tables / rotate_halves: rows of several rotaries stacked (model, token, head) get,
bit for bit, the cos/sin and rotation each model's own `RotaryEmbedding.rotate` gives them."""

from __future__ import annotations

import torch

from crosspool_sgl.layers.plan_cache import PlanCache
from crosspool_sgl.layers.rotary import RotaryEmbedding, rotate_halves, stacked_tables
from crosspool_sgl.models.config import RopeConfig

CPU = torch.device("cpu")
ROPES = [
    RopeConfig(10000.0),
    RopeConfig(1e6),
    RopeConfig(10000.0, "yarn", {"factor": 4.0, "original_max_position_embeddings": 16}),
    RopeConfig(10000.0, "linear", {"factor": 2.0}),
]


def test_stacked_rows_rotate_as_each_model_does() -> None:
    torch.manual_seed(3)
    rotaries = [RotaryEmbedding(rope, 16, CPU) for rope in ROPES]
    positions = [torch.tensor([7]), torch.arange(3, 6), torch.tensor([40]), torch.tensor([0, 9])]
    heads = [6, 3, 5, 4]
    xs = [torch.randn(p.shape[0], h, 16) for p, h in zip(positions, heads, strict=True)]
    cos, sin = stacked_tables(rotaries, positions, heads, torch.float32)
    got = rotate_halves(torch.cat([x.reshape(-1, 16) for x in xs]), cos, sin)
    want = torch.cat(
        [r.rotate(p, x).reshape(-1, 16) for r, p, x in zip(rotaries, positions, xs, strict=True)]
    )
    assert torch.equal(got, want)
    plans = PlanCache()
    for _ in range(2):  # built, then the cached layout: the same values
        again = stacked_tables(rotaries, positions, heads, torch.float32, plans)
        assert torch.equal(again[0], cos) and torch.equal(again[1], sin)
    assert len(plans) == 1
