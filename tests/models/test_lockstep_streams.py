"""Lockstep residual streams (models/lockstep.py) with models of different hidden sizes and depths.

The tiny checkpoints all have hidden size 64, so here random decoders of widths 32, 32 and 48
(1, 2 and 3 layers; one stream of two models, one of one) run in one lockstep batch — a prefill
chunk, then a decode step — and each model's final hidden states must equal its own
`DecoderModel.forward` bit for bit, with the same K/V written.
"""

from __future__ import annotations

import torch

from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend
from crosspool_sgl.mem.weight_pool import WeightPool
from crosspool_sgl.models.config import ModelConfig, RopeConfig
from crosspool_sgl.models.decoder import DecoderModel, LayerWeights, ModelWeights
from crosspool_sgl.models.lockstep import ModelSlice, lockstep_forward

PT, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 4, 2, 1, 8, 16, 40
CPU = torch.device("cpu")


def random_model(name: str, hidden: int, layers: int, eps: float, pool: WeightPool) -> DecoderModel:
    cfg = ModelConfig(
        "llama", VOCAB, hidden, layers, HEADS, KV_HEADS, HEAD_DIM, eps, RopeConfig(theta=10000.0), 128,
        False, False, False, "none", None, (None,) * layers, (False,) * layers, INTER,
    )  # fmt: skip

    def rnd(*shape):
        return torch.randn(*shape) * 0.3

    pool.reserve(layers * 3 * INTER * hidden)
    lws = [
        LayerWeights(
            input_norm=1 + rnd(hidden),
            post_norm=1 + rnd(hidden),
            qkv_weight=rnd(cfg.q_size + 2 * cfg.kv_size, hidden),
            qkv_bias=None,
            o_weight=rnd(hidden, cfg.q_size),
            o_bias=None,
            q_norm=None,
            k_norm=None,
            router=None,
            ffn_slots=torch.tensor(
                [pool.add_expert(name, i, 0, rnd(INTER, hidden), rnd(INTER, hidden), rnd(hidden, INTER))]
            ),
        )  # fmt: skip
        for i in range(layers)
    ]
    weights = ModelWeights(rnd(VOCAB, hidden), 1 + rnd(hidden), rnd(VOCAB, hidden), lws)
    return DecoderModel(name, cfg, weights, pool, TorchAttentionBackend(), CPU)


def test_streams_of_different_widths_equal_each_models_forward() -> None:
    torch.manual_seed(5)
    pool = WeightPool(torch.float32, CPU)
    models = [random_model("a", 32, 1, 1e-6, pool), random_model("b", 48, 3, 1e-5, pool)]
    models.append(random_model("c", 32, 2, 1e-5, pool))
    kvs = [torch.zeros(6, m.config.num_layers, 2, PT, KV_HEADS, HEAD_DIM) for m in models]
    own_kvs = [kv.clone() for kv in kvs]
    pages = [[1, 3], [2, 5], [4, 0]]
    for step, (start, new) in enumerate([(0, 5), (5, 1)]):  # a 5-token prefill, then one decode token
        meta = [AttentionMetadata.build([pages[j]], [start + new], [new], PT, CPU) for j in range(3)]
        ids = [torch.randint(0, VOCAB, (new,)) for _ in models]
        positions = torch.arange(start, start + new)
        slices = [ModelSlice.embed(m, ids[j], positions, meta[j], kvs[j]) for j, m in enumerate(models)]
        got = lockstep_forward(slices)
        for j, m in enumerate(models):
            own = AttentionMetadata.build([pages[j]], [start + new], [new], PT, CPU)
            want = m.forward(ids[j], positions, own, own_kvs[j])
            assert torch.equal(got[j], want), (step, m.name)
            assert torch.equal(kvs[j], own_kvs[j]), (step, m.name)
