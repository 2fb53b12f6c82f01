"""Discrete-event model of the compared deployments: the same scheduling policy as our scheduler
(`core/schedule_policy.py`: keep decodes, retract the youngest when KV is short, chunked prefill,
FCFS admission) over per-model or shared KV budgets, timed by a cost model (`sim_costs`).

THIS IS A MODEL. It projects; it does not measure. Its fidelity is checked by replaying the CPU
benchmark's trace with a CPU cost model fitted to the decode micro-benchmark and comparing with what
the real servers measured (`calibrate`).

Engines run one step at a time; engines that share a device (stock servers on one GPU, or on the
2-core CPU) share its `slots` (steps run concurrently on different slots, serially on one).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from crosspool_sgl.bench.sim_costs import StepWork
from crosspool_sgl.bench.stats import percentile
from crosspool_sgl.bench.trace import TraceRequest

PAGE_TOKENS = 16


class CostModel(Protocol):
    def step_s(self, work: Mapping[str, StepWork]) -> float: ...


@dataclass
class SimReq:
    tr: TraceRequest
    bpt: int  # KV bytes per token of its model
    cached: int = 0
    generated: int = 0
    held_bytes: int = 0
    first_s: float | None = None
    last_s: float | None = None
    tbts: list[float] = field(default_factory=list)
    status: str = "waiting"  # running, done, rejected
    retractions: int = 0

    @property
    def uncached(self) -> int:
        return self.tr.prompt_len + self.generated - self.cached

    def bytes_for(self, new_tokens: int) -> int:
        """Extra KV bytes (whole pages) to hold `new_tokens` more tokens."""
        pages = -(-(self.cached + new_tokens) // PAGE_TOKENS)
        return max(0, pages * PAGE_TOKENS * self.bpt - self.held_bytes)


@dataclass
class KVBudget:
    """Bytes in use per model against a shared total and optional per-model caps (static partitions)."""

    total: int
    caps: dict[str, int] | None = None
    used: dict[str, int] = field(default_factory=dict)

    def capacity(self, model: str) -> int:
        return self.caps[model] if self.caps else self.total

    def can_take(self, model: str, n: int) -> bool:
        if self.caps and self.used.get(model, 0) + n > self.caps[model]:
            return False
        return sum(self.used.values()) + n <= self.total

    def take(self, model: str, n: int) -> None:
        self.used[model] = self.used.get(model, 0) + n


@dataclass
class Plan:
    items: list[tuple[SimReq, int]]
    work: dict[str, StepWork]


class Engine:
    """One scheduler (a stock server, or a whole crosspool server) and its queues."""

    def __init__(
        self, models: Sequence[str], kv: KVBudget, cost: CostModel, max_running: int = 64, chunk: int = 1024
    ) -> None:
        self.models, self.kv, self.cost = tuple(models), kv, cost
        self.max_running, self.chunk = max_running, chunk
        self.waiting: deque[SimReq] = deque()
        self.running: list[SimReq] = []
        self.busy = False
        self.last_start = -1.0

    def add(self, req: SimReq) -> None:
        need = -(-(req.tr.prompt_len + 1) // PAGE_TOKENS) * PAGE_TOKENS * req.bpt
        if need > self.kv.capacity(req.tr.model):
            req.status = "rejected"  # can never fit, as both servers answer
        else:
            self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, req: SimReq) -> None:
        self.kv.take(req.tr.model, -req.held_bytes)
        req.held_bytes = 0

    def _alloc(self, req: SimReq, n: int) -> bool:
        need = req.bytes_for(n)
        if not self.kv.can_take(req.tr.model, need):
            return False
        self.kv.take(req.tr.model, need)
        req.held_bytes += need
        return True

    def plan(self) -> Plan:
        """Decodes first (retracting the youngest while KV is short), then chunked prefill, then FCFS."""
        keep = sorted(self.running, key=lambda r: r.tr.arrival_s)
        items: list[tuple[SimReq, int]] = []
        for r in [r for r in keep if r.uncached == 1]:
            while r in keep and not self._alloc(r, 1):
                victim = keep.pop()
                self._release(victim)
                victim.cached, victim.status = 0, "waiting"
                victim.retractions += 1
                self.running.remove(victim)
                self.waiting.appendleft(victim)
            if r in keep:
                items.append((r, 1))
        left = self.chunk - len(items)
        for r in keep:
            if r.uncached > 1 and left > 0 and self._alloc(r, min(r.uncached, left)):
                items.append((r, min(r.uncached, left)))
                left -= items[-1][1]
        while self.waiting and left > 0 and len(self.running) < self.max_running:
            r = self.waiting[0]
            if not self._alloc(r, min(r.uncached, left)):
                break
            self.waiting.popleft()
            r.status = "running"
            self.running.append(r)
            items.append((r, min(r.uncached, left)))
            left -= items[-1][1]
        return Plan(items, _work(items))

    def finish(self, plan: Plan, now: float) -> None:
        for r, n in plan.items:
            if r.status != "running":
                continue
            r.cached += n
            if r.uncached:
                continue
            r.generated += 1
            if r.first_s is None:
                r.first_s = now
            else:
                r.tbts.append(now - r.last_s)
            r.last_s = now
            if r.generated >= r.tr.output_len:
                r.status = "done"
                self._release(r)
                self.running.remove(r)


def _work(items: Sequence[tuple[SimReq, int]]) -> dict[str, StepWork]:
    acc: dict[str, list[int]] = {}
    for r, n in items:
        w = acc.setdefault(r.tr.model, [0, 0, 0])
        w[0 if n == 1 and r.cached else 1] += n
        w[2] += r.cached
    return {m: StepWork(d, p, k) for m, (d, p, k) in acc.items()}


@dataclass
class Device:
    engines: list[Engine]
    slots: int = 1


def simulate(
    trace: Sequence[TraceRequest], devices: list[Device], bpt: Mapping[str, int], horizon_s: float
) -> list[SimReq]:
    """Run the event loop until every request finished or `horizon_s`; requests in trace order."""
    engine_of = {m: e for d in devices for e in d.engines for m in e.models}
    reqs = [SimReq(r, bpt[r.model]) for r in trace]
    seq = itertools.count()
    events: list = [(r.tr.arrival_s, next(seq), "arrive", r, None) for r in reqs]
    heapq.heapify(events)
    free = {id(d): d.slots for d in devices}
    while events:
        now, _, kind, x, dev = heapq.heappop(events)
        if now > horizon_s:
            break
        if kind == "arrive":
            engine_of[x.tr.model].add(x)
        else:
            engine, plan = x
            engine.finish(plan, now)
            engine.busy = False
            free[id(dev)] += 1
        for d in devices:
            while free[id(d)] > 0:
                ready = [e for e in d.engines if not e.busy and e.has_work()]
                started = False
                for e in sorted(ready, key=lambda e: e.last_start):
                    plan = e.plan()
                    if plan.items:
                        e.busy, e.last_start, started = True, now, True
                        free[id(d)] -= 1
                        heapq.heappush(
                            events, (now + e.cost.step_s(plan.work), next(seq), "done", (e, plan), d)
                        )
                        break
                if not started:
                    break
    return reqs


def sim_summary(reqs: Sequence[SimReq], duration_s: float) -> dict[str, float | int | None]:
    """The same figures the real benchmark reports, in ms."""
    done = [r for r in reqs if r.status == "done"]
    ttft = [r.first_s - r.tr.arrival_s for r in done]
    tbt = [g for r in done for g in r.tbts]

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1e3

    return {
        "requests": len(reqs),
        "completed": len(done),
        "rejected": sum(r.status == "rejected" for r in reqs),
        "timeout": sum(r.status in ("waiting", "running") for r in reqs),
        "preempted": sum(r.retractions for r in reqs),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "tbt_p50_ms": ms(percentile(tbt, 50)),
        "tbt_p99_ms": ms(percentile(tbt, 99)),
        "tbt_p999_ms": ms(percentile(tbt, 99.9)),
        "output_tok_s": sum(r.generated for r in done) / duration_s if duration_s else None,
        "max_served_context": max((r.tr.prompt_len + r.generated for r in done), default=0),
    }
