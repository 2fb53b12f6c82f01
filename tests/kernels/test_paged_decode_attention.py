"""paged_decode_attention (Triton, interpreted here) against the float64 reference, and the
reference against torch's SDPA with a Hugging Face-style sliding-window mask.

Shape legend: B = sequences, Hq / Hkv = query / KV heads, D = head dim, P = pages,
PT = tokens per page, L = layers of the KV arena, MP = max pages per sequence.
The `check_*` helper takes a device so tests/gpu/test_kernels_gpu.py reruns it compiled on CUDA.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import kernels.paged_decode_attention as attention_module
from kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref

# Max |out - ref| / max |ref|.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}
LAYER = 1  # of NUM_LAYERS in the arena: the caches are strided views into it
NUM_LAYERS = 3
NO_TRITON = pytest.mark.skipif(attention_module.triton is None, reason="triton is not installed")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


@dataclass
class PagedBatch:
    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [P, PT, Hkv, D] view of kv[:, LAYER, 0]
    v_cache: torch.Tensor  # [P, PT, Hkv, D] view of kv[:, LAYER, 1]
    page_table: torch.Tensor  # [B, MP] int32
    seq_lens: torch.Tensor  # [B] int32


def build_batch(
    seq_lens: list[int],
    page_tokens: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
) -> PagedBatch:
    """Sequences on shuffled, disjoint pages of a [P, L, 2, PT, Hkv, D] arena.

    What the kernel must never read is NaN: the cache slots past each sequence's last token,
    the page-table entries past its last page (they point at an all-NaN page) and the unused pages.
    """
    pages_needed = [math.ceil(n / page_tokens) for n in seq_lens]
    num_pages = sum(pages_needed) + 3  # + the poison page and two unused ones
    kv = torch.randn(num_pages, NUM_LAYERS, 2, page_tokens, num_kv_heads, head_dim)
    order = torch.randperm(num_pages).tolist()
    poison, free = order[0], order[1:]
    kv[poison] = float("nan")
    max_pages = max(pages_needed) + 1
    page_table = torch.full((len(seq_lens), max_pages), poison, dtype=torch.int32)
    for b, (seq_len, n_pages) in enumerate(zip(seq_lens, pages_needed, strict=True)):
        pages, free = free[:n_pages], free[n_pages:]
        page_table[b, :n_pages] = torch.tensor(pages, dtype=torch.int32)
        kv[pages[-1], LAYER, :, seq_len - (n_pages - 1) * page_tokens :] = float("nan")  # past the last token
    for page in free:
        kv[page] = float("nan")
    kv = kv.to(dtype=dtype, device=device)
    return PagedBatch(
        q=torch.randn(len(seq_lens), num_kv_heads * group, head_dim).to(dtype=dtype, device=device),
        k_cache=kv[:, LAYER, 0],
        v_cache=kv[:, LAYER, 1],
        page_table=page_table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


def check_paged_decode_attention(
    seq_lens: list[int],
    page_tokens: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    sliding_window: int,
    num_splits: int | None,
    dtype: torch.dtype,
    device: str = "cpu",
) -> None:
    """The kernel matches the float64 reference on a fresh random batch."""
    batch = build_batch(seq_lens, page_tokens, num_kv_heads, group, head_dim, dtype, device)
    assert not batch.k_cache.is_contiguous()
    args = (batch.q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, head_dim**-0.5)
    ref = paged_decode_attention_ref(*args, sliding_window)  # [B, Hq, D] float64
    out = paged_decode_attention(*args, sliding_window, num_splits=num_splits)  # [B, Hq, D]
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert not out.isnan().any()
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


# Lengths: a lone query token, exactly one page, not multiples of the page size.
SEQ_LENS = [1, 8, 13, 22]


@NO_TRITON
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("sliding_window", [0, 5])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_small_pages(dtype: torch.dtype, group: int, sliding_window: int, num_splits: int | None) -> None:
    torch.manual_seed(group * 10 + sliding_window)
    check_paged_decode_attention(SEQ_LENS, 4, 2, group, 16, sliding_window, num_splits, dtype)


@NO_TRITON
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliding_window", [0, 1, 100, 1000])
def test_long_sequences(dtype: torch.dtype, sliding_window: int) -> None:
    """Several key blocks per split, a head dim that is not a power of two, windows from 1 to > L."""
    torch.manual_seed(sliding_window)
    check_paged_decode_attention([150, 3, 97], 16, 1, 4, 24, sliding_window, 2, dtype)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("sliding_window", [0, 3])
def test_reference_matches_sdpa(group: int, sliding_window: int) -> None:
    """The reference agrees with SDPA over contiguous K/V and HF's sliding-window mask rule."""
    torch.manual_seed(5)
    batch = build_batch([9, 1, 6], 4, 2, group, 8, torch.float64, "cpu")
    ref = paged_decode_attention_ref(
        batch.q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, 0.3, sliding_window
    )
    for b, seq_len in enumerate(batch.seq_lens.tolist()):
        pages = batch.page_table[b].long()
        k = batch.k_cache[pages].flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, L, D]
        v = batch.v_cache[pages].flatten(0, 1)[:seq_len].transpose(0, 1)  # [Hkv, L, D]
        # HF: key j is visible from query i when j <= i and (no window or i - j < window).
        i, j = seq_len - 1, torch.arange(seq_len)
        visible = (j <= i) & ((i - j < sliding_window) if sliding_window > 0 else True)
        expected = F.scaled_dot_product_attention(
            batch.q[b, :, None], k, v, attn_mask=visible[None, None], scale=0.3, enable_gqa=True
        )  # [Hq, 1, D]
        torch.testing.assert_close(ref[b], expected[:, 0], rtol=1e-10, atol=1e-10)


@NO_TRITON
def test_rejects_bad_inputs() -> None:
    batch = build_batch([5], 4, 2, 2, 16, torch.float32, "cpu")
    args = (batch.q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, 0.25)
    with pytest.raises(TypeError):
        paged_decode_attention(batch.q.half(), *args[1:])
    with pytest.raises(ValueError, match="Hq % Hkv"):
        paged_decode_attention(batch.q[:, :3], *args[1:])
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(*args[:4], batch.seq_lens.repeat(2), 0.25)
    with pytest.raises(ValueError, match="contiguous"):
        paged_decode_attention(batch.q.transpose(1, 2).contiguous().transpose(1, 2), *args[1:])


def test_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module imports and its reference works without triton; the wrapper raises clearly."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("attention_without_triton", attention_module.__file__)
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    batch = build_batch([5], 4, 2, 2, 16, torch.float32, "cpu")
    args = (batch.q, batch.k_cache, batch.v_cache, batch.page_table, batch.seq_lens, 0.25)
    assert not module.paged_decode_attention_ref(*args).isnan().any()
    with pytest.raises(RuntimeError, match="triton"):
        module.paged_decode_attention(*args)
