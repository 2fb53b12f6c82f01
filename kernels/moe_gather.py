"""The CPU fused-MoE path for small batches: slots of one shape share one batched product.

A decode step of several models routes a handful of tokens to dozens of different slots;
`fused_moe_torch`'s per-slot loop then pays ~10 torch calls per slot, far more than the
tiny GEMMs themselves. Here the (token, k) pairs are grouped by *shape class* — slots with
the same (H, I, activation kind, has biases) — and each class runs as two batched
matrix-vector products over the pairs' weight matrices, gathered from the arena: an
overlapping strided view of the arena whose row r starts at element r, so `index_select`
with the slots' offsets copies exactly their matrices (no index tensor of the matrix size is
built). Gathering costs one copy of a matrix per pair, so `fused_moe_torch` uses this only
while the copies stay small (`GATHER_PAIR_MAX`, `GATHER_BUDGET`) and keeps the per-slot
loop for prefill-sized batches and big experts.

Imports only torch; `kernels/fused_moe.py` calls it (never the other way round).

Legend: P = (token, k) pairs of one class, H / I = hidden / intermediate size of the class,
W = hidden_states width (Hmax), T = tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACT_SWIGLU_CLAMPED = 1  # kernels/fused_moe.py's code; a test keeps them equal

# When a class is gathered (fused_moe_torch): each pair's matrices (3*I*H elements) at most
# GATHER_PAIR_MAX, all of the class's at most GATHER_BUDGET. A gathered pair costs a copy of its
# matrices; a slot of the loop costs ~10 torch calls. Measured with fused_moe_torch, fp32, 1 thread,
# on the shared 2-core x86 box (load ~4, so only the ratios mean much), loop vs gather in ms:
# 8 models x 1 token of 64x48 experts 1.98 vs 0.55; 8 tokens of 3 models 1.78 vs 1.40; 32-token
# prefill 1.04 vs 0.81; 4 tokens of 256x128 experts 1.60 vs 1.32; but 1 token of 512x256 experts
# 0.89 vs 1.38, 4 tokens 3.98 vs 4.72, a 256-token prefill of 64x48 experts 3.98 vs 17.4 and
# 4 tokens of 1024x512 experts 9.9 vs 44.0.
GATHER_PAIR_MAX = 1 << 17
GATHER_BUDGET = 1 << 22


def gather_rows(arena: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """arena [N], offsets [P] -> [P, length]: a copy of arena[o : o + length] for each offset o."""
    windows = arena.as_strided((arena.numel() - length + 1, length), (1, 1))  # row r = arena[r : r + length]
    return windows.index_select(0, offsets)


def class_keys(
    hidden: torch.Tensor, inter: torch.Tensor, kind: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Per pair int64 key of its shape class (H, I < 2^24, kind < 2^7): [P] each -> [P]."""
    return (((hidden.long() << 24) | inter.long()) << 8) | (kind.long() << 1) | (bias >= 0).long()


def decode_key(key: int) -> tuple[int, int, int, bool]:
    """(H, I, activation kind, has biases) of a `class_keys` value."""
    return key >> 32, (key >> 8) & ((1 << 24) - 1), (key >> 1) & 127, bool(key & 1)


def _batched_matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [P, N, D], x [P, D] -> [P, N]. A broadcast multiply and a sum: CPU `bmm` with one column
    takes a slow path (0.10 ms against 0.03 ms for 5 x [256, 64] fp32, 2-core x86)."""
    return (w * x[:, None, :]).sum(-1)


def class_ffn(
    x: torch.Tensor,
    slots: torch.Tensor,
    arena: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    shape: tuple[int, int, int, bool],
) -> torch.Tensor:
    """One class's pairs: x [P, H] (each pair's token), slots [P] -> expert outputs [P, H] (arena dtype).

    `tables` = (w13_offset, w2_offset, bias_offset, act_alpha, act_limit), each [S].
    """
    hidden, inter, kind, has_bias = shape
    w13_offset, w2_offset, bias_offset, alpha, limit = tables
    num = slots.shape[0]
    w13 = gather_rows(arena, w13_offset[slots], 2 * inter * hidden).view(num, 2 * inter, hidden)
    gate_up = _batched_matvec(w13, x)  # [P, 2I]
    if has_bias:
        bias = bias_offset[slots]  # [P]
        gate_up = gate_up + gather_rows(arena, bias, 2 * inter)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    if kind == ACT_SWIGLU_CLAMPED:
        a, lim = alpha[slots].to(gate.dtype)[:, None], limit[slots].to(gate.dtype)[:, None]  # [P, 1]
        gate, up = torch.minimum(gate, lim), torch.maximum(torch.minimum(up, lim), -lim)
        act = (up + 1) * (gate * torch.sigmoid(gate * a))  # [P, I]
    else:
        act = F.silu(gate) * up  # [P, I]
    w2 = gather_rows(arena, w2_offset[slots], hidden * inter).view(num, hidden, inter)
    down = _batched_matvec(w2, act)  # [P, H]
    if has_bias:
        down = down + gather_rows(arena, bias + 2 * inter, hidden)
    return down
