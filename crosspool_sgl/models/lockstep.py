"""Several models' forward passes in lockstep: one FFN call per layer index for all of them.

A step of M models run one after the other costs M * L FFN launches; every model's FFN
weights live in one weights pool and `run_ffn` takes any mix of slots, so the models can
instead walk their layers together::

    for i in range(max layers):
        attention half of layer i of every model that has one (models with fewer layers are done)
        each model routes its FFN input with its own router: global weights-pool slot ids
        ONE FFN call over the concatenated rows: hidden widths padded to Hmax, slot lists to
            Kmax with slot -1 / weight 0 (padding in the kernel contract, see kernels/fused_moe.py),
            the routes stacked by one indexed op per tensor (models/route_stack.py)
        add the output to the residual rows

Models of one hidden size share one *residual stream*: their rows stacked, deepest model first,
so the models that still have layer i own a prefix of the rows. What is the same op for every
model runs once per stream and layer instead of once per model: the input and post-attention
RMSNorms (each row with its own model's weight and eps), both residual adds, the final norm,
and the FFN input needs no concatenation. When the stream's models attend with the torch
backend on views of one KV arena, their attention shares ops too (`_attention`): the new K/V of
all of them go into the arena with one indexed copy per layer index, a decode step's pages come
out with one gather and its masks are built once (layers/attention/shared_kv.py), and q/k of one
head dim rotate in one call over stacked rows with per-row tables; in a decode step on a
single-threaded CPU, the models of one attention shape and key length attend in one SDPA call
(`_decode_attention`). Only what reads a model's own weights runs per model: q/k/v and o
projections, q/k norms, the router. The index tensors of all this depend only on the batch's
structure and are kept across steps in the runner's `PlanCache` (layers/plan_cache.py). The
results are bit-identical to `DecoderModel.forward` (same formula per row;
tests/models/test_lockstep*.py).

Embedding, logits and sampling stay per model (the model runner's job). The FFN is a callable so
the disaggregated pipeline can send the combined rows to its workers instead
(crosspool_sgl/disagg/pipeline.py drives `LockstepBatch` layer by layer).

Legend: T = tokens of one model, R = rows of a stream or of the combined call, H = one model's
hidden size, Hmax = the widest H of the step, K = slots per token of one model, Kmax = widest K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crosspool_sgl.layers import moe
from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.attention.shared_kv import SharedKVGather, SharedKVWrite, shares_arena
from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend
from crosspool_sgl.layers.norm import rms_norm_rows
from crosspool_sgl.layers.plan_cache import PlanCache, plan
from crosspool_sgl.layers.rotary import rotate_halves, stacked_tables
from crosspool_sgl.models.decoder import DecoderModel
from crosspool_sgl.models.route_stack import RouteLayout, stack_routes

FFNFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # x, slots, weights -> out


@dataclass
class ModelSlice:
    """One model's share of a lockstep batch (whole requests of one model)."""

    model: DecoderModel
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    kv: torch.Tensor  # the model's view of the KV pool
    h: torch.Tensor  # [T, H] the embedded tokens; the final-normed hidden states once the batch is done

    @classmethod
    def embed(cls, model: DecoderModel, ids: torch.Tensor, positions, meta, kv) -> ModelSlice:
        return cls(model, positions, meta, kv, F.embedding(ids, model.weights.embed))


@dataclass
class FFNBatch:
    """The combined FFN input of one layer index: which slices it carries, in row order."""

    layer: int
    slices: list[int]  # indices into LockstepBatch.slices
    x: torch.Tensor  # [R, Hmax]
    slots: torch.Tensor  # [R, Kmax] weights-pool slots, -1 = padding
    weights: torch.Tensor  # [R, Kmax], 0 for padding


class ResidualStream:
    """The stacked residual rows of the slices of one hidden size, deepest model first."""

    def __init__(self, slices: list[ModelSlice], members: list[int], plans: PlanCache | None) -> None:
        self.members = sorted(members, key=lambda j: -slices[j].model.config.num_layers)  # stable
        self.bounds: list[tuple[int, int]] = []  # rows [start, end) of each member
        eps: list[tuple[float, int]] = []  # per member: (its norms' eps, its rows)
        for j in self.members:
            rows = slices[j].h.shape[0]
            start = self.bounds[-1][1] if self.bounds else 0
            self.bounds.append((start, start + rows))
            eps.append((slices[j].model.config.rms_norm_eps, rows))
        self.layers = [slices[j].model.config.num_layers for j in self.members]
        first = slices[self.members[0]].h  # one member: its embedding is the stream (updated in place)
        self.h = torch.cat([slices[j].h for j in self.members]) if len(self.members) > 1 else first
        key = ("eps", tuple(eps), first.device)
        self.eps = plan(plans, key, lambda: _eps_column(eps, first.device))  # [R, 1]
        self.kv_write, self.kv_gather = _shared_kv([slices[j] for j in self.members], self.layers, plans)

    def num_live(self, layer: int) -> int:
        """Members that have layer `layer` (a prefix: members are sorted by depth)."""
        return sum(1 for n in self.layers if n > layer)


class LockstepBatch:
    """Drives a list of model slices through their layers, one layer index at a time."""

    def __init__(self, slices: list[ModelSlice], plans: PlanCache | None = None) -> None:
        self.slices = slices
        self.plans = plans  # structure plans kept across steps (the runner's), see layers/plan_cache.py
        self.num_layers = max((s.model.config.num_layers for s in slices), default=0)
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # see _group_tables
        self._planned: dict[int, AttentionMetadata] = {}  # backend id -> the metadata it was planned for
        self._masks: dict[tuple, torch.Tensor] = {}  # see _group_mask
        self._route_pads: tuple[torch.Tensor, torch.Tensor] | None = None
        by_width: dict[int, list[int]] = {}
        for j, s in enumerate(slices):
            by_width.setdefault(s.h.shape[1], []).append(j)
        self.streams = [ResidualStream(slices, members, plans) for members in by_width.values()]
        self._live_rows: list[int] = []  # per stream: rows that ran the current layer

    def attention_and_route(self, layer: int) -> FFNBatch:
        """Layer `layer`'s attention half of every slice that has it, then the combined FFN input."""
        live_of = [(st, st.num_live(layer)) for st in self.streams]
        live = [j for st, n in live_of for j in st.members[:n]]
        self._live_rows = [st.bounds[n - 1][1] if n else 0 for st, n in live_of]
        xs, routes, shapes = [], [], []
        for st, n in live_of:
            if n:
                xs.append(self._attention_half(st, n, layer, routes, shapes, alone=len(live) == 1))
        width = max(x.shape[1] for x in xs)
        x = xs[0] if len(xs) == 1 else torch.cat([F.pad(x, (0, width - x.shape[1])) for x in xs])
        if len(routes) == 1:
            return FFNBatch(layer, live, x, *routes[0])
        key = ("routes", tuple(shapes), x.device)
        layout = plan(self.plans, key, lambda: RouteLayout.build(shapes, x.device))
        if self._route_pads is None:
            self._route_pads = (
                torch.tensor([-1], dtype=torch.int64, device=x.device),
                torch.tensor([0, 1], dtype=x.dtype, device=x.device),
            )
        return FFNBatch(layer, live, x, *stack_routes(layout, routes, self._route_pads))

    def _attention_half(
        self, st: ResidualStream, n: int, layer: int, routes: list, shapes: list, alone: bool
    ) -> torch.Tensor:
        """Attention of the stream's first n members (in place on its residual rows), their routes
        appended to routes/shapes (`stack_routes`' inputs; a dense layer's is its slot ids unless
        the member is `alone` in the call); returns the FFN input [R, H] of those rows."""
        members, bounds = st.members[:n], st.bounds[:n]
        rows = bounds[-1][1]
        h, eps = st.h[:rows], st.eps[:rows]
        norms = self._norm_weights(members, bounds, layer)  # [2, R, H]
        x = rms_norm_rows(h, norms[0], eps)
        outs = self._attention(st, members, bounds, layer, x)
        h += torch.cat(outs) if n > 1 else outs[0]
        x = rms_norm_rows(h, norms[1], eps)
        for j, (a, b), xj in zip(members, bounds, _split_rows(x, bounds), strict=True):
            model = self.slices[j].model
            lw = model.weights.layers[layer]
            if lw.router is None and not alone:  # one slot, weight 1: nothing to compute
                routes.append(lw.ffn_slots)
                shapes.append((b - a, None))
            else:
                ids, w = model.ffn_routing(lw, xj)
                routes.append((ids, w))
                shapes.append((b - a, ids.shape[1]))
        return x

    def _attention(self, st: ResidualStream, members: list[int], bounds, layer: int, x) -> list:
        """Each member's attention output [T, H] of layer `layer` from its normed rows of x; with
        the stream's shared K/V write, every member's K/V go into the arena in one indexed copy."""
        xs = _split_rows(x, bounds)
        if st.kv_write is None:
            outs = []
            for j, xj in zip(members, xs, strict=True):
                s = self.slices[j]
                self._plan(s)
                lw = s.model.weights.layers[layer]
                outs.append(s.model.attention(layer, lw, xj, s.positions, s.meta, s.kv))
            return outs
        pre = [  # per member: normalised qk [T, Hq + Hkv, D], v [T, Hkv * D]
            self.slices[j].model.qk_v(self.slices[j].model.weights.layers[layer], xj)
            for j, xj in zip(members, xs, strict=True)
        ]
        qks = self._rotate(members, [qk for qk, _ in pre])
        heads = [  # per member (q, k, v)
            self.slices[j].model.split_qk(qk, v) for j, qk, (_, v) in zip(members, qks, pre, strict=True)
        ]
        st.kv_write.write(layer, [k for _, k, _ in heads], [v for _, _, v in heads])
        if st.kv_gather is None:
            outs = []
            for j, (q, _, _) in zip(members, heads, strict=True):
                s = self.slices[j]
                outs.append(s.model.attend_written(layer, s.model.weights.layers[layer], q, s.meta, s.kv))
            return outs
        qs = [q for q, _, _ in heads]
        attn = self._decode_attention(members, layer, qs, st.kv_gather.gather(layer))
        return [
            self.slices[j].model.project_out(self.slices[j].model.weights.layers[layer], a)
            for j, a in zip(members, attn, strict=True)
        ]

    def _decode_attention(self, members: list[int], layer: int, qs: list, gathered: list) -> list:
        """Each member's decode attention [B, Hq, D] over its gathered (keys, values).

        On a CPU torch runs single-threaded, members whose q and keys have one shape (heads, head
        dim, keys), dtype and scale, without sinks, attend in ONE SDPA call over their rows stacked,
        each row masked by its own model's mask: there a row's values do not depend on the other
        rows, bit for bit. With more threads (and on CUDA) the kernel splits its work by the batch's
        size, so a row can round differently in a larger batch (measured: 71 of 108 shapes off by
        ~6e-8 at 2 threads, none at 1); each member then attends in its own call."""
        out: list[torch.Tensor | None] = [None] * len(members)
        groups: dict[tuple, list[int]] = {}
        stackable = qs[0].device.type == "cpu" and torch.get_num_threads() == 1
        for i, (j, q, (keys, _)) in enumerate(zip(members, qs, gathered, strict=True)):
            model, sinks = self.slices[j].model, self.slices[j].model.weights.layers[layer].sinks
            if sinks is None:
                shape = (q.shape[1:], keys.shape[1:], q.dtype) if stackable else i
                groups.setdefault((shape, model.scale), []).append(i)
            else:  # sinks join its softmax: it attends alone
                window = model.config.sliding_windows[layer]
                meta = self.slices[j].meta
                out[i] = model.attn_backend.attend_gathered(q, *gathered[i], meta, model.scale, window, sinks)
        for (_, scale), idxs in groups.items():
            mask = self._group_mask(layer, tuple(members[i] for i in idxs), qs[idxs[0]].dtype)
            stack = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs)  # noqa: E731
            attn = TorchAttentionBackend.attend_rows(
                stack([qs[i] for i in idxs]),
                stack([gathered[i][0] for i in idxs]),
                stack([gathered[i][1] for i in idxs]),
                mask,
                scale,
            )  # [sum B, Hq, D]
            start = 0
            for i in idxs:
                out[i] = attn[start : start + qs[i].shape[0]]
                start += qs[i].shape[0]
        return out

    def _group_mask(self, layer: int, group: tuple[int, ...], dtype) -> torch.Tensor:
        """The additive decode masks [sum B, 1, 1, S] of `group`'s rows stacked, built once per
        step and set of windows (the same at every layer index with the same windows)."""
        windows = tuple(self.slices[j].model.config.sliding_windows[layer] for j in group)
        key = (group, windows, dtype)
        mask = self._masks.get(key)
        if mask is None:
            masks = [
                TorchAttentionBackend.decode_mask(self.slices[j].meta, w, dtype)
                for j, w in zip(group, windows, strict=True)
            ]
            mask = self._masks[key] = masks[0] if len(masks) == 1 else torch.cat(masks)
        return mask

    def _rotate(self, members: list[int], qks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each member's qk [T, Hq + Hkv, D] rotated. Members with a Llama-style rotation over the
        whole head of one D and dtype rotate together: their rows stacked [N, D] with each row's
        own cos/sin (built once per step), one `rotate_halves` — the same elementwise formula."""
        out: list[torch.Tensor | None] = [None] * len(members)
        groups: dict[tuple, list[int]] = {}
        for i, (j, qk) in enumerate(zip(members, qks, strict=True)):
            rot = self.slices[j].model.rotary
            if rot.interleaved or rot.rotary_dim != qk.shape[-1]:
                out[i] = rot.rotate(self.slices[j].positions, qk, self.slices[j].meta.step_cache)
            else:
                groups.setdefault((qk.shape[-1], qk.dtype), []).append(i)
        for (d, dtype), idxs in groups.items():
            cos, sin = self._group_tables(tuple(members[i] for i in idxs), [qks[i] for i in idxs], dtype)
            rows = (
                qks[idxs[0]].reshape(-1, d)
                if len(idxs) == 1
                else torch.cat([qks[i].reshape(-1, d) for i in idxs])
            )
            rotated = rotate_halves(rows, cos, sin)  # [N, D]
            start = 0
            for i in idxs:
                n = qks[i].shape[0] * qks[i].shape[1]
                out[i] = rotated[start : start + n].view(qks[i].shape)
                start += n
        return out

    def _group_tables(
        self, group: tuple[int, ...], qks: list[torch.Tensor], dtype
    ) -> tuple[torch.Tensor, ...]:
        """cos, sin [N, D] of the rows of `group`'s stacked qk, built once per step at layer 0: the
        groups of later layers are prefixes of it (members are sorted by depth), so their rows too."""
        key = (group[0], dtype)  # a stream's group of one D and dtype starts with the same member
        rows = sum(qk.shape[0] * qk.shape[1] for qk in qks)
        if key not in self._rope_tables:
            self._rope_tables[key] = stacked_tables(
                [self.slices[j].model.rotary for j in group],
                [self.slices[j].positions for j in group],
                [qk.shape[1] for qk in qks],
                dtype,
                self.plans,
            )
        cos, sin = self._rope_tables[key]
        return (cos, sin) if cos.shape[0] == rows else (cos[:rows], sin[:rows])

    def _norm_weights(self, members: list[int], bounds, layer: int) -> torch.Tensor:
        """Each row's input and post-attention norm weights [2, R, H] (views when one row each)."""
        pairs = []
        for j, (a, b) in zip(members, bounds, strict=True):
            pair = self.slices[j].model.norm_pairs[layer]  # [2, 1, H]
            pairs.append(pair if b - a == 1 else pair.expand(2, b - a, pair.shape[2]))
        return torch.cat(pairs, dim=1) if len(pairs) > 1 else pairs[0]

    def add_ffn(self, batch: FFNBatch, out: torch.Tensor) -> None:
        """out [R, Hmax] -> each stream's live rows and first H columns added to its residual."""
        start = 0
        for st, rows in zip(self.streams, self._live_rows, strict=True):
            if rows:
                part = out[start : start + rows]
                st.h[:rows] += part if part.shape[1] == st.h.shape[1] else part[:, : st.h.shape[1]]
                start += rows
        if batch.layer + 1 == self.num_layers:
            self.finish()

    def finish(self) -> None:
        """Final norm of every slice (each after its own last layer; all of them end here)."""
        for st in self.streams:
            weights = []
            for j, (a, b) in zip(st.members, st.bounds, strict=True):
                w = self.slices[j].model.weights.final_norm
                weights.append(w.expand(b - a, w.shape[0]))
            out = rms_norm_rows(st.h, torch.cat(weights) if len(weights) > 1 else weights[0], st.eps)
            for j, (a, b) in zip(st.members, st.bounds, strict=True):
                self.slices[j].h = out[a:b]

    def _plan(self, s: ModelSlice) -> None:
        """init_forward when the slice's backend was last planned for other metadata: backends are
        shared by models, so with several models a planning backend (FlashInfer) re-plans per slice."""
        backend = s.model.attn_backend
        if self._planned.get(id(backend)) is not s.meta:
            backend.init_forward(s.meta)
            self._planned[id(backend)] = s.meta


def _split_rows(x: torch.Tensor, bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
    """Each member's rows of x (views): one `split` call, not one slice per member."""
    return (x,) if len(bounds) == 1 else x.split([b - a for a, b in bounds])


def _eps_column(eps: list[tuple[float, int]], device: torch.device) -> torch.Tensor:
    """[R, 1] each row's own model's RMSNorm eps ((eps, rows) per member)."""
    rows = [e for e, n in eps for _ in range(n)]
    return torch.tensor(rows, dtype=torch.float32, device=device)[:, None]


def _shared_kv(members: list[ModelSlice], layers: list[int], plans: PlanCache | None):
    """The stream's one-copy K/V write (and, for a decode step, one-op page gather) when two or
    more members attend with the torch backend (which can attend after the write) on views of one
    arena; (None, None): each member writes and gathers its own."""
    if len(members) < 2 or not all(
        type(s.model.attn_backend) is TorchAttentionBackend and s.model.weights.layers[0].mla is None
        for s in members
    ):
        return None, None
    kvs, metas = [s.kv for s in members], [s.meta for s in members]
    if not shares_arena(kvs):
        return None, None
    order = [[j for j, n in enumerate(layers) if n > i] for i in range(max(layers))]  # live prefixes
    if not all(m.is_decode for m in metas):
        return SharedKVWrite(kvs, metas, order, plans), None
    pages = TorchAttentionBackend.plan_decode_many(metas, members[0].h.dtype)
    return SharedKVWrite(kvs, metas, order, plans), SharedKVGather(kvs, metas, order, pages, plans)


def pool_ffn(slices: list[ModelSlice]) -> FFNFn:
    """The colocated FFN: `run_ffn` on the weights pool every model of the batch shares."""
    pools = {id(s.model.weight_pool): s.model.weight_pool for s in slices}
    if len(pools) != 1:
        raise ValueError(f"a lockstep batch needs one shared weights pool, its models use {len(pools)}")
    pool = next(iter(pools.values()))
    return lambda x, slots, weights: moe.run_ffn(pool, x, slots, weights)


@torch.inference_mode()
def lockstep_forward(
    slices: list[ModelSlice], ffn: FFNFn | None = None, plans: PlanCache | None = None
) -> list[torch.Tensor]:
    """Every slice's final-normed hidden states [T, H], with one `ffn` call per layer index; `plans`
    keeps the index tensors of the batch's structure for the next step of the same structure."""
    if not slices:
        return []
    batch = LockstepBatch(slices, plans)
    ffn = ffn or pool_ffn(slices)
    for layer in range(batch.num_layers):
        step = batch.attention_and_route(layer)
        batch.add_ffn(step, ffn(step.x, step.slots, step.weights))
    return [s.h for s in slices]
