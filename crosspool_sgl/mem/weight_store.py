"""Moves a model's experts between the weights-pool arena and host memory, expert by expert.

Eviction copies every expert block of a model into one host buffer (pinned
when the arena is on CUDA, so the way back is an async DMA) and frees the
blocks; page-in takes new blocks, points the slots at them and copies the
bytes back in layer order. On CUDA the copies run on a side stream, one event
per layer, so later layers keep arriving while other models' steps run; the
model is ready when its last event has completed. On CPU a page-in moves at
most ``max_bytes`` per call, so the scheduler can interleave it with other
models' steps (a bounded stall instead of a whole-model one).

The host copy is dropped once the model is resident again, so host bytes are
exactly the evicted models' bytes (no leak to track; a re-eviction copies again).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from crosspool_sgl.mem.weight_pool import WeightPool


@dataclass
class HostCopy:
    """One evicted model: a flat host buffer and where each slot's block sits in it."""

    buffer: torch.Tensor  # [N] on CPU, pinned on CUDA
    slot_to_offset: dict[int, int]


@dataclass
class PageInJob:
    """A model on its way back: slots still to copy, in layer order, and per-layer events (CUDA)."""

    model: str
    pending: list[int]
    events: list = field(default_factory=list)  # torch.cuda.Event per layer enqueued
    num_bytes: int = 0


class WeightStore:
    def __init__(self, pool: WeightPool, pin: bool | None = None) -> None:
        self.pool = pool
        self.pin = pool.device.type == "cuda" if pin is None else pin
        self.stream = torch.cuda.Stream(pool.device) if pool.device.type == "cuda" else None
        self.host: dict[str, HostCopy] = {}
        self.jobs: dict[str, PageInJob] = {}

    # ---- out ------------------------------------------------------------------------------
    def evict(self, model: str) -> int:
        """Copy every expert of ``model`` to host memory and free its arena blocks; returns bytes."""
        assert model not in self.jobs, f"{model} is being paged in"
        slots = [s for s in self.pool.model_to_slots[model] if self.pool.is_resident(s)]
        total = sum(self.pool.slot_elements(s) for s in slots)
        buffer = torch.empty(total, dtype=self.pool.dtype, pin_memory=self.pin)
        offsets, cursor = {}, 0
        for s in slots:
            n = self.pool.slot_elements(s)
            buffer[cursor : cursor + n].copy_(self.pool.block(s))  # synchronous: the block is reused next
            offsets[s] = cursor
            cursor += n
        for s in slots:
            self.pool.unmap_slot(s)
        self.host[model] = HostCopy(buffer, offsets)
        return total * buffer.element_size()

    # ---- in -------------------------------------------------------------------------------
    def begin_page_in(self, model: str) -> PageInJob:
        """Take arena blocks for every expert of ``model`` (raises WeightPoolFullError if short)."""
        if model in self.jobs:
            return self.jobs[model]
        if self.stream is not None:
            self.stream.synchronize()  # compaction may move blocks: nothing may be in flight
        copy = self.host[model]
        slots = sorted(copy.slot_to_offset)
        # grows the arena (up to its bound) or compacts it, so the blocks below all fit
        self.pool.reserve(sum(self.pool.slot_elements(s) for s in slots))
        mapped = []
        try:
            for s in slots:
                self.pool.map_slot(s)
                mapped.append(s)
        except Exception:
            for s in mapped:  # roll back: all or nothing
                self.pool.unmap_slot(s)
            raise
        job = PageInJob(model, slots)
        self.jobs[model] = job
        return job

    def advance(self, model: str, max_bytes: int | None = None) -> bool:
        """Copy the next layers' experts in (async on CUDA); True once the model is fully resident."""
        job = self.jobs[model]
        copy = self.host[model]
        elem = copy.buffer.element_size()
        moved = 0
        while job.pending:
            s = job.pending[0]
            n = self.pool.slot_elements(s)
            if max_bytes is not None and moved and moved + n * elem > max_bytes:
                break  # at least one expert per call, else stay within the budget
            job.pending.pop(0)
            src = copy.buffer[copy.slot_to_offset[s] : copy.slot_to_offset[s] + n]
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    self.pool.block(s).copy_(src, non_blocking=True)
                if not job.pending or self._layer_ends(s, job.pending[0]):
                    job.events.append(self.stream.record_event())
            else:
                self.pool.block(s).copy_(src)
            moved += n * elem
        job.num_bytes += moved
        return self._finish_if_done(job)

    def wait(self, model: str) -> None:
        """Block until ``model`` is fully resident (the runner's fallback)."""
        if model not in self.jobs:
            return
        self.advance(model)
        job = self.jobs.get(model)
        if job is not None:
            for ev in job.events:
                ev.synchronize()
            self._finish_if_done(job)

    def cancel(self, model: str) -> None:
        """Drop a half-done page-in (the host copy is still whole)."""
        self.jobs.pop(model)
        if self.stream is not None:
            self.stream.synchronize()
        for s in self.host[model].slot_to_offset:
            if self.pool.is_resident(s):
                self.pool.unmap_slot(s)

    # ---- accounting -----------------------------------------------------------------------
    def host_bytes(self, model: str | None = None) -> int:
        copies = self.host.values() if model is None else [self.host[model]] if model in self.host else []
        return sum(c.buffer.numel() * c.buffer.element_size() for c in copies)

    @property
    def pinned_bytes(self) -> int:
        return self.host_bytes() if self.pin else 0

    def _layer_ends(self, slot: int, next_slot: int) -> bool:
        return self.pool.slot_layer(slot) != self.pool.slot_layer(next_slot)

    def _finish_if_done(self, job: PageInJob) -> bool:
        if job.pending or not all(ev.query() for ev in job.events):
            return False
        del self.jobs[job.model]
        del self.host[job.model]  # weights are now in the arena only
        return True
