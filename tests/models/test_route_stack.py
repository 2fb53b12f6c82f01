"""models/route_stack.py: the stacked slots/weights of several models' routes must equal padding
each model's routes to the widest K (slot -1, weight 0) and concatenating them, a dense layer
being its one slot with weight 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crosspool_sgl.models.route_stack import RouteLayout, stack_routes


def naive(routes, shapes):
    width = max(k or 1 for _, k in shapes)
    slots, weights = [], []
    for r, (t, k) in zip(routes, shapes, strict=True):
        ids, w = (r.expand(t, 1), torch.ones(t, 1)) if k is None else r
        slots.append(F.pad(ids, (0, width - ids.shape[1]), value=-1))
        weights.append(F.pad(w, (0, width - w.shape[1]), value=0.0))
    return torch.cat(slots), torch.cat(weights)


def test_stacked_routes_equal_padded_concatenation() -> None:
    torch.manual_seed(0)
    shapes = [(2, 2), (1, None), (3, 3), (1, 1), (2, None)]
    routes = [
        torch.tensor([7 + i]) if k is None else (torch.randint(0, 50, (t, k)), torch.rand(t, k))
        for i, (t, k) in enumerate(shapes)
    ]
    layout = RouteLayout.build(shapes, torch.device("cpu"))
    pads = torch.tensor([-1]), torch.tensor([0.0, 1.0])
    slots, weights = stack_routes(layout, routes, pads)
    want_slots, want_weights = naive(routes, shapes)
    assert slots.shape == (9, 3) and torch.equal(slots, want_slots)
    assert torch.equal(weights, want_weights)
    # the layout is reused for the next layer's routes of the same shapes
    routes[0] = (torch.randint(0, 50, (2, 2)), torch.rand(2, 2))
    assert torch.equal(stack_routes(layout, routes, pads)[1], naive(routes, shapes)[1])
