"""GPU paths of the issue-13 families (skipped without CUDA).

- FlashInfer's MLA paged kernel (one-plane latent views) and the Triton backend against the
  torch backend, with DeepSeek's real latent widths (kv_lora_rank 512, qk_rope_head_dim 64),
  prefill and decode; sinks (routed to torch by both GPU backends) likewise.
- fused_moe's biases and clamped SwiGLU compiled on CUDA, bf16 included.

None of this has run yet: no GPU was lent while it was written.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.attention.selector import create_attention_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RANK, ROPE, HEADS, PAGE_TOKENS, LAYERS = 512, 64, 16, 16, 2


def _batch(decode: bool, dev: torch.device, gen: torch.Generator):
    seq_lens = [37, 5, 70]
    extend = [1, 1, 1] if decode else [9, 5, 30]
    num_pages = 64
    perm = torch.randperm(num_pages, generator=gen).tolist()
    pages, start = [], 0
    for n in seq_lens:
        k = -(-n // PAGE_TOKENS)
        pages.append(perm[start : start + k])
        start += k
    return AttentionMetadata.build(pages, seq_lens, extend, PAGE_TOKENS, dev), sum(extend), num_pages


def _skip_unless_importable(name: str) -> None:
    if name == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        pytest.skip("flashinfer not installed")


@pytest.mark.parametrize("name", ["flashinfer", "triton"])
@pytest.mark.parametrize("decode", [False, True])
def test_mla_latent_attention_matches_torch(name: str, decode: bool) -> None:
    _skip_unless_importable(name)
    dev, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    meta, tokens, num_pages = _batch(decode, dev, gen)
    kv_a = torch.randn(num_pages, LAYERS, 1, PAGE_TOKENS, 1, RANK + ROPE, generator=gen).half().to(dev)
    kv_b = kv_a.clone()
    q = torch.randn(tokens, HEADS, RANK + ROPE, generator=gen).half().to(dev)
    latent = torch.randn(tokens, 1, RANK + ROPE, generator=gen).half().to(dev)
    scale = (128 + ROPE) ** -0.5
    ref, other = create_attention_backend(dev, "torch"), create_attention_backend(dev, name)
    ref.init_forward(meta)
    other.init_forward(meta)
    want = ref.forward(q, latent, None, kv_a, 1, meta, scale, None, value_dim=RANK)
    got = other.forward(q, latent, None, kv_b, 1, meta, scale, None, value_dim=RANK)
    assert got.shape == (tokens, HEADS, RANK)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(kv_b, kv_a)  # both wrote the same latents


@pytest.mark.parametrize("name", ["flashinfer", "triton"])
@pytest.mark.parametrize("window", [None, 16])
def test_sinks_match_torch(name: str, window: int | None) -> None:
    _skip_unless_importable(name)
    dev, gen = torch.device("cuda"), torch.Generator().manual_seed(1)
    meta, tokens, num_pages = _batch(True, dev, gen)
    kv = torch.randn(num_pages, LAYERS, 2, PAGE_TOKENS, 2, 64, generator=gen).half().to(dev)
    q = torch.randn(tokens, 8, 64, generator=gen).half().to(dev)
    k, v = (torch.randn(tokens, 2, 64, generator=gen).half().to(dev) for _ in range(2))
    sinks = torch.randn(8, generator=gen).to(dev)
    ref, other = create_attention_backend(dev, "torch"), create_attention_backend(dev, name)
    ref.init_forward(meta)
    other.init_forward(meta)
    want = ref.forward(q, k, v, kv.clone(), 0, meta, 0.125, window, sinks=sinks)
    got = other.forward(q, k, v, kv.clone(), 0, meta, 0.125, window, sinks=sinks)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_moe_extras_on_cuda(dtype: torch.dtype) -> None:
    if _interpreter_on():  # tests/kernels/conftest.py turned it on for this process
        pytest.skip("Triton's interpreter is on here; test_extras_in_a_compiled_process runs this")
    from kernels.fused_moe import fused_moe
    from tests.kernels.test_fused_moe_extras import check_extras

    torch.manual_seed(3)
    check_extras(fused_moe, dtype, device="cuda")


def test_extras_in_a_compiled_process() -> None:
    if not _interpreter_on():
        pytest.skip("the cases run compiled in this process")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"{__file__}::test_fused_moe_extras_on_cuda",
    ]
    proc = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
