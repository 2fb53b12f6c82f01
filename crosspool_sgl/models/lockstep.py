"""Several models' forward passes in lockstep: one FFN call per layer index for all of them.

A step of M models run one after the other costs M * L FFN launches; every model's FFN
weights live in one weights pool and `run_ffn` takes any mix of slots, so the models can
instead walk their layers together::

    for i in range(max layers):
        attention half of layer i of every model that has one (models with fewer layers are done)
        each model routes its FFN input with its own router: global weights-pool slot ids
        ONE FFN call over the concatenated rows: hidden widths padded to Hmax, slot lists to
            Kmax with slot -1 / weight 0 (padding in the kernel contract, see kernels/fused_moe.py)
        split the output back by rows, add each model's first H columns to its residual

Embedding, final norm, logits and sampling stay per model (the model runner's job). With one
model the FFN call gets that model's tensors untouched: the same call as `DecoderModel.forward`.
The FFN is a callable so the disaggregated pipeline can send the combined rows to its
workers instead (crosspool_sgl/disagg/pipeline.py drives `LockstepBatch` layer by layer).

Legend: T = tokens of one model, R = rows of the combined call (sum of T), H = one model's
hidden size, Hmax = the widest H of the step, K = slots per token of one model, Kmax = widest K.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crosspool_sgl.layers import moe
from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.norm import rms_norm
from crosspool_sgl.models.decoder import DecoderModel

FFNFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # x, slots, weights -> out


@dataclass
class ModelSlice:
    """One model's share of a lockstep batch (whole requests of one model)."""

    model: DecoderModel
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    kv: torch.Tensor  # the model's view of the KV pool
    h: torch.Tensor  # [T, H] residual stream; the final-normed hidden states once done

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


class LockstepBatch:
    """Drives a list of model slices through their layers, one layer index at a time."""

    def __init__(self, slices: list[ModelSlice]) -> None:
        self.slices = slices
        self.num_layers = max((s.model.config.num_layers for s in slices), default=0)
        self._planned: dict[int, AttentionMetadata] = {}  # backend id -> the metadata it was planned for

    def attention_and_route(self, layer: int) -> FFNBatch:
        """Layer `layer`'s attention half of every slice that has it, then the combined FFN input."""
        live = [j for j, s in enumerate(self.slices) if layer < s.model.config.num_layers]
        xs, slots, weights = [], [], []
        for j in live:
            s = self.slices[j]
            self._plan(s)
            s.h, x = s.model.attention_half(layer, s.h, s.positions, s.meta, s.kv)
            ids, w = s.model.ffn_routing(s.model.weights.layers[layer], x)
            xs.append(x)
            slots.append(ids)
            weights.append(w)
        if len(live) == 1:
            return FFNBatch(layer, live, xs[0], slots[0], weights[0])
        width = max(x.shape[1] for x in xs)
        k = max(ids.shape[1] for ids in slots)
        return FFNBatch(
            layer,
            live,
            torch.cat([F.pad(x, (0, width - x.shape[1])) for x in xs]),
            torch.cat([F.pad(ids.long(), (0, k - ids.shape[1]), value=-1) for ids in slots]),
            torch.cat([F.pad(w, (0, k - w.shape[1])) for w in weights]),
        )

    def add_ffn(self, batch: FFNBatch, out: torch.Tensor) -> None:
        """out [R, Hmax] -> each slice's rows and first H columns added to its residual."""
        start = 0
        for j in batch.slices:
            s = self.slices[j]
            rows, hidden = s.h.shape
            part = out[start : start + rows]
            s.h = s.h + (part if part.shape[1] == hidden else part[:, :hidden])
            start += rows
        if batch.layer + 1 == self.num_layers:
            self.finish()

    def finish(self) -> None:
        """Final norm of every slice (each after its own last layer; all of them end here)."""
        for s in self.slices:
            s.h = rms_norm(s.h, s.model.weights.final_norm, s.model.config.rms_norm_eps)

    def _plan(self, s: ModelSlice) -> None:
        """init_forward when the slice's backend was last planned for other metadata: backends are
        shared by models, so with several models a planning backend (FlashInfer) re-plans per slice."""
        backend = s.model.attn_backend
        if self._planned.get(id(backend)) is not s.meta:
            backend.init_forward(s.meta)
            self._planned[id(backend)] = s.meta


def pool_ffn(slices: list[ModelSlice]) -> FFNFn:
    """The colocated FFN: `run_ffn` on the weights pool every model of the batch shares."""
    pools = {id(s.model.weight_pool): s.model.weight_pool for s in slices}
    if len(pools) != 1:
        raise ValueError(f"a lockstep batch needs one shared weights pool, its models use {len(pools)}")
    pool = next(iter(pools.values()))
    return lambda x, slots, weights: moe.run_ffn(pool, x, slots, weights)


@torch.inference_mode()
def lockstep_forward(slices: list[ModelSlice], ffn: FFNFn | None = None) -> list[torch.Tensor]:
    """Every slice's final-normed hidden states [T, H], with one `ffn` call per layer index."""
    if not slices:
        return []
    batch = LockstepBatch(slices)
    ffn = ffn or pool_ffn(slices)
    for layer in range(batch.num_layers):
        step = batch.attention_and_route(layer)
        batch.add_ffn(step, ffn(step.x, step.slots, step.weights))
    return [s.h for s in slices]
