"""FlashInfer and Triton attention backends against the torch backend on a real GPU (skipped on CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.attention.selector import create_attention_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["flashinfer", "triton"])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("decode", [False, True])
def test_backend_matches_torch(name, window, decode):
    if name == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        pytest.skip("flashinfer not installed")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    num_pages, layers, pt, hq, hkv, d = 64, 2, 16, 8, 2, 64
    kv_a = torch.randn(num_pages, layers, 2, pt, hkv, d, generator=gen, dtype=torch.float16).to(dev)
    kv_b = kv_a.clone()
    seq_lens = [37, 5, 70]
    extend = [1, 1, 1] if decode else [9, 5, 30]
    perm = torch.randperm(num_pages, generator=gen).tolist()
    pages, start = [], 0
    for n in seq_lens:
        k = -(-n // pt)
        pages.append(perm[start : start + k])
        start += k
    meta = AttentionMetadata.build(pages, seq_lens, extend, pt, dev)
    t = sum(extend)
    q = torch.randn(t, hq, d, generator=gen, dtype=torch.float16).to(dev)
    k = torch.randn(t, hkv, d, generator=gen, dtype=torch.float16).to(dev)
    v = torch.randn(t, hkv, d, generator=gen, dtype=torch.float16).to(dev)
    ref = create_attention_backend(dev, "torch")
    other = create_attention_backend(dev, name)
    ref.init_forward(meta)
    other.init_forward(meta)
    want = ref.forward(q, k, v, kv_a, 1, meta, d**-0.5, window)
    got = other.forward(q, k, v, kv_b, 1, meta, d**-0.5, window)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)
