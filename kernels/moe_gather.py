"""The CPU fused-MoE path for small batches: slots of one shape share one batched GEMM.

A decode step of several models routes a handful of tokens to dozens of different slots;
`fused_moe_torch`'s per-slot loop then pays ~10 torch calls per slot, far more than the
tiny GEMMs themselves. Here the (token, k) pairs are grouped by *shape class* — slots with
the same (H, I, activation kind, has biases) — and each class runs as two `bmm`s over the
pairs' weight matrices, gathered from the arena: an overlapping strided view of the arena
whose row r starts at element r, so `index_select` with the slots' offsets copies exactly
their matrices (no index tensor of the matrix size is built). Gathering costs one copy of a
matrix per pair, so `fused_moe_torch` uses this only while the copies stay small (see
`GATHER_BUDGET`) and keeps the per-slot loop for prefill-sized batches and big experts.

Imports only torch; `kernels/fused_moe.py` calls it (never the other way round).

Legend: P = (token, k) pairs of one class, H / I = hidden / intermediate size of the class,
W = hidden_states width (Hmax), T = tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACT_SWIGLU_CLAMPED = 1  # kernels/fused_moe.py's code; a test keeps them equal

# Largest number of arena elements one class may gather (pairs * 3*I*H). Measured on a 2-core
# x86 CPU, fp32 (benchmarks/results/control_overhead.md): at 8 pairs of 64x48 experts the
# gathered bmm takes 0.09 ms against 0.55 ms for the per-slot loop; past ~4M elements (a few
# pairs of a 2048x768 expert) the copy costs more than the loop's per-call overhead saves.
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
    gate_up = torch.bmm(w13, x.unsqueeze(2)).squeeze(2)  # [P, 2I]
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
    down = torch.bmm(w2, act.unsqueeze(2)).squeeze(2)  # [P, H]
    if has_bias:
        down = down + gather_rows(arena, bias + 2 * inter, hidden)
    return down
