"""Several models' K/V written into, and a decode step's pages gathered from, the shared KV arena
with ONE indexed op per layer index.

Every model's KV is a contiguous view [N, L, P, PT, Hkv, D] that starts at the same byte of one
arena (mem/kv_pool.py), so models of one dtype are addresses in one flat tensor. Seen as rows
of G = gcd(Hkv * D) elements, a token's K (or V) in a model is w = Hkv * D / G consecutive rows
starting at

    ((page * L + layer) * P + plane) * PT * w + slot * w

A lockstep decode step writes 2 * T rows per model and layer with one `index_put` each; this
writes the rows of all the models live at a layer index with one `index_copy_`, the row index
of every layer built once per step (the K/V are the same values at the same places, so the
cache is bit-identical to the per-model writes; tests/layers/test_shared_kv.py).

The decode gather is the same idea in rows of G2 = gcd(PT * Hkv * D) elements: a page's plane is
u = PT * Hkv * D / G2 rows at ((page * L + layer) * P + plane) * u, and one `index_select` per layer
index returns every live model's keys and values [B, Pm * PT, Hkv, D] as contiguous slices — the
same values `kv_planes` gathers per model.

Legend: T = new tokens of one model, M = models, G = elements per flat row, w = rows per token
and plane of one model, Rw = rows written at one layer index, B = sequences of one model,
Pm = pages of its longest sequence.
"""

from __future__ import annotations

import math

import torch

from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.plan_cache import PlanCache, plan


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
    order `write` receives their K and V. The row layout of a batch structure comes from `plans`
    when given (decode steps repeat their structure).
    """

    def __init__(
        self,
        kvs: list[torch.Tensor],
        metas: list[AttentionMetadata],
        order: list[list[int]],
        plans: PlanCache | None = None,
    ):
        assert shares_arena(kvs), "a shared K/V write needs two-plane views of one arena"
        widths = [kv.shape[4] * kv.shape[5] for kv in kvs]  # Hkv * D
        self.g = math.gcd(*widths)
        self.flat = max(kvs, key=lambda kv: kv.numel()).view(-1, self.g)  # [rows, G]
        geo = tuple((kv.shape[1], kv.shape[3], w // self.g) for kv, w in zip(kvs, widths, strict=True))
        tokens = tuple(m.write_pages.shape[0] for m in metas)
        key = (str(kvs[0].device), self.g, geo, tokens, tuple(map(tuple, order)))
        layout = plan(plans, key, lambda: _layout(geo, tokens, order, kvs[0].device))
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


def _layout(
    geo, tokens, order, device, slots: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """(multipliers [2 * sum T] of the pages then slots, token of each row, its constant offset,
    where each layer's rows start): rows ordered by layer, model, plane, token, row of the token.
    `slots=False` (the gather): items are pages (pt = 1, w = u), multipliers of the pages only."""
    starts = [sum(tokens[:j]) for j in range(len(tokens))]
    mult = [L * 2 * pt * w for (L, pt, w), t in zip(geo, tokens, strict=True) for _ in range(t)]
    if slots:
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


class SharedKVGather:
    """A decode step's page gathers of models whose views share one arena, one `index_select` per
    layer index (`order` as in `SharedKVWrite`; every metadata must be a decode step's)."""

    def __init__(
        self,
        kvs: list[torch.Tensor],
        metas: list[AttentionMetadata],
        order: list[list[int]],
        pages: torch.Tensor | None = None,  # int64 [sum B * Pm]: each model's page_table[:, :Pm]
        plans: PlanCache | None = None,
    ):
        assert shares_arena(kvs) and all(m.is_decode for m in metas)
        sizes = [kv.shape[3] * kv.shape[4] * kv.shape[5] for kv in kvs]  # PT * Hkv * D
        g = math.gcd(*sizes)
        self.flat = max(kvs, key=lambda kv: kv.numel()).view(-1, g)  # [rows, G2]
        num_pages = [-(-max(m.seq_lens_cpu) // m.page_tokens) for m in metas]  # Pm
        self.shapes = [  # per model: keys' and values' shape [B, Pm * PT, Hkv, D]
            (m.page_table.shape[0], p * kv.shape[3], kv.shape[4], kv.shape[5])
            for m, p, kv in zip(metas, num_pages, kvs, strict=True)
        ]
        geo = tuple((kv.shape[1], 1, size // g) for kv, size in zip(kvs, sizes, strict=True))
        per_model = tuple(b * p for (b, *_), p in zip(self.shapes, num_pages, strict=True))  # pages each
        key = ("gather", str(kvs[0].device), g, geo, per_model, tuple(map(tuple, order)))
        layout = plan(plans, key, lambda: _layout(geo, per_model, order, kvs[0].device, slots=False))
        mult, page_of_row, const, self.bounds = layout
        if pages is None:
            pages = torch.cat(
                [m.page_table[:, :p].reshape(-1) for m, p in zip(metas, num_pages, strict=True)]
            )
        self.rows = (pages.long() * mult)[page_of_row] + const  # [sum over layers of rows]
        self.order = order
        self.plane_rows = [b * s * h * d // g for b, s, h, d in self.shapes]  # flat rows of one plane

    def gather(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) [B, Pm * PT, Hkv, D] of each model of `order[layer]`, in that order."""
        got = self.flat.index_select(0, self.rows[self.bounds[layer] : self.bounds[layer + 1]])
        live = self.order[layer]
        planes = got.split([self.plane_rows[j] for j in live for _ in range(2)])  # one call, not 2M slices
        return [
            (planes[2 * i].view(self.shapes[j]), planes[2 * i + 1].view(self.shapes[j]))
            for i, j in enumerate(live)
        ]
