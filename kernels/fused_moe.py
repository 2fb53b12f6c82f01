"""Fused MoE over the shared weights-pool arena: one launch serves tokens of several models.

Every expert of every model lives in one 1-D `arena`; an expert *slot* `s` is found through
tables rather than through a per-model weight tensor, so tokens of models with different
hidden/intermediate sizes can share a launch:

    w13_offset[s]  element offset of a row-major [2*I_s, H_s] matrix: rows [0, I_s) gate, [I_s, 2*I_s) up
    w2_offset[s]   element offset of a row-major [H_s, I_s] down projection
    hidden_size[s] = H_s, inter_size[s] = I_s

    out[t] = sum_k topk_weights[t, k] * (W2_s @ act_s(Wg_s @ x_t + bg_s, Wu_s @ x_t + bu_s) + b2_s),
             s = topk_ids[t, k]

A negative `topk_ids[t, k]` is padding: that pair adds nothing (so one launch can carry models
with different K, each row padded to the widest).

Optional per-slot tables (keyword arguments, all four or none; without them every slot is
act = silu(g) * u with no biases) carry what gpt-oss and friends need:

    bias_offset[s]  -1, or the offset of [bg_s (I) | bu_s (I) | b2_s (H)] in the arena
    act_kind[s]     ACT_SILU: silu(g) * u;
                    ACT_SWIGLU_CLAMPED: g' = min(g, limit), u' = clamp(u, -limit, limit),
                    (u' + 1) * g' * sigmoid(alpha * g')   (gpt-oss)
    act_alpha[s], act_limit[s]  float32

Shape legend: T = tokens, K = top-k, Hmax = padded hidden width of `hidden_states`,
H / I = hidden / intermediate size of one slot, S = slots in the tables, P = T*K (token, k) pairs,
NB = blocks of BLOCK_M pairs after alignment, Imax = largest I among the slots in use.

Three entry points with one signature: `fused_moe` (Triton), `fused_moe_torch` (CPU serving
path) and `fused_moe_ref` (float64, for tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import moe_gather
from kernels.moe_gather import class_keys, group_ffn, shape_groups

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # the torch paths must work on machines without triton
    triton = None
    tl = None

    def _jit(fn: Callable[..., None]) -> Callable[..., None]:
        return fn  # a plain function; the wrapper raises before it could be launched


ACT_SILU = 0
ACT_SWIGLU_CLAMPED = 1
_ARENA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------
# Triton kernels. `_jit` is `triton.jit`, or a no-op without triton; `from __future__ import
# annotations` keeps the `tl.constexpr` hints as strings (which triton accepts) so this imports.
# --------------------------------------------------------------------------------------------


@_jit
def _gate_up_kernel(
    x_ptr,  # [T, Hmax] hidden states
    arena_ptr,  # [arena elements]
    inter_ptr,  # [NB * BLOCK_M, Imax] out: silu(gate) * up per aligned pair
    w13_offset_ptr,  # [S] int64
    hidden_size_ptr,  # [S] int32
    inter_size_ptr,  # [S] int32
    sorted_pair_ids_ptr,  # [NB * BLOCK_M] int32, P marks padding
    block_slot_ptr,  # [NB] int32, -1 past the last used block
    bias_offset_ptr,  # [S] int64 (read only if HAS_EXTRAS)
    act_kind_ptr,  # [S] int32
    act_alpha_ptr,  # [S] float32
    act_limit_ptr,  # [S] float32
    num_pairs,
    top_k,
    stride_xt,
    stride_xh,
    stride_it,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_EXTRAS: tl.constexpr,
):
    """One (block of pairs, tile of I) program: gate and up tiles share the loads of x."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    hidden = tl.load(hidden_size_ptr + slot)
    inter = tl.load(inter_size_ptr + slot)
    if pid_n * BLOCK_N >= inter:  # this slot's I is narrower than Imax
        return
    w13 = tl.load(w13_offset_ptr + slot)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    pair = tl.load(sorted_pair_ids_ptr + offs_m)  # [BM]
    valid_m = pair < num_pairs
    token = (pair // top_k).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < inter
    gate_rows = w13 + offs_n.to(tl.int64) * hidden  # [BN] row starts of the gate block
    up_rows = gate_rows + inter * hidden  # [BN] the up block follows the gate block

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < hidden
        x = tl.load(
            x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh,
            mask=valid_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BM, BK]
        w_mask = mask_k[:, None] & mask_n[None, :]
        w_gate = tl.load(arena_ptr + gate_rows[None, :] + offs_k[:, None], mask=w_mask, other=0.0)  # [BK, BN]
        w_up = tl.load(arena_ptr + up_rows[None, :] + offs_k[:, None], mask=w_mask, other=0.0)  # [BK, BN]
        acc_gate += tl.dot(x, w_gate, input_precision=DOT_PRECISION)
        acc_up += tl.dot(x, w_up, input_precision=DOT_PRECISION)

    if HAS_EXTRAS:
        bias = tl.load(bias_offset_ptr + slot)  # -1: none, so every bias load below is masked off
        has_bias = mask_n & ((offs_n * 0 + bias) >= 0)  # [BN]; a scalar & tensor mask trips the interpreter
        acc_gate += tl.load(arena_ptr + bias + offs_n, mask=has_bias, other=0.0).to(tl.float32)[None, :]
        acc_up += tl.load(arena_ptr + bias + inter + offs_n, mask=has_bias, other=0.0).to(tl.float32)[None, :]
        alpha = tl.load(act_alpha_ptr + slot)
        limit = tl.load(act_limit_ptr + slot)
        g = tl.minimum(acc_gate, limit)
        u = tl.minimum(tl.maximum(acc_up, -limit), limit)
        clamped = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))  # gpt-oss's clamped SwiGLU
        silu = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        act = tl.where(tl.load(act_kind_ptr + slot) == 1, clamped, silu)  # [BM, BN]
    else:
        act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up, [BM, BN]
    out_ptrs = inter_ptr + offs_m.to(tl.int64)[:, None] * stride_it + offs_n[None, :]
    tl.store(out_ptrs, act.to(inter_ptr.dtype.element_ty), mask=valid_m[:, None] & mask_n[None, :])


@_jit
def _down_kernel(
    inter_ptr,  # [NB * BLOCK_M, Imax]
    arena_ptr,  # [arena elements]
    out_ptr,  # [P, Hmax] float32 out: routing-weighted expert output per pair
    topk_weights_ptr,  # [P] float32
    w2_offset_ptr,  # [S] int64
    hidden_size_ptr,  # [S] int32
    inter_size_ptr,  # [S] int32
    sorted_pair_ids_ptr,  # [NB * BLOCK_M] int32
    block_slot_ptr,  # [NB] int32
    bias_offset_ptr,  # [S] int64 (read only if HAS_EXTRAS)
    num_pairs,
    stride_it,
    stride_ot,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_EXTRAS: tl.constexpr,
):
    """One (block of pairs, tile of H) program of the down projection, scaled by the routing weight."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot < 0:
        return
    hidden = tl.load(hidden_size_ptr + slot)
    inter = tl.load(inter_size_ptr + slot)
    if pid_n * BLOCK_N >= hidden:  # this slot's H is narrower than Hmax
        return
    w2 = tl.load(w2_offset_ptr + slot)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    pair = tl.load(sorted_pair_ids_ptr + offs_m)  # [BM]
    valid_m = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_n = offs_n < hidden
    w2_rows = w2 + offs_n.to(tl.int64) * inter  # [BN]
    a_rows = offs_m.to(tl.int64) * stride_it  # [BM]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        mask_k = offs_k < inter
        a_mask = valid_m[:, None] & mask_k[None, :]  # padding rows were never written
        a = tl.load(inter_ptr + a_rows[:, None] + offs_k[None, :], mask=a_mask, other=0.0)  # [BM, BK]
        w = tl.load(
            arena_ptr + w2_rows[None, :] + offs_k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )  # [BK, BN]
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)

    if HAS_EXTRAS:  # the down bias is part of the expert's output, so it is weighted too
        bias = tl.load(bias_offset_ptr + slot)
        b2 = tl.load(
            arena_ptr + bias + 2 * inter + offs_n, mask=mask_n & ((offs_n * 0 + bias) >= 0), other=0.0
        )  # [BN]
        acc += b2.to(tl.float32)[None, :]
    weight = tl.load(topk_weights_ptr + pair, mask=valid_m, other=0.0)  # [BM]
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=valid_m[:, None] & mask_n[None, :])


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError(
            "fused_moe needs triton, which is not installed; use fused_moe_torch on this machine"
        )


# --------------------------------------------------------------------------------------------
# Alignment and checks (torch)
# --------------------------------------------------------------------------------------------


def align_pairs_to_slots(
    topk_ids: torch.Tensor, num_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, k) pairs by slot, each group padded to a multiple of `block_m`.

    Returns `sorted_pair_ids` [NB * block_m] int32 (pair id t*K + k; P marks padding) and
    `block_slot` [NB] int32 (the slot of each block; -1 for unused trailing blocks). NB is an
    upper bound known without reading the ids back to the host: every used slot wastes at most
    one partially filled block, so NB = cdiv(P, block_m) + min(P, S + 1). Pairs with a negative
    id (padding) are grouped under a sentinel slot S whose blocks get -1: no program runs them,
    so their rows of the per-pair output stay 0.
    """
    num_pairs = topk_ids.numel()
    flat = topk_ids.reshape(-1).long()  # [P]
    flat = torch.where(flat < 0, num_slots, flat)  # padding pairs go to a sentinel slot S, sorted last
    device = flat.device
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=device)  # [S + 1]
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync on CUDA
    blocks_per_slot = (counts + block_m - 1) // block_m  # [S]
    block_end = torch.cumsum(blocks_per_slot, 0)  # [S + 1]
    pair_start = torch.cumsum(counts, 0) - counts  # [S + 1] first sorted position of each slot

    order = torch.argsort(flat, stable=True)  # [P] pair ids grouped by slot
    sorted_slot = flat[order]  # [P]
    rank = torch.arange(num_pairs, device=device) - pair_start[sorted_slot]  # [P] rank inside its slot
    dest = (block_end - blocks_per_slot)[sorted_slot] * block_m + rank  # [P] padded position

    num_blocks = -(-num_pairs // block_m) + min(num_pairs, num_slots + 1)
    sorted_pair_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[dest] = order.to(torch.int32)
    block_ids = torch.arange(num_blocks, device=device)
    block_slot = torch.searchsorted(block_end, block_ids, right=True)  # [NB]; >= S: padding or unused
    block_slot = torch.where(block_slot < num_slots, block_slot, -1).to(torch.int32)
    return sorted_pair_ids, block_slot


def _check_inputs(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    arena: torch.Tensor,
    w13_offset: torch.Tensor,
    w2_offset: torch.Tensor,
    hidden_size: torch.Tensor,
    inter_size: torch.Tensor,
) -> None:
    """Shape/dtype/device checks shared by the Triton and torch paths (no device sync)."""
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be [T, Hmax], got {tuple(hidden_states.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"topk_ids must be [T, K] with T={hidden_states.shape[0]}, got {tuple(topk_ids.shape)}"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} != topk_ids {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in _INDEX_DTYPES or not topk_weights.is_floating_point():
        raise TypeError(
            f"topk_ids must be int32/int64 ({topk_ids.dtype}), topk_weights float ({topk_weights.dtype})"
        )
    if arena.dim() != 1 or not arena.is_contiguous() or arena.dtype not in _ARENA_DTYPES:
        raise ValueError(
            f"arena must be a contiguous 1-D fp32/fp16/bf16 tensor, got {arena.dtype} {arena.shape}"
        )
    if hidden_states.dtype != arena.dtype:
        raise TypeError(f"hidden_states dtype {hidden_states.dtype} != arena dtype {arena.dtype}")
    tables = {
        "w13_offset": w13_offset,
        "w2_offset": w2_offset,
        "hidden_size": hidden_size,
        "inter_size": inter_size,
    }
    num_slots = w13_offset.shape[0] if w13_offset.dim() == 1 else -1
    for name, table in tables.items():
        if table.dim() != 1 or table.shape[0] != num_slots or table.dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"{name} must be an int32/int64 [S] table like w13_offset, got {table.dtype} {table.shape}"
            )
    tensors = [hidden_states, topk_ids, topk_weights, arena, *tables.values()]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted({str(t.device) for t in tensors})}")


def _check_used_slots(
    topk_ids: torch.Tensor,
    arena: torch.Tensor,
    hidden_states: torch.Tensor,
    w13_offset: torch.Tensor,
    w2_offset: torch.Tensor,
    hidden_size: torch.Tensor,
    inter_size: torch.Tensor,
    bias_offset: torch.Tensor | None = None,
) -> int:
    """Bounds-check the slots in use (the kernels would read out of bounds); returns their max I.

    This is the wrapper's one device->host sync: Imax sizes the intermediate buffer and the grid.
    """
    num_slots = w13_offset.shape[0]
    ids = topk_ids.reshape(-1).long()  # [P]
    real = ids >= 0  # negative ids are padding and read nothing
    ids = torch.where(real, ids, ids.max())  # padding takes the stats of a real pair (or of none)
    safe = ids.clamp(0, num_slots - 1)  # gather safely; out-of-range ids are reported below
    h = hidden_size[safe].long()  # [P]
    i = inter_size[safe].long()  # [P]
    ends = torch.maximum(w13_offset[safe] + 2 * i * h, w2_offset[safe] + h * i)  # [P]
    if bias_offset is not None:
        b = bias_offset[safe]  # [P]
        ends = torch.maximum(ends, torch.where(b >= 0, b + 2 * i + h, 0))
    starts = torch.minimum(w13_offset[safe], w2_offset[safe])  # [P]
    stats = torch.stack((ids.min(), ids.max(), i.min(), i.max(), h.min(), h.max(), starts.min(), ends.max()))
    min_id, max_id, min_i, max_i, min_h, max_h, min_start, max_end = stats.tolist()
    if max_id < 0:  # every pair is padding
        return 1
    if max_id >= num_slots:
        raise IndexError(f"topk_ids outside [0, {num_slots}): [{min_id}, {max_id}]")
    if min_h <= 0 or min_i <= 0 or min_start < 0:
        raise ValueError("slots in use must have positive sizes and non-negative offsets")
    if max_h > hidden_states.shape[1]:
        raise ValueError(f"a routed slot has H={max_h} > hidden_states width {hidden_states.shape[1]}")
    if max_end > arena.numel():
        raise ValueError(f"a routed slot ends at element {max_end} past the arena ({arena.numel()})")
    return max_i


def _ffn_extras(
    bias_offset: torch.Tensor | None,
    act_kind: torch.Tensor | None,
    act_alpha: torch.Tensor | None,
    act_limit: torch.Tensor | None,
    w13_offset: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The optional per-slot bias/activation tables, checked; None when none are given."""
    tables = {
        "bias_offset": bias_offset,
        "act_kind": act_kind,
        "act_alpha": act_alpha,
        "act_limit": act_limit,
    }
    given = [t is not None for t in tables.values()]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("bias_offset, act_kind, act_alpha and act_limit are passed together or not at all")
    for name, t in tables.items():
        want_float = name in ("act_alpha", "act_limit")
        ok_dtype = t.is_floating_point() if want_float else t.dtype in _INDEX_DTYPES
        if t.shape != w13_offset.shape or not ok_dtype or t.device != w13_offset.device:
            raise ValueError(f"{name} must be a [S] table like w13_offset, got {t.dtype} {tuple(t.shape)}")
    return bias_offset.long(), act_kind.int(), act_alpha.float(), act_limit.float()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

# Untuned defaults (no GPU measurements yet). 16-row blocks keep padding low at decode sizes,
# where a slot sees a handful of pairs; prefill-sized batches fill 64-row blocks.
_BLOCK_N = 64
_BLOCK_K = 64


def _block_m(num_pairs: int) -> int:
    return 16 if num_pairs < 1024 else 64


def fused_moe(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    arena: torch.Tensor,
    w13_offset: torch.Tensor,
    w2_offset: torch.Tensor,
    hidden_size: torch.Tensor,
    inter_size: torch.Tensor,
    *,
    bias_offset: torch.Tensor | None = None,
    act_kind: torch.Tensor | None = None,
    act_alpha: torch.Tensor | None = None,
    act_limit: torch.Tensor | None = None,
    max_inter: int | None = None,
) -> torch.Tensor:
    """MoE FFN of every (token, k) pair with two grouped-GEMM Triton launches; returns [T, Hmax].

    Columns >= H of a row are 0. One device sync (bounds check and Imax, see `_check_used_slots`),
    unless `max_inter` (the largest I of any slot) is given: then no check and no sync, as inside
    a CUDA-graph capture (core/static_decode.py), where the slot tables are trusted.
    """
    _require_triton()
    _check_inputs(
        hidden_states, topk_ids, topk_weights, arena, w13_offset, w2_offset, hidden_size, inter_size
    )
    extras = _ffn_extras(bias_offset, act_kind, act_alpha, act_limit, w13_offset)
    num_tokens, width = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(hidden_states)
    if max_inter is None:
        max_inter = _check_used_slots(
            topk_ids, arena, hidden_states, w13_offset, w2_offset, hidden_size, inter_size,
            None if extras is None else extras[0],
        )  # fmt: skip
    # Without the tables the kernels never read these: pass any valid pointer.
    bias_t, kind_t, alpha_t, limit_t = extras if extras is not None else (w13_offset,) * 4
    block_m = _block_m(num_pairs)
    sorted_pair_ids, block_slot = align_pairs_to_slots(topk_ids, w13_offset.shape[0], block_m)
    num_blocks = block_slot.shape[0]
    w13_offset, w2_offset = w13_offset.long(), w2_offset.long()
    hidden_size, inter_size = hidden_size.int(), inter_size.int()
    # fp32 weights are served for exactness (HF parity), so no TF32 there.
    precision = "ieee" if arena.dtype == torch.float32 else "tf32"
    meta = {
        "BLOCK_M": block_m,
        "BLOCK_N": _BLOCK_N,
        "BLOCK_K": _BLOCK_K,
        "DOT_PRECISION": precision,
        "HAS_EXTRAS": extras is not None,
    }

    inter = torch.empty(  # [NB * BLOCK_M, Imax]
        (sorted_pair_ids.shape[0], max_inter), dtype=hidden_states.dtype, device=hidden_states.device
    )
    _gate_up_kernel[(num_blocks, triton.cdiv(max_inter, _BLOCK_N))](
        hidden_states, arena, inter, w13_offset, hidden_size, inter_size, sorted_pair_ids, block_slot,
        bias_t, kind_t, alpha_t, limit_t,
        num_pairs, top_k, hidden_states.stride(0), hidden_states.stride(1), inter.stride(0), **meta,
    )  # fmt: skip

    # fp32 per-pair rows, summed over K in torch: deterministic, unlike atomics.
    per_pair = torch.zeros((num_pairs, width), dtype=torch.float32, device=hidden_states.device)  # [P, Hmax]
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()  # [P]
    _down_kernel[(num_blocks, triton.cdiv(width, _BLOCK_N))](
        inter, arena, per_pair, weights, w2_offset, hidden_size, inter_size, sorted_pair_ids, block_slot,
        bias_t, num_pairs, inter.stride(0), per_pair.stride(0), **meta,
    )  # fmt: skip
    return per_pair.view(num_tokens, top_k, width).sum(dim=1).to(hidden_states.dtype)


def _per_slot_loop(
    hidden_states: torch.Tensor,
    acc: torch.Tensor,
    tokens: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    arena: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
) -> None:
    """Adds the pairs' outputs into acc [T, W] fp32, two GEMMs per used slot on views into the arena.

    tokens/slot_ids/weights [P] per pair; `tables` as `_torch_tables`. The path for many tokens
    per slot (prefill) and for experts too big to gather (see kernels/moe_gather.py).
    """
    order = torch.argsort(slot_ids, stable=True)  # [P]
    slots, counts = torch.unique_consecutive(slot_ids[order], return_counts=True)
    tokens, weights = tokens[order], weights[order]
    w13_t, w2_t, hidden_t, inter_t, bias_t, kind_t, alpha_t, limit_t = tables
    table = torch.stack([w13_t, w2_t, hidden_t, inter_t, bias_t, kind_t], dim=1)  # [S, 6] int64
    rows = table[slots].tolist()
    acts = torch.stack([alpha_t, limit_t], dim=1)[slots].tolist()
    start, width = 0, acc.shape[1]
    for (w13, w2, hidden, inter, bias, kind), (alpha, limit), count in zip(
        rows, acts, counts.tolist(), strict=True
    ):
        tok = tokens[start : start + count]  # [n]
        w13_view = arena[w13 : w13 + 2 * inter * hidden].view(2 * inter, hidden)  # [2I, H]
        w2_view = arena[w2 : w2 + hidden * inter].view(hidden, inter)  # [H, I]
        gate_up = hidden_states[tok, :hidden] @ w13_view.t()  # [n, 2I]
        if bias >= 0:
            gate_up = gate_up + arena[bias : bias + 2 * inter]
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        if kind == ACT_SWIGLU_CLAMPED:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            act = (up + 1) * (gate * torch.sigmoid(gate * alpha))  # [n, I]
        else:
            act = F.silu(gate) * up  # [n, I]
        down = act @ w2_view.t()  # [n, H]
        if bias >= 0:
            down = down + arena[bias + 2 * inter : bias + 2 * inter + hidden]
        down = down.to(torch.float32) * weights[start : start + count, None]
        # index_add_ into the column slice acc[:, :H] takes a slow strided path (4.6 ms vs 0.07 ms
        # for 40 rows of 1536 into [256, 2048] on CPU), so pad the rows to Hmax instead.
        acc.index_add_(0, tok, down if hidden == width else F.pad(down, (0, width - hidden)))
        start += count


def _torch_tables(
    w13_offset: torch.Tensor,
    w2_offset: torch.Tensor,
    hidden_size: torch.Tensor,
    inter_size: torch.Tensor,
    extras: tuple[torch.Tensor, ...] | None,
) -> tuple[torch.Tensor, ...]:
    """(w13, w2, H, I, bias, kind) int64 and (alpha, limit) float32 tables [S], extras filled in."""
    num_slots = w13_offset.shape[0]
    if extras is None:
        device = w13_offset.device
        extras = (
            torch.full((num_slots,), -1, dtype=torch.int64, device=device),
            torch.full((num_slots,), ACT_SILU, dtype=torch.int64, device=device),
            torch.ones(num_slots, device=device),
            torch.zeros(num_slots, device=device),
        )
    bias, kind, alpha, limit = extras
    ints = (w13_offset, w2_offset, hidden_size, inter_size, bias, kind)
    return (*(t.long() for t in ints), alpha.float(), limit.float())


def _run_group(
    hidden_states: torch.Tensor,
    acc: torch.Tensor,
    arena: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    group: moe_gather.ShapeGroup,
    tokens: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """Adds one shape group's pairs (tokens/slots/weights [n], sorted by I) into acc [T, W]:
    gathered as one group when it fits the budgets, else each I on its own (gathered, or past the
    budgets slot by slot)."""
    if not group.fits_budget():
        if len(group.inters) == 1:
            _per_slot_loop(hidden_states, acc, tokens, slots, weights, arena, tables)
            return
        start = 0
        for alone in group.split():
            end = start + alone.counts[0]
            _run_group(
                hidden_states, acc, arena, tables, alone, *(t[start:end] for t in (tokens, slots, weights))
            )
            start = end
        return
    gather_tables = (tables[0], tables[1], tables[4], tables[6], tables[7])
    hidden, width = group.hidden, acc.shape[1]
    down = group_ffn(hidden_states[tokens, :hidden], slots, arena, gather_tables, group)  # [n, H]
    down = down.to(torch.float32) * weights[:, None]
    acc.index_add_(0, tokens, down if hidden == width else F.pad(down, (0, width - hidden)))


def fused_moe_torch(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    arena: torch.Tensor,
    w13_offset: torch.Tensor,
    w2_offset: torch.Tensor,
    hidden_size: torch.Tensor,
    inter_size: torch.Tensor,
    *,
    bias_offset: torch.Tensor | None = None,
    act_kind: torch.Tensor | None = None,
    act_alpha: torch.Tensor | None = None,
    act_limit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as `fused_moe` in plain torch, accumulated in fp32: the CPU serving path.

    Pairs are grouped by (H, activation, biases, I rounded up to 64) (kernels/moe_gather.py); a
    group whose gathered weights are small (kernels/moe_gather.py's budgets) runs as two batched
    products, a bigger one slot by slot on arena views.
    """
    _check_inputs(
        hidden_states, topk_ids, topk_weights, arena, w13_offset, w2_offset, hidden_size, inter_size
    )
    extras = _ffn_extras(bias_offset, act_kind, act_alpha, act_limit, w13_offset)
    num_tokens, width = hidden_states.shape
    acc = torch.zeros((num_tokens, width), dtype=torch.float32, device=hidden_states.device)  # [T, Hmax]
    flat = topk_ids.reshape(-1).long()  # [P]
    pairs = (flat >= 0).nonzero().squeeze(1)  # [P'] real pairs; negative ids are padding
    if pairs.numel() == 0:
        return acc.to(hidden_states.dtype)
    slots, tokens = flat[pairs], pairs // topk_ids.shape[1]  # [P'] each
    weights = topk_weights.reshape(-1)[pairs].to(torch.float32)  # [P']
    tables = _torch_tables(w13_offset, w2_offset, hidden_size, inter_size, extras)
    if slots.max() >= tables[0].shape[0]:
        raise IndexError(f"topk_ids outside [0, {tables[0].shape[0]}): max {int(slots.max())}")
    hidden_t, inter_t, bias_t, kind_t = (t[slots] for t in tables[2:6])
    keys, inverse, counts = torch.unique(
        class_keys(hidden_t, inter_t, kind_t, bias_t), return_inverse=True, return_counts=True
    )
    if len(keys) > 1:  # pairs sorted by (group, I) (stable), so each group is a slice of them
        order = torch.argsort(inverse, stable=True)
        tokens, slots, weights = tokens[order], slots[order], weights[order]
    start = 0
    for group in shape_groups(keys.tolist(), counts.tolist()):
        end = start + sum(group.counts)
        pairs = (tokens[start:end], slots[start:end], weights[start:end])  # [n] each
        _run_group(hidden_states, acc, arena, tables, group, *pairs)
        start = end
    return acc.to(hidden_states.dtype)


def fused_moe_ref(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    arena: torch.Tensor,
    w13_offset: torch.Tensor,
    w2_offset: torch.Tensor,
    hidden_size: torch.Tensor,
    inter_size: torch.Tensor,
    *,
    bias_offset: torch.Tensor | None = None,
    act_kind: torch.Tensor | None = None,
    act_alpha: torch.Tensor | None = None,
    act_limit: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 reference straight from the formula, one (token, k) pair at a time; [T, Hmax] float64."""
    num_slots = w13_offset.shape[0]
    bias_offset = torch.full((num_slots,), -1) if bias_offset is None else bias_offset
    act_kind = torch.full((num_slots,), ACT_SILU) if act_kind is None else act_kind
    act_alpha = torch.ones(num_slots) if act_alpha is None else act_alpha
    act_limit = torch.zeros(num_slots) if act_limit is None else act_limit
    x64 = hidden_states.double()  # [T, Hmax]
    arena64 = arena.double()
    out = torch.zeros_like(x64)  # [T, Hmax]
    for t in range(topk_ids.shape[0]):
        for k in range(topk_ids.shape[1]):
            s = int(topk_ids[t, k])
            if s < 0:  # padding
                continue
            w13, w2 = int(w13_offset[s]), int(w2_offset[s])
            hidden, inter = int(hidden_size[s]), int(inter_size[s])
            w_gate = arena64[w13 : w13 + inter * hidden].view(inter, hidden)  # [I, H]
            w_up = arena64[w13 + inter * hidden : w13 + 2 * inter * hidden].view(inter, hidden)  # [I, H]
            w_down = arena64[w2 : w2 + hidden * inter].view(hidden, inter)  # [H, I]
            x = x64[t, :hidden]  # [H]
            gate, up, b2 = w_gate @ x, w_up @ x, torch.zeros(hidden, dtype=torch.float64)  # [I], [I], [H]
            b = int(bias_offset[s])
            if b >= 0:
                gate = gate + arena64[b : b + inter]
                up = up + arena64[b + inter : b + 2 * inter]
                b2 = arena64[b + 2 * inter : b + 2 * inter + hidden]
            if int(act_kind[s]) == ACT_SWIGLU_CLAMPED:
                alpha, limit = float(act_alpha[s]), float(act_limit[s])
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
                h = (up + 1) * gate * torch.sigmoid(alpha * gate)  # [I]
            else:
                h = torch.nn.functional.silu(gate) * up  # [I]
            out[t, :hidden] += float(topk_weights[t, k]) * (w_down @ h + b2)
    return out
