"""The cross-model ops of the lockstep forward (models/lockstep.py) against each model's own forward.

Models of one residual stream whose KV views share one arena write their K/V with one indexed copy
per layer index (layers/attention/shared_kv.py) and rotate q/k of one head dim together (rows
stacked with each model's own cos/sin). Here four random decoders of hidden size 32 — head dims 8
and 16, 1 or 2 KV heads, default / llama3 / yarn rope, 1 to 3 layers, one partial-rotary model that
rotates alone, one with a sliding window — run prefills of different lengths and two decode steps on views
of one arena; every model's final hidden states and the whole arena must equal the per-model forward bit for
bit. In the decode steps the models of one attention shape and key length (a and e) share SDPA calls.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.attention.shared_kv import shares_arena
from crosspool_sgl.models.config import RopeConfig
from crosspool_sgl.models.decoder import DecoderModel
from crosspool_sgl.models.lockstep import LockstepBatch, ModelSlice, lockstep_forward
from tests.models.test_lockstep_streams import CPU, PT, VOCAB, random_model

ROPES = {
    "default": RopeConfig(theta=10000.0),
    "llama3": RopeConfig(
        500000.0,
        "llama3",
        {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8,
        },
    ),
    "yarn": RopeConfig(10000.0, "yarn", {"factor": 4.0, "original_max_position_embeddings": 8}),
}
# name, layers, KV heads, head dim, rope, rotary dim (None: the whole head), sliding window
SPECS = [
    ("a", 3, 1, 8, "default", None, None),
    ("b", 2, 2, 8, "llama3", None, None),
    ("c", 1, 1, 16, "yarn", None, None),
    ("d", 2, 1, 8, "default", 4, None),  # partial rotary: rotated on its own
    ("e", 2, 1, 8, "default", None, 3),  # a's attention shape: one SDPA call with a, own mask
]


def build(pool) -> list[DecoderModel]:
    models = []
    for name, layers, kv_heads, head_dim, rope, rotary_dim, window in SPECS:
        m = random_model(name, 32, layers, 1e-5, pool)
        cfg = dataclasses.replace(
            m.config,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope=ROPES[rope],
            rotary_dim=rotary_dim,
            sliding_windows=(window,) * layers,
        )
        for lw in m.weights.layers:
            lw.qkv_weight = torch.randn(cfg.q_size + 2 * cfg.kv_size, 32) * 0.3
            lw.o_weight = torch.randn(32, cfg.q_size) * 0.3
        models.append(DecoderModel(name, cfg, m.weights, pool, m.attn_backend, CPU))
    return models


def views(arena: torch.Tensor, models: list[DecoderModel]) -> list[torch.Tensor]:
    out = []
    for m in models:
        c = m.config
        page = c.num_layers * 2 * PT * c.num_kv_heads * c.head_dim
        out.append(
            arena[: arena.numel() // page * page].view(-1, c.num_layers, 2, PT, c.num_kv_heads, c.head_dim)
        )
    return out


# byte-disjoint pages per model (pages of 192, 256, 128, 128 and 128 floats)
PAGES = [[0, 1, 2], [4, 5], [20, 21], [30, 31], [40, 41]]


@pytest.mark.parametrize("threads", [1, 2])
def test_shared_write_and_rotation_equal_each_models_forward(monkeypatch, threads) -> None:
    """At one torch thread a and e share SDPA calls; at two each model attends alone (a larger
    batch can round differently there), and both equal the per-model forward bit for bit."""
    restore = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_against_each_models_forward(monkeypatch, threads)
    finally:
        torch.set_num_threads(restore)


def _check_against_each_models_forward(monkeypatch, threads: int) -> None:
    from crosspool_sgl.mem.weight_pool import WeightPool

    torch.manual_seed(7)
    pool = WeightPool(torch.float32, CPU)
    models = build(pool)
    arena, own_arena = torch.zeros(8192), torch.zeros(8192)
    kvs, own_kvs = views(arena, models), views(own_arena, models)
    assert shares_arena(kvs)
    prompts = [5, 3, 6, 2, 5]  # different lengths: the decode steps' keys span 1 or 2 pages
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])  # rows of the call
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    for step in range(3):  # a prefill, then two decode tokens
        new = prompts if step == 0 else [1] * len(models)
        starts = [0] * len(models) if step == 0 else [n + step - 1 for n in prompts]
        ids = [torch.randint(0, VOCAB, (n,)) for n in new]
        positions = [torch.arange(a, a + n) for a, n in zip(starts, new, strict=True)]
        batches = [([p], [a + n], [n]) for p, a, n in zip(PAGES, starts, new, strict=True)]
        metas = AttentionMetadata.build_many(batches, PT, CPU)
        slices = [ModelSlice.embed(m, ids[j], positions[j], metas[j], kvs[j]) for j, m in enumerate(models)]
        stream = LockstepBatch(list(slices)).streams[0]  # the shared write (and decode gather) run
        assert stream.kv_write is not None and (stream.kv_gather is not None) == (step > 0)
        calls.clear()
        got = lockstep_forward(slices)
        if step > 0:  # a and e attend together at layers 0 and 1: 10 model layers, 8 calls
            shared = 2 if threads == 1 else 0
            assert len(calls) == sum(m.config.num_layers for m in models) - shared, calls
        for j, m in enumerate(models):
            own = AttentionMetadata.build(*batches[j], PT, CPU)
            want = m.forward(ids[j], positions[j], own, own_kvs[j])
            assert torch.equal(got[j], want), (step, m.name)
        assert torch.equal(arena, own_arena), step
        assert arena.count_nonzero() > 0
