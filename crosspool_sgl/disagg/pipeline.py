"""The layer-wise pipeline: attention here, FFN on the workers, micro-batches ping-ponged.

A step's batch is cut into pieces, never inside a request (attention metadata is
per request) and never across models (attention is per model); the pieces are
then dealt into micro-batches that run in lockstep (models/lockstep.py): a
micro-batch may carry several models, and each of its layers is ONE FFN request
with every model's rows (padded to the widest hidden size and slot list).
Interleaved, the loop is::

    for each micro-batch in turn:
        wait for its FFN of layer i-1, add it to the residuals
        attention of layer i of each of its models, route, post one FFN request (isend/irecv)

so while the workers run micro-batch j's FFN (and the hidden states travel),
this side runs attention for micro-batch j+1. With one micro-batch (every model
of the step in it) each FFN is waited for right after it is sent: nothing
overlaps, and a step sends as many FFN requests as its deepest model has layers.
`lockstep=False` keeps the old shape (one model per micro-batch) for comparison.

Legend: T = tokens of a micro-batch, H = hidden size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from crosspool_sgl.core.model_runner import ModelRunner, StepResult, pack_batch
from crosspool_sgl.core.req import Req
from crosspool_sgl.disagg.remote_ffn import PendingFFN, RemoteFFN
from crosspool_sgl.disagg.trace import FFNCall, StepTrace
from crosspool_sgl.mem.kv_pool import KVPool
from crosspool_sgl.models.decoder import DecoderModel
from crosspool_sgl.models.lockstep import FFNBatch, LockstepBatch, ModelSlice

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


def deal_micro_batches(pieces: list[tuple[str, Group]], target: int) -> list[list[int]]:
    """Piece indices dealt into `target` micro-batches (or fewer), largest piece to the lightest
    micro-batch; each micro-batch lists its pieces in order, so a model's pieces concatenate back."""
    loads: list[tuple[int, list[int]]] = [(0, []) for _ in range(max(1, min(target, len(pieces))))]
    by_size = sorted(range(len(pieces)), key=lambda j: -sum(n for _, n in pieces[j][1]))
    for j in by_size:
        k = min(range(len(loads)), key=lambda i: loads[i][0])
        load, members = loads[k]
        loads[k] = (load + sum(n for _, n in pieces[j][1]), members + [j])
    return [sorted(members) for _, members in loads if members]


@dataclass
class MicroBatch:
    """One micro-batch's state as it moves through the layers: a lockstep batch of model slices."""

    index: int
    pieces: list[int]  # indices of the step's pieces it carries
    batch: LockstepBatch
    layer: int = 0  # next layer whose attention runs
    pending: PendingFFN | None = None
    step: FFNBatch | None = None
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
        lockstep: bool = True,
    ) -> None:
        super().__init__(models, kv_pool, device, lockstep=lockstep)
        self.ffn = ffn
        self.micro_batches = micro_batches  # 0: by batch size
        self.last_trace: StepTrace | None = None

    def run(self, items: list[tuple[Req, int]]) -> dict[str, StepResult]:
        groups: dict[str, Group] = {}
        for req, n in items:
            groups.setdefault(req.model, []).append((req, n))
        target = choose_num_micro_batches(self.micro_batches, sum(n for _, n in items), len(items))
        pieces = split_micro_batches(groups, target)
        slices = [self._prepare(m, g) for m, g in pieces]
        if self.lockstep:
            dealt = deal_micro_batches(pieces, target)
        else:  # the old shape: one model's piece per micro-batch
            dealt = [[j] for j in range(len(pieces))]
        plans = self.lockstep_plans  # micro-batch structures recur from step to step, like whole steps
        mbs = [MicroBatch(i, js, LockstepBatch([slices[j] for j in js], plans)) for i, js in enumerate(dealt)]
        trace = StepTrace(len(mbs), interleaved=target > 1, start=time.perf_counter())
        if trace.interleaved or len(mbs) == 1:
            self._drive(mbs, trace)
        else:
            for mb in mbs:
                self._drive([mb], trace)
        results: dict[str, StepResult] = {}
        for name in groups:
            own = [j for j, (m, _) in enumerate(pieces) if m == name]
            hidden = torch.cat([slices[j].h for j in own]) if len(own) > 1 else slices[own[0]].h
            group = [item for j in own for item in pieces[j][1]]
            results.update(self._logits_and_sample(self.models[name], group, hidden))
        trace.end = time.perf_counter()
        self.last_trace = trace
        return results

    def _prepare(self, name: str, group: Group) -> ModelSlice:
        """Embedded tokens, positions and attention metadata of one piece (as ModelRunner does)."""
        ids, positions, meta = pack_batch(group, self.kv_pool.page_tokens, self.device)
        return ModelSlice.embed(self.models[name], ids, positions, meta, self.kv_pool.kv_view(name))

    @torch.inference_mode()
    def _drive(self, mbs: list[MicroBatch], trace: StepTrace) -> None:
        """Round-robin over the micro-batches until each has run every layer (final hidden in the slices)."""
        active = list(mbs)
        while active:
            for mb in list(active):
                if mb.pending is not None:
                    self._finish_ffn(mb)
                if mb.layer == mb.batch.num_layers:
                    active.remove(mb)
                    continue
                trace.calls.append(self._start_layer(mb))

    def _start_layer(self, mb: MicroBatch) -> FFNCall:
        i = mb.layer
        t0 = time.perf_counter()
        step = mb.batch.attention_and_route(i)  # every model of the micro-batch that has layer i
        t1 = time.perf_counter()
        mb.pending = self.ffn.submit(step.x, step.slots, step.weights)
        mb.step = step
        names = "+".join(dict.fromkeys(mb.batch.slices[j].model.name for j in step.slices))
        mb.call = FFNCall(mb.index, names, i, t0, t1, time.perf_counter())
        mb.layer += 1
        return mb.call

    def _finish_ffn(self, mb: MicroBatch) -> None:
        assert mb.pending is not None and mb.call is not None and mb.step is not None
        mb.call.wait_start = time.perf_counter()
        out = self.ffn.wait(mb.pending, self.device)
        mb.call.wait_end = time.perf_counter()
        parts = [w for w, _ in mb.pending.parts]
        mb.call.worker_times = [
            (w, t[0], t[1]) for w, t in zip(parts, mb.pending.worker_times or [], strict=True)
        ]
        mb.batch.add_ffn(mb.step, out)  # the final norms too, after the last layer
        mb.pending = mb.step = None
