"""Decode attention (one query token per sequence) over a paged KV cache, with GQA and sliding window.

The KV pool hands layers a page table per sequence, never pool objects. `k_cache`/`v_cache` are
usually strided views (`kv[:, layer, 0]` of a [P, L, 2, PT, Hkv, D] arena), so the kernel takes
strides instead of requiring contiguous caches.

The query of sequence b sits at position i = seq_lens[b] - 1 and is already in the cache; it
attends keys j <= i, and with `sliding_window` W > 0 only i - W < j <= i (Hugging Face's
sliding-window mask).

Shape legend: B = sequences, Hq / Hkv = query / KV heads (G = Hq // Hkv query heads per KV head),
D = head dim, P = pages in the cache, PT = tokens per page, MP = max pages per sequence,
NS = key splits (flash-decoding: programs that each take a slice of the keys).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # the reference must work on machines without triton
    triton = None
    tl = None

    def _jit(fn: Callable[..., None]) -> Callable[..., None]:
        return fn  # a plain function; the wrapper raises before it could be launched


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


# `_jit` is `triton.jit`, or a no-op without triton (the string annotations come from the
# `__future__` import, so `tl.constexpr` needs no triton at import).
@_jit
def _paged_decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [P, PT, Hkv, D] strided
    v_ptr,  # [P, PT, Hkv, D] strided
    page_table_ptr,  # [B, MP]
    seq_lens_ptr,  # [B]
    o_ptr,  # [B, Hq, NS, D] float32 out: softmax-normalised output of each split
    lse_ptr,  # [B, Hq, NS] float32 out: log-sum-exp of each split's scores (-inf when empty)
    sm_scale,
    window,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_ptb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    PAGE_TOKENS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One (sequence, KV head, key split) program; its G query heads share every K/V load."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # first visible key
    per_split = tl.cdiv(tl.cdiv(seq_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)  # [BG]
    heads = kv_head * GROUP + offs_g  # [BG]
    mask_g = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BG, BD]

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)  # running max
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)  # running sum of exp
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)  # [BN] key positions
        mask_j = offs_j < hi
        page = tl.load(page_table_ptr + b * stride_ptb + offs_j // PAGE_TOKENS, mask=mask_j, other=0)
        page = page.to(tl.int64)  # [BN]
        in_page = offs_j % PAGE_TOKENS  # [BN]
        k_rows = page * stride_kp + in_page * stride_kt + kv_head * stride_kh  # [BN]
        k_mask = mask_d[:, None] & mask_j[None, :]
        k = tl.load(k_ptr + k_rows[None, :] + offs_d[:, None], mask=k_mask, other=0.0)  # [BD, BN]
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale  # [BG, BN]
        scores = tl.where(mask_j[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [BG], finite: j0 < hi
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])  # [BG, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_rows = page * stride_vp + in_page * stride_vt + kv_head * stride_vh  # [BN]
        v_mask = mask_j[:, None] & mask_d[None, :]
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=v_mask, other=0.0)  # [BN, BD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    o_rows = b * stride_ob + heads * stride_oh + split * stride_os  # [BG]; o's D is contiguous
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "paged_decode_attention needs triton, which is not installed; "
            "use the torch attention backend on this machine"
        )


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """Shape/dtype/stride/device checks (no device sync: seq_lens values are trusted)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, Hq, D] and k_cache [P, PT, Hkv, D], got {q.shape}, {k_cache.shape}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"need D equal and Hq % Hkv == 0; q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}"
        )
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"q/k/v must share one of fp32/fp16/bf16, got {q.dtype}/{k_cache.dtype}/{v_cache.dtype}"
        )
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head dim D of q, k_cache and v_cache must be contiguous (stride 1)")
    if page_table.dim() != 2 or page_table.shape[0] != batch or page_table.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"page_table must be int32/int64 [B={batch}, MP], got {page_table.dtype} {page_table.shape}"
        )
    if seq_lens.shape != (batch,) or seq_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"seq_lens must be int32/int64 [B={batch}], got {seq_lens.dtype} {seq_lens.shape}")
    if len({t.device for t in (q, k_cache, v_cache, page_table, seq_lens)}) != 1:
        raise ValueError("q, caches, page_table and seq_lens must be on one device")


# Untuned defaults (no GPU measurements yet): split the keys only while sequences x KV heads
# are too few to fill a GPU (an H100 has 132 SMs), in slices of at least one key block.
_BLOCK_N = 64
_TARGET_PROGRAMS = 256
_MAX_SPLITS = 16


def _num_splits(batch: int, num_kv_heads: int, max_keys: int) -> int:
    wanted = -(-_TARGET_PROGRAMS // max(1, batch * num_kv_heads))
    return max(1, min(wanted, -(-max_keys // _BLOCK_N), _MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    sliding_window: int = 0,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's last token over its cached keys; returns [B, Hq, D] in q's dtype.

    Preconditions not checked (they would need a device sync): 1 <= seq_lens[b] <= MP * PT and
    page ids in [0, P). `num_splits` overrides the key-split heuristic (tests use it).
    """
    _require_triton()
    _check_inputs(q, k_cache, v_cache, page_table, seq_lens)
    batch, num_q_heads, head_dim = q.shape
    page_tokens, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if batch == 0:
        return torch.empty_like(q)
    group = num_q_heads // num_kv_heads
    max_keys = page_table.shape[1] * page_tokens
    if sliding_window > 0:
        max_keys = min(max_keys, sliding_window)
    splits = num_splits if num_splits is not None else _num_splits(batch, num_kv_heads, max_keys)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")

    partial = torch.empty((batch, num_q_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, num_q_heads, splits), dtype=torch.float32, device=q.device)
    # tl.dot needs every dim >= 16 on GPUs; padded heads/dims are masked out.
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    _paged_decode_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, page_table, seq_lens, partial, lse, float(sm_scale), int(sliding_window),
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], page_table.stride(0),
        *partial.stride()[:3], *lse.stride()[:2],
        PAGE_TOKENS=page_tokens, GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_D=block_d,
        BLOCK_N=_BLOCK_N, NUM_SPLITS=splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return _combine_splits(partial, lse).to(q.dtype)


def _combine_splits(partial: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Merge per-split softmax outputs by their log-sum-exp weights; [B, Hq, NS, D] -> [B, Hq, D]."""
    if partial.shape[2] == 1:
        return partial[:, :, 0]
    weight = torch.exp(lse - lse.amax(dim=2, keepdim=True))  # [B, Hq, NS]; 0 for empty splits
    return (partial * weight[..., None]).sum(dim=2) / weight.sum(dim=2)[..., None]


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Float64 reference: gather each sequence's pages, mask, softmax; returns [B, Hq, D] float64."""
    batch, num_q_heads, head_dim = q.shape
    page_tokens, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros((batch, num_q_heads, head_dim), dtype=torch.float64, device=q.device)
    for b in range(batch):
        seq_len = int(seq_lens[b])
        pages = page_table[b, : math.ceil(seq_len / page_tokens)].long()
        k = k_cache[pages].reshape(-1, num_kv_heads, head_dim)[:seq_len].double()  # [L, Hkv, D]
        v = v_cache[pages].reshape(-1, num_kv_heads, head_dim)[:seq_len].double()  # [L, Hkv, D]
        k = k.repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v.repeat_interleave(group, dim=1)  # [L, Hq, D]
        scores = torch.einsum("hd,lhd->hl", q[b].double(), k) * sm_scale  # [Hq, L]
        pos = torch.arange(seq_len, device=q.device)  # [L]
        visible = pos <= seq_len - 1
        if sliding_window > 0:
            visible &= pos > seq_len - 1 - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), v)
    return out
