"""Each model's KV pages in its own geometry: an MLA page holds one latent, not K and V of every head.

DeepSeek-V3's tiny model and OLMoE's (MHA: 4 KV heads of 16) have the same hidden size (64) and
layer count (2). Per token and layer MLA stores kv_lora_rank + qk_rope_head_dim = 32 + 8 elements,
MHA 2 * 4 * 16 = 128, so the same pool bytes must hold 3.2x as many DeepSeek tokens.
"""

from __future__ import annotations

import torch

from crosspool_sgl.mem.kv_pool import KVGeometry, KVPool
from crosspool_sgl.models.config import load_model_config
from crosspool_sgl.runtime import _build_kv_pool
from crosspool_sgl.server_args import EngineArgs, KVPoolArgs, ModelSpec

POOL_BYTES = 4 << 20
CHUNK_BYTES = 64 << 10
PAGE_TOKENS = 16


def _tokens_that_fit(geometry: KVGeometry) -> int:
    """Tokens of one model a fresh pool of POOL_BYTES holds, by allocating until it says no."""
    pool = KVPool(POOL_BYTES, page_tokens=PAGE_TOKENS, chunk_bytes=CHUNK_BYTES)
    pool.add_model("m", geometry)
    pages = 0
    while pool.alloc("m", 1) is not None:
        pages += 1
    return pages * PAGE_TOKENS


def test_runtime_gives_each_model_its_own_page_geometry(tiny_models):
    names = ("deepseek_v3", "olmoe", "gpt_oss")
    configs = {n: load_model_config(tiny_models[n]) for n in names}
    args = EngineArgs(
        models=tuple(ModelSpec(n, str(tiny_models[n])) for n in names),
        kv_pool=KVPoolArgs(total_bytes=POOL_BYTES, page_tokens=PAGE_TOKENS, chunk_bytes=CHUNK_BYTES),
    )
    pool = _build_kv_pool(args, configs, torch.device("cpu"), torch.float32, 0)
    mla = configs["deepseek_v3"].mla
    assert pool.kv_view("deepseek_v3").shape[1:] == (
        2,
        1,
        PAGE_TOKENS,
        1,
        mla.kv_lora_rank + mla.qk_rope_head_dim,
    )
    assert pool.kv_view("olmoe").shape[1:] == (2, 2, PAGE_TOKENS, 4, 16)
    assert pool.page_bytes("deepseek_v3") == 2 * PAGE_TOKENS * (32 + 8) * 4
    assert pool.page_bytes("olmoe") == 2 * 2 * PAGE_TOKENS * 4 * 16 * 4
    assert pool.page_bytes("gpt_oss") == 2 * 2 * PAGE_TOKENS * 2 * 16 * 4  # GQA: 2 KV heads


def test_same_bytes_hold_proportionally_more_mla_tokens(tiny_models):
    geoms = {}
    for name in ("deepseek_v3", "olmoe"):
        cfg = load_model_config(tiny_models[name])
        assert cfg.hidden_size == 64 and cfg.num_layers == 2
        planes, heads, width = cfg.kv_layout
        geoms[name] = KVGeometry(cfg.num_layers, heads, width, torch.float32, num_planes=planes)
    mla_tokens, mha_tokens = _tokens_that_fit(geoms["deepseek_v3"]), _tokens_that_fit(geoms["olmoe"])
    expected = geoms["olmoe"].token_bytes() / geoms["deepseek_v3"].token_bytes()
    assert expected == 128 / 40
    # Pages straddling chunk edges are lost in both; with >= 16 pages per chunk that is < 7%.
    assert abs(mla_tokens / mha_tokens - expected) / expected < 0.07
    assert mla_tokens > 3 * mha_tokens
