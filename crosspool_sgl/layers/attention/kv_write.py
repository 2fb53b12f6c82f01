"""Several models' new K/V written into the shared KV arena with ONE indexed copy per layer index.

Every model's KV is a contiguous view [N, L, P, PT, Hkv, D] that starts at the same byte of one
arena (mem/kv_pool.py), so models of one dtype are addresses in one flat tensor. Seen as rows
of G = gcd(Hkv * D) elements, a token's K (or V) in a model is w = Hkv * D / G consecutive rows
starting at

    ((page * L + layer) * P + plane) * PT * w + slot * w

A lockstep decode step writes 2 * T rows per model and layer with one `index_put` each; this
writes the rows of all the models live at a layer index with one `index_copy_`, the row index
of every layer built once per step (the K/V are the same values at the same places, so the
cache is bit-identical to the per-model writes; tests/layers/test_kv_write.py).

Legend: T = new tokens of one model, M = models, G = elements per flat row, w = rows per token
and plane of one model, Rw = rows written at one layer index.
"""

from __future__ import annotations

import math

import torch

from crosspool_sgl.layers.attention.base import AttentionMetadata

# host-side row layout per batch structure: decode steps repeat the same structure every step
_LAYOUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]] = {}


def shares_arena(kvs: list[torch.Tensor]) -> bool:
    """Whether these two-plane views are contiguous, of one dtype, and start at one address."""
    first = kvs[0]
    return all(
        kv.dim() == 6
        and kv.shape[2] == 2
        and kv.is_contiguous()
        and kv.dtype == first.dtype
        and kv.device == first.device
        and kv.data_ptr() == first.data_ptr()
        for kv in kvs
    )


class SharedKVWrite:
    """The K/V writes of models whose views share one arena, one indexed copy per layer index.

    `order[i]` lists the models (indices into `kvs`/`metas`) live at layer index i, in the
    order `write` receives their K and V.
    """

    def __init__(self, kvs: list[torch.Tensor], metas: list[AttentionMetadata], order: list[list[int]]):
        assert shares_arena(kvs), "a shared K/V write needs two-plane views of one arena"
        widths = [kv.shape[4] * kv.shape[5] for kv in kvs]  # Hkv * D
        self.g = math.gcd(*widths)
        self.flat = max(kvs, key=lambda kv: kv.numel()).view(-1, self.g)  # [rows, G]
        geo = tuple((kv.shape[1], kv.shape[3], w // self.g) for kv, w in zip(kvs, widths, strict=True))
        tokens = tuple(m.write_pages.shape[0] for m in metas)
        key = (self.g, geo, tokens, tuple(map(tuple, order)))
        layout = _LAYOUTS.get(key)
        if layout is None:
            if len(_LAYOUTS) > 256:
                _LAYOUTS.clear()
            layout = _LAYOUTS[key] = _layout(geo, tokens, order, kvs[0].device)
        mult, token_of_row, const, self.bounds = layout
        pages_slots = torch.cat(
            [m.write_pages for m in metas] + [m.write_slots for m in metas]
        )  # [2 * sum T]
        token_base = (pages_slots * mult).view(2, -1).sum(0)  # [sum T] page * L * P * PT * w + slot * w
        self.rows = token_base[token_of_row] + const  # [sum over layers of Rw]

    def write(self, layer: int, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
        """K and V [T, Hkv, D] of the models `order[layer]`, in that order, into their pages."""
        g = self.g
        values = torch.cat([x.reshape(-1, g) for k, v in zip(ks, vs, strict=True) for x in (k, v)])
        self.flat.index_copy_(0, self.rows[self.bounds[layer] : self.bounds[layer + 1]], values)


def _layout(geo, tokens, order, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(multipliers [2 * sum T] of the pages then slots, token of each row, its constant offset,
    where each layer's rows start): rows ordered by layer, model, plane, token, row of the token."""
    starts = [sum(tokens[:j]) for j in range(len(tokens))]
    mult = [L * 2 * pt * w for (L, pt, w), t in zip(geo, tokens, strict=True) for _ in range(t)]
    mult += [w for (_, _, w), t in zip(geo, tokens, strict=True) for _ in range(t)]
    token_of_row: list[int] = []
    const: list[int] = []
    bounds = [0]
    for layer, live in enumerate(order):
        for j in live:
            _, pt, w = geo[j]
            for plane in range(2):
                for t in range(tokens[j]):
                    token_of_row += [starts[j] + t] * w
                    base = (layer * 2 + plane) * pt * w
                    const += range(base, base + w)
        bounds.append(len(const))
        assert layer == len(bounds) - 2
    as_long = lambda xs: torch.tensor(xs, dtype=torch.int64).to(device)  # noqa: E731
    return as_long(mult), as_long(token_of_row), as_long(const), bounds
