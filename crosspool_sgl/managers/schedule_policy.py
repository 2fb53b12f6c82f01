"""Which requests run next: a pure function of the queues and a page budget (no model, no pool).

Order of business each step: keep every running decode going (retracting the
youngest requests if their pages can't be found), continue chunked prefills,
then admit waiting requests first-come first-served within the token budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from crosspool_sgl.managers.req import Req
from crosspool_sgl.mem.kv_pool import PageBudget


@dataclass(frozen=True)
class PolicyArgs:
    page_tokens: int
    max_running_requests: int = 64
    chunked_prefill_size: int = 1024  # new tokens per step, decodes included


@dataclass
class BatchPlan:
    items: list[tuple[Req, int]] = field(default_factory=list)  # (request, new tokens this step)
    retract: list[Req] = field(default_factory=list)
    admit: list[Req] = field(default_factory=list)  # subset of items' requests that were waiting

    @property
    def empty(self) -> bool:
        return not self.items and not self.retract


def pages_for(req: Req, new_tokens: int, page_tokens: int) -> int:
    """Extra pages `req` needs to hold `new_tokens` more tokens."""
    return max(0, -(-(req.num_cached + new_tokens) // page_tokens) - len(req.pages))


class SchedulePolicy:
    def __init__(self, args: PolicyArgs) -> None:
        self.args = args

    def next_batch(self, waiting: deque[Req], running: list[Req], budget: PageBudget) -> BatchPlan | None:
        plan = BatchPlan()
        keep = self._schedule_running(running, budget, plan)
        tokens_left = self.args.chunked_prefill_size - sum(n for _, n in plan.items)
        for req in keep:  # unfinished chunked prefills
            if req.num_uncached > 1 and tokens_left > 0:
                n = min(req.num_uncached, tokens_left)
                if budget.try_take(req.model, pages_for(req, n, self.args.page_tokens)):
                    plan.items.append((req, n))
                    tokens_left -= n
        num_running = len(keep)
        for req in waiting:
            if tokens_left <= 0 or num_running >= self.args.max_running_requests:
                break
            n = min(req.num_uncached, tokens_left)
            if not budget.try_take(req.model, pages_for(req, n, self.args.page_tokens)):
                break  # first-come first-served: don't let later requests overtake
            plan.items.append((req, n))
            plan.admit.append(req)
            tokens_left -= n
            num_running += 1
        return None if plan.empty else plan

    def _schedule_running(self, running: list[Req], budget: PageBudget, plan: BatchPlan) -> list[Req]:
        """Give every running decode one token; retract the youngest until the pages fit."""
        keep = sorted(running, key=lambda r: r.arrival_time)
        decodes = [r for r in keep if r.num_uncached == 1]
        while decodes:
            need = {}
            for r in decodes:
                need[r.model] = need.get(r.model, 0) + pages_for(r, 1, self.args.page_tokens)
            trial = PageBudget(dict(budget.spare_pages), budget.pages_per_chunk, budget.free_chunks)
            if all(trial.try_take(m, n) for m, n in need.items()):
                budget.spare_pages, budget.free_chunks = trial.spare_pages, trial.free_chunks
                break
            victim = keep.pop()  # youngest
            plan.retract.append(victim)
            budget.give_back(victim.model, len(victim.pages))
            if victim in decodes:
                decodes.remove(victim)
        plan.items.extend((r, 1) for r in decodes)
        return keep
