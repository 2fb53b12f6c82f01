"""The CPU fused-MoE path for small batches: slots of one padded shape share one batched product.

A decode step of several models routes a handful of tokens to dozens of different slots;
`fused_moe_torch`'s per-slot loop then pays ~10 torch calls per slot, far more than the
tiny GEMMs themselves. Here the (token, k) pairs are grouped by *shape group* — slots with the
same (H, activation kind, has biases) and the same Ip, their I rounded up to `PAD_TO` — and each
group runs as two batched matrix-vector products over the pairs' weight matrices, gathered from
the arena through an overlapping strided view of it (row r starts at element r, so
`index_select` with the slots' offsets copies exactly their matrices; no index tensor of the
matrix size is built) and zero-padded from I to Ip. The padding adds exact zeros (a padded gate
and up row is 0, so is its activation) and depends on the pair's own I only, so a pair's result
is the same bit for bit whichever other models share the group: models whose experts differ in I
by less than PAD_TO (tiny models; a model's routed and shared experts) need no call of their
own, at the cost of < PAD_TO wasted columns per pair. Real experts have I a multiple of 64
already: for them a group is one I, as before.

Gathering costs one copy of a matrix per pair, so `fused_moe_torch` uses this only while the
copies stay small (`GATHER_PAIR_MAX`, `GATHER_BUDGET`) and keeps the per-slot loop for
prefill-sized batches and big experts.

Imports only torch; `kernels/fused_moe.py` calls it (never the other way round).

Legend: P = (token, k) pairs of one group, n = those of one I, H = hidden size of the group,
I = a pair's intermediate size, Ip = the group's padded I, W = hidden_states width (Hmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACT_SWIGLU_CLAMPED = 1  # kernels/fused_moe.py's code; a test keeps them equal
PAD_TO = 64  # a group's I values round up to one multiple of this (see the module docstring)

# When a group is gathered (fused_moe_torch): each pair's padded matrices (3*Ip*H elements) at most
# GATHER_PAIR_MAX, all of the group's at most GATHER_BUDGET. A gathered pair costs a copy of its
# matrices; a slot of the loop costs ~10 torch calls. Measured with fused_moe_torch, fp32, 1 thread,
# on the shared 2-core x86 box (load ~4, so only the ratios mean much), loop vs gather in ms:
# 8 models x 1 token of 64x48 experts 1.98 vs 0.55; 8 tokens of 3 models 1.78 vs 1.40; 32-token
# prefill 1.04 vs 0.81; 4 tokens of 256x128 experts 1.60 vs 1.32; but 1 token of 512x256 experts
# 0.89 vs 1.38, 4 tokens 3.98 vs 4.72, a 256-token prefill of 64x48 experts 3.98 vs 17.4 and
# 4 tokens of 1024x512 experts 9.9 vs 44.0.
GATHER_PAIR_MAX = 1 << 17
GATHER_BUDGET = 1 << 22

_INTER_BITS = 32


@dataclass(frozen=True)
class ShapeGroup:
    """The pairs of one (H, activation kind, has biases, Ip), sorted by I: `inters` the distinct I
    values and `counts` how many pairs have each (in that order)."""

    hidden: int
    kind: int
    has_bias: bool
    inters: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def padded_inter(self) -> int:
        return padded(self.inters[-1])

    def fits_budget(self) -> bool:
        per_pair = 3 * self.padded_inter * self.hidden
        return per_pair <= GATHER_PAIR_MAX and sum(self.counts) * per_pair <= GATHER_BUDGET

    def split(self) -> list[ShapeGroup]:
        """One group per I."""
        return [
            ShapeGroup(self.hidden, self.kind, self.has_bias, (i,), (n,))
            for i, n in zip(self.inters, self.counts, strict=True)
        ]


def padded(inter: int) -> int:
    """I rounded up to a multiple of PAD_TO."""
    return -(-inter // PAD_TO) * PAD_TO


def class_keys(
    hidden: torch.Tensor, inter: torch.Tensor, kind: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Per pair int64 key (H < 2^23, kind < 2^7, I < 2^32): [P] each -> [P]. Sorted keys list the
    pairs of one (H, kind, has biases) together, by I within it (`shape_groups`)."""
    upper = (hidden.long() << 8) | (kind.long() << 1) | (bias >= 0).long()
    return (upper << _INTER_BITS) | inter.long()


def shape_groups(keys: list[int], counts: list[int]) -> list[ShapeGroup]:
    """The groups of sorted unique `class_keys` values and their pair counts: consecutive keys of
    one (H, kind, has biases) and one padded I."""
    groups: list[ShapeGroup] = []
    last = None
    for key, count in zip(keys, counts, strict=True):
        upper, inter = key >> _INTER_BITS, key & ((1 << _INTER_BITS) - 1)
        if (upper, padded(inter)) == last:
            g = groups[-1]
            groups[-1] = ShapeGroup(g.hidden, g.kind, g.has_bias, (*g.inters, inter), (*g.counts, count))
        else:
            groups.append(ShapeGroup(upper >> 8, (upper >> 1) & 127, bool(upper & 1), (inter,), (count,)))
            last = (upper, padded(inter))
    return groups


def gather_rows(arena: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
    """arena [N], offsets [n] -> [n, length]: a copy of arena[o : o + length] for each offset o."""
    windows = arena.as_strided((arena.numel() - length + 1, length), (1, 1))  # row r = arena[r : r + length]
    return windows.index_select(0, offsets)


def _batched_matvec(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [P, N, D], x [P, D] -> [P, N]. A broadcast multiply and a sum: CPU `bmm` with one column
    takes a slow path (0.10 ms against 0.03 ms for 5 x [256, 64] fp32, 2-core x86)."""
    return (w * x[:, None, :]).sum(-1)


def _padded_weights(
    arena: torch.Tensor, slots: torch.Tensor, tables: tuple[torch.Tensor, ...], group: ShapeGroup
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The group's matrices zero-padded to Ip: w13 [P, 2Ip, H], w2 [P, H, Ip], and with biases
    the gate/up biases [P, 2Ip] and down biases [P, H]; one gather per matrix kind and I."""
    hidden, ip = group.hidden, group.padded_inter
    w13_offset, w2_offset = tables[0][slots], tables[1][slots]
    bias_offset = tables[2][slots] if group.has_bias else None
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    start = 0
    for inter, n in zip(group.inters, group.counts, strict=True):
        rows = slice(start, start + n) if len(group.inters) > 1 else slice(None)
        start += n
        w13 = gather_rows(arena, w13_offset[rows], 2 * inter * hidden).view(n, 2, inter, hidden)
        w2 = gather_rows(arena, w2_offset[rows], hidden * inter).view(n, hidden, inter)
        if inter != ip:
            w13, w2 = F.pad(w13, (0, 0, 0, ip - inter)), F.pad(w2, (0, ip - inter))
        parts[0].append(w13.view(n, 2 * ip, hidden))
        parts[1].append(w2)
        if bias_offset is not None:
            bias = gather_rows(arena, bias_offset[rows], 2 * inter + hidden)  # [n, 2I + H]
            gate_up = bias[:, : 2 * inter].view(n, 2, inter)
            parts[2].append((F.pad(gate_up, (0, ip - inter)) if inter != ip else gate_up).view(n, 2 * ip))
            parts[3].append(bias[:, 2 * inter :])
    joined = [(p[0] if len(p) == 1 else torch.cat(p)) if p else None for p in parts]
    return joined[0], joined[1], joined[2], joined[3]


def group_ffn(
    x: torch.Tensor,
    slots: torch.Tensor,
    arena: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    group: ShapeGroup,
) -> torch.Tensor:
    """One group's pairs, sorted by I: x [P, H] (each pair's token), slots [P] -> expert outputs
    [P, H] (arena dtype).

    `tables` = (w13_offset, w2_offset, bias_offset, act_alpha, act_limit), each [S].
    """
    ip = group.padded_inter
    w13, w2, gate_up_bias, down_bias = _padded_weights(arena, slots, tables, group)
    gate_up = _batched_matvec(w13, x)  # [P, 2Ip]
    if gate_up_bias is not None:
        gate_up = gate_up + gate_up_bias
    # padded columns: gate = up = 0, so act = 0 for either activation
    act = _activation(gate_up[:, :ip], gate_up[:, ip:], group.kind, slots, tables[3], tables[4])  # [P, Ip]
    down = _batched_matvec(w2, act)  # [P, H]
    return down if down_bias is None else down + down_bias


def _activation(gate, up, kind: int, slots, alpha, limit) -> torch.Tensor:
    """silu(gate) * up, or gpt-oss's clamped SwiGLU with each pair's alpha and limit; [P, N] each."""
    if kind == ACT_SWIGLU_CLAMPED:
        a, lim = alpha[slots].to(gate.dtype)[:, None], limit[slots].to(gate.dtype)[:, None]  # [P, 1]
        gate, up = torch.minimum(gate, lim), torch.maximum(torch.minimum(up, lim), -lim)
        return (up + 1) * (gate * torch.sigmoid(gate * a))
    return F.silu(gate) * up
