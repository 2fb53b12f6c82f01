"""Several models' FFN routes stacked into the slots and weights of ONE FFN call.

The lockstep forward (models/lockstep.py) runs one FFN call per layer index over the rows of
every live model: slots [R, Kmax] and weights [R, Kmax], a model with fewer slots per token
padded with slot -1 / weight 0 (the kernel contract, kernels/fused_moe.py). Padding each model's
routes and concatenating them costs ~4 small ops per model and layer (a cast, two pads, and a
dense MLP's `ones`). Here every model's routes are flattened into one source tensor with the
padding values at its end, and one `index_select` with an index built once per batch structure
puts each element in place: the same values, 2 ops per tensor and layer plus one view per MoE
model. A dense MLP layer (one slot, weight 1) contributes its slot id alone; its weight 1 comes
from the padding source too, so its routing runs no op at all.

Legend: T = tokens of one model, K = its slots per token, R = rows of the call, Kmax = widest K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# One model's share of the call: (T, K) of a routed layer, or (T, None) of a dense MLP layer.
RouteShape = tuple[int, int | None]


@dataclass(frozen=True)
class RouteLayout:
    """Where each element of the stacked slots and weights [R, Kmax] comes from."""

    rows: int  # R
    width: int  # Kmax
    slot_index: torch.Tensor  # int64 [R * Kmax] into cat(routed ids, dense slot ids, [-1])
    weight_index: torch.Tensor  # int64 [R * Kmax] into cat(routed weights, [0, 1])

    @classmethod
    def build(cls, shapes: list[RouteShape], device: torch.device) -> RouteLayout:
        width = max(k or 1 for _, k in shapes)
        num_slots = sum(t * k if k else 1 for t, k in shapes)  # the source's -1 follows
        num_weights = sum(t * k for t, k in shapes if k)  # then 0, then 1
        slot_index: list[int] = []
        weight_index: list[int] = []
        slot_at = weight_at = 0
        for t, k in shapes:
            for row in range(t):
                for col in range(width):
                    if k is None:  # dense: its one slot, weight 1, then padding
                        slot_index.append(slot_at if col == 0 else num_slots)
                        weight_index.append(num_weights + 1 if col == 0 else num_weights)
                    elif col < k:
                        slot_index.append(slot_at + row * k + col)
                        weight_index.append(weight_at + row * k + col)
                    else:
                        slot_index.append(num_slots)
                        weight_index.append(num_weights)
            slot_at += t * k if k else 1
            weight_at += t * k if k else 0
        as_index = lambda xs: torch.tensor(xs, dtype=torch.int64).to(device)  # noqa: E731
        rows = sum(t for t, _ in shapes)
        return cls(rows, width, as_index(slot_index), as_index(weight_index))


def stack_routes(
    layout: RouteLayout,
    routes: list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor],
    pads: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """slots, weights [R, Kmax] of `routes` in row order: (slot ids [T, K], weights [T, K]) of a
    routed layer, or a dense layer's slot ids [1]; `pads` = (int64 [-1], [0, 1] in the weights'
    dtype), made once per batch."""
    slot_parts = [r[0].reshape(-1) if isinstance(r, tuple) else r for r in routes]
    weight_parts = [r[1].reshape(-1) for r in routes if isinstance(r, tuple)]
    slots = torch.cat([*slot_parts, pads[0]]).index_select(0, layout.slot_index)
    weights = torch.cat([*weight_parts, pads[1]]).index_select(0, layout.weight_index)
    return slots.view(layout.rows, layout.width), weights.view(layout.rows, layout.width)
