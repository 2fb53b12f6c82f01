"""CUDA-graph replay of static-buffer decode against the eager path (skipped without CUDA).

- Every architecture (fp32 tiny models), Triton and torch attention: greedy tokens of graph
  replay equal eager ones, graphs were really captured and replayed (none fell back), across
  steps whose page tables change and whose widths cross buckets (recaptured lazily).
- FlashInfer's CUDA-graph decode wrappers (layers/attention/flashinfer_graph.py) inside a
  captured graph, replayed with new page tables and lengths, against the torch backend.

Not yet run on a GPU when written (no GPU was lent); launch/gpu_check.sh runs it.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from crosspool_sgl.core.static_decode import DecodeRow, ModelSlice, StaticDecodeRunner
from crosspool_sgl.layers.attention import AttentionMetadata, create_attention_backend
from tests.engine.static_decode_helpers import build_core, greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARCHS = (
    "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "llama", "qwen2", "qwen3",
    "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss",
)  # fmt: skip
NEW_TOKENS = 16


def _prompts(arch: str) -> list[tuple[str, list[int]]]:
    return [
        (arch, [3 + (11 * i + j) % 300 for j in range(4 + 9 * i)]) for i in range(3)
    ]  # 3 rows -> bucket 4


@pytest.fixture(scope="module", params=["triton", "torch"])
def core(request, tiny_models):
    return build_core({a: tiny_models[a] for a in ARCHS}, torch.device("cuda"), attention=request.param)


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_replay_greedy_equals_eager(core, arch):
    eager, eager_hidden = greedy(core, _prompts(arch), NEW_TOKENS)
    runner = StaticDecodeRunner(core.models, core.kv_pool, core.device, batch_buckets=(1, 2, 4), min_width=2)
    graphed, graph_hidden = greedy(core, _prompts(arch), NEW_TOKENS, runner)
    stats = runner.stats()
    assert stats["replays"] == NEW_TOKENS - 1 and stats["eager_steps"] == 0, stats
    assert not any(e.graph_failed for e in runner.entries.values())
    assert graphed == eager, f"{arch}: graph replay greedy tokens differ from eager"
    for a, b in zip(graph_hidden, eager_hidden, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_models_mixed_in_one_graph(core):
    prompts = [p for a in ("qwen3_moe", "llama", "deepseek_v3", "gpt_oss") for p in _prompts(a)[:2]]
    eager, _ = greedy(core, prompts, NEW_TOKENS)
    runner = StaticDecodeRunner(core.models, core.kv_pool, core.device, batch_buckets=(2, 4), min_width=4)
    graphed, _ = greedy(core, prompts, NEW_TOKENS, runner)
    assert runner.stats()["replays"] == NEW_TOKENS - 1
    assert graphed == eager


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="flashinfer not installed")
@pytest.mark.parametrize("window", [None, 24])
def test_flashinfer_graph_decode_matches_torch(window):
    from crosspool_sgl.layers.attention.flashinfer_graph import FlashInferGraphDecode

    dev, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    heads, kv_heads, dim, pt, num_pages, batch, width = 8, 2, 128, 16, 64, 4, 8
    cfg = SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, sliding_windows=[window])
    model = SimpleNamespace(
        name="m",
        config=cfg,
        scale=dim**-0.5,
        weights=SimpleNamespace(embed=torch.empty(1, dtype=torch.bfloat16)),
    )
    attn = FlashInferGraphDecode(create_attention_backend(dev, "flashinfer"), model, batch, width, pt)
    kv = torch.randn(num_pages, 1, 2, pt, kv_heads, dim, generator=gen).bfloat16().to(dev)
    sl = ModelSlice(model, kv, num_pages - 1, batch, width)
    q = torch.zeros(batch, heads, dim, dtype=torch.bfloat16, device=dev)
    k, v = torch.zeros_like(q[:, :kv_heads]), torch.zeros_like(q[:, :kv_heads])
    sl.fill([])
    attn.plan(*sl.fill([]))
    graph = torch.cuda.CUDAGraph()
    out = attn.forward(q, k, v, kv, 0, sl.meta, model.scale, window)  # warm-up (JIT) outside the graph
    with torch.cuda.graph(graph):
        out = attn.forward(q, k, v, kv, 0, sl.meta, model.scale, window)
    ref_backend = create_attention_backend(dev, "torch")
    for trial in range(3):  # new page tables and lengths each replay; 3 rows in a bucket of 4
        perm = torch.randperm(num_pages - 1, generator=gen).tolist()
        lens = [37 + 20 * trial, 5, 70 - 9 * trial]
        rows = [DecodeRow(0, n - 1, perm[8 * i : 8 * i + -(-n // pt)]) for i, n in enumerate(lens)]
        attn.plan(*sl.fill(rows))
        q.copy_(torch.randn(batch, heads, dim, generator=gen).bfloat16())
        k.copy_(torch.randn(batch, kv_heads, dim, generator=gen).bfloat16())
        v.copy_(torch.randn(batch, kv_heads, dim, generator=gen).bfloat16())
        kv_ref = kv.clone()
        graph.replay()
        meta = AttentionMetadata.build([list(r.pages) for r in rows], lens, [1, 1, 1], pt, dev)
        ref = ref_backend.forward(q[:3], k[:3], v[:3], kv_ref, 0, meta, model.scale, window)
        torch.testing.assert_close(out[:3].float(), ref.float(), atol=2e-2, rtol=2e-2)
