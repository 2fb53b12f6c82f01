"""The layer-wise pipeline: attention here, FFN on the workers, micro-batches ping-ponged.

A step's batch is cut into micro-batches, never inside a request (attention
metadata is per request) and never across models (attention is per model), so
several models' requests are natural micro-batches. Interleaved, the loop is::

    for each micro-batch in turn:
        wait for its FFN of layer i-1, add it to the residual
        attention of layer i, route, post the FFN request (isend/irecv)

so while the workers run micro-batch j's FFN (and the hidden states travel),
this side runs attention for micro-batch j+1. With one micro-batch each FFN is
waited for right after it is sent: nothing overlaps (the baseline the
benchmark compares against).

Legend: T = tokens of a micro-batch, H = hidden size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crosspool_sgl.core.model_runner import ModelRunner, StepResult, pack_batch
from crosspool_sgl.core.req import Req
from crosspool_sgl.disagg.remote_ffn import PendingFFN, RemoteFFN
from crosspool_sgl.disagg.trace import FFNCall, StepTrace
from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.norm import rms_norm
from crosspool_sgl.mem.kv_pool import KVPool
from crosspool_sgl.models.decoder import DecoderModel

Group = list[tuple[Req, int]]  # (request, new tokens this step)

# Auto mode keeps a batch whole below this many tokens per micro-batch: on CPU/gloo one FFN
# round trip costs ~0.1-0.2 ms of fixed overhead, more than a 1-2 token attention takes.
AUTO_MIN_TOKENS_PER_MICRO_BATCH = 4


def choose_num_micro_batches(requested: int, num_tokens: int, num_reqs: int) -> int:
    """`requested` when set (>0); else 2 for a batch big enough to split, 1 for a tiny one."""
    if requested > 0:
        return requested
    if num_reqs < 2 or num_tokens < 2 * AUTO_MIN_TOKENS_PER_MICRO_BATCH:
        return 1
    return 2


def split_micro_batches(groups: dict[str, Group], target: int) -> list[tuple[str, Group]]:
    """One micro-batch per model, then halve the largest (by tokens) until `target` are reached.

    Halves keep request order, so a model's micro-batches concatenate back to its group.
    """
    mbs: list[tuple[str, Group]] = [(m, g) for m, g in groups.items() if g]
    while len(mbs) < target:
        splittable = [i for i, (_, g) in enumerate(mbs) if len(g) > 1]
        if not splittable:
            break
        i = max(splittable, key=lambda j: sum(n for _, n in mbs[j][1]))
        model, group = mbs[i]
        half, acc, cut = sum(n for _, n in group) / 2, 0, 1
        for k, (_, n) in enumerate(group[:-1]):
            acc += n
            cut = k + 1
            if acc >= half:
                break
        mbs[i : i + 1] = [(model, group[:cut]), (model, group[cut:])]
    return mbs


@dataclass
class MicroBatch:
    """One micro-batch's state as it moves through the layers."""

    index: int
    model: DecoderModel
    group: Group
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    kv: torch.Tensor
    h: torch.Tensor  # [T, H] residual stream
    layer: int = 0  # next layer whose attention runs
    pending: PendingFFN | None = None
    call: FFNCall | None = None


class PipelinedModelRunner(ModelRunner):
    """ModelRunner whose FFNs run on remote workers, micro-batched and overlapped."""

    def __init__(
        self,
        models: dict[str, DecoderModel],
        kv_pool: KVPool,
        device: torch.device,
        ffn: RemoteFFN,
        micro_batches: int = 0,
    ) -> None:
        super().__init__(models, kv_pool, device)
        self.ffn = ffn
        self.micro_batches = micro_batches  # 0: by batch size
        self.last_trace: StepTrace | None = None

    def run(self, items: list[tuple[Req, int]]) -> dict[str, StepResult]:
        groups: dict[str, Group] = {}
        for req, n in items:
            groups.setdefault(req.model, []).append((req, n))
        target = choose_num_micro_batches(self.micro_batches, sum(n for _, n in items), len(items))
        mbs = [self._prepare(i, m, g) for i, (m, g) in enumerate(split_micro_batches(groups, target))]
        trace = StepTrace(len(mbs), interleaved=target > 1, start=time.perf_counter())
        if trace.interleaved:
            self._drive(mbs, trace)
        else:
            for mb in mbs:
                self._drive([mb], trace)
        results: dict[str, StepResult] = {}
        for name in groups:
            own = [mb for mb in mbs if mb.model.name == name]
            hidden = torch.cat([mb.h for mb in own]) if len(own) > 1 else own[0].h
            group = [item for mb in own for item in mb.group]
            results.update(self._logits_and_sample(self.models[name], group, hidden))
        trace.end = time.perf_counter()
        self.last_trace = trace
        return results

    def _prepare(self, index: int, name: str, group: Group) -> MicroBatch:
        """Token ids, positions and attention metadata of a micro-batch (as ModelRunner._run_model)."""
        model = self.models[name]
        ids, positions, meta = pack_batch(group, self.kv_pool.page_tokens, self.device)
        h = F.embedding(ids, model.weights.embed)
        return MicroBatch(index, model, group, positions, meta, self.kv_pool.kv_view(name), h)

    @torch.inference_mode()
    def _drive(self, mbs: list[MicroBatch], trace: StepTrace) -> None:
        """Round-robin over the micro-batches until each has run every layer; leaves final hidden in mb.h."""
        active = list(mbs)
        while active:
            for mb in list(active):
                if mb.pending is not None:
                    self._finish_ffn(mb)
                if mb.layer == mb.model.config.num_layers:
                    cfg = mb.model.config
                    mb.h = rms_norm(mb.h, mb.model.weights.final_norm, cfg.rms_norm_eps)
                    active.remove(mb)
                    continue
                trace.calls.append(self._start_layer(mb))

    def _start_layer(self, mb: MicroBatch) -> FFNCall:
        model, i = mb.model, mb.layer
        t0 = time.perf_counter()
        # The attention backend is shared by every model and micro-batch: re-plan for this one.
        model.attn_backend.init_forward(mb.meta)
        mb.h, x = model.attention_half(i, mb.h, mb.positions, mb.meta, mb.kv)
        slots, weights = model.ffn_routing(model.weights.layers[i], x)
        t1 = time.perf_counter()
        mb.pending = self.ffn.submit(x, slots, weights)
        mb.call = FFNCall(mb.index, model.name, i, t0, t1, time.perf_counter())
        mb.layer += 1
        return mb.call

    def _finish_ffn(self, mb: MicroBatch) -> None:
        assert mb.pending is not None and mb.call is not None
        mb.call.wait_start = time.perf_counter()
        out = self.ffn.wait(mb.pending, self.device)
        mb.call.wait_end = time.perf_counter()
        parts = [w for w, _ in mb.pending.parts]
        mb.call.worker_times = [
            (w, t[0], t[1]) for w, t in zip(parts, mb.pending.worker_times or [], strict=True)
        ]
        mb.h = mb.h + out
        mb.pending = None
