"""Winning back cached prefixes when a step's plan is blocked: whose cache goes, and how much.

The goal is the plan, not the blocked request's own pages. Admission first keeps what every running
request will still need (the rest of its prompt, its decode headroom: `SchedulePolicy.next_batch`),
so a waiting request whose own pages would fit may still be held back. Reclaiming only until its own
pages fitted (the previous rule) evicted nothing in exactly that case: on the bursty trace the pool
held 0.5 MB of request pages out of 12 MB, the rest cached prefixes, while the warm model's short
requests waited 1.5-1.9 s each, until overdue. Here eviction goes on, batch by batch, until the
re-planned step seats the blocked request; when even evicting everything allowed would not seat it
(checked first, on a budget with that cache freed), nothing is evicted at all (all or nothing: the
long-context trace's thrash evicted a busy model's cache page by page for a request that still
could not run).

Whose cache, in order:
1. idle models' (no request running or waiting): least likely to be hit again soon;
2. the blocked request's own model's: its freed pages are its own spare pages at once;
3. other busy models'.
Another model's cache is evicted only down to what the planner protects for it — its working set
for an ordinary claim, its static floor for an overdue (privileged) one: a chunk freed below that
line is owed back to that model and could not be claimed anyway, so evicting it would only lose
the cache (the bursty trace: an idle model's 21-chunk working set, evicted for another model's
request that then still could not claim the freed chunks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from crosspool_sgl.core.req import Req, ReqState
from crosspool_sgl.core.schedule_policy import BatchPlan
from crosspool_sgl.mem.kv_pool import KVPool, PageBudget, page_budget
from crosspool_sgl.mem.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)

Replan = Callable[[PageBudget], "BatchPlan | None"]
MAX_CANDIDATES = 4  # blocked requests tried per step (the overdue one first)


def seated(plan: BatchPlan | None, req: Req) -> bool:
    """Does `plan` run `req` this step — and, for a running decode, without preempting anyone?"""
    if plan is None:
        return False
    placed = any(r is req for r, _ in plan.items) or (plan.lane is not None and plan.lane[0] is req)
    return placed and (req.state is ReqState.WAITING or not plan.retract)


@dataclass
class _Target:
    req: Req
    privileged: bool


class CacheReclaimer:
    """Evicts unreferenced cached prefixes for a blocked plan (see the module docstring)."""

    def __init__(self, pool: KVPool, cache: PrefixCache, count: Callable[[str, int], None]) -> None:
        self.pool = pool
        self.cache = cache
        self._count = count  # (model, pages evicted) -> counters for /metrics

    def reclaim(
        self,
        plan: BatchPlan,
        replan: Replan,
        busy: set[str],
        pinned: dict[str, int],
        unpin: Callable[[Req], None],
    ) -> BatchPlan | None:
        """A new plan that seats one of the blocked requests, or None (nothing was evicted).

        `busy`: models with requests; `pinned`: per model, cached pages waiting requests hold only
        as matched prefixes (freed by `unpin(keep)`, which lets every waiting request but `keep` go).
        """
        if plan.blocked is None or not (self.cache.evictable_pages() or any(pinned.values())):
            return None
        for target in self._targets(plan):
            if not seated(replan(self._budget_after(target, busy, pinned)), target.req):
                continue
            unpin(target.req)
            return self._evict_until_seated(target, replan, busy)
        return None

    def _targets(self, plan: BatchPlan) -> Iterable[_Target]:
        req, _ = plan.blocked
        yield _Target(req, plan.blocked_overdue)
        others = [(r, o) for r, _, o in plan.also_blocked if r is not req]
        for r, overdue in others[: MAX_CANDIDATES - 1]:
            yield _Target(r, overdue)

    def _order(self, target: _Target, busy: set[str]) -> list[str]:
        """Idle models first, then the request's own, then other busy models."""
        own = target.req.model
        return sorted(self.pool.views, key=lambda m: (m in busy, m != own))

    def _protected_chunks(self, model: str, privileged: bool) -> int:
        """Chunks of `model` another model's claim cannot use even once freed (see the docstring)."""
        planner = self.pool.planner
        if planner is None:
            return 0
        floor = planner.floor.get(model, 0)
        if privileged:
            return floor
        return max(floor, planner.working_set.get(model, 0) + planner.large_held.get(model, 0))

    def _budget_after(self, target: _Target, busy: set[str], pinned: dict[str, int]) -> PageBudget:
        """The page budget once every cached page this target may have evicted is gone (approximate:
        cached pages count as whole chunks of their model, rounded down)."""
        trial = page_budget(self.pool)
        own = target.req.model
        # the target keeps its own matched prefix (`unpin` lets every waiting request go but it)
        own_pinned = len(target.req.pages) if target.req.state is ReqState.WAITING else 0
        for model in self.pool.views:
            pages = self.cache.evictable_pages(model) + pinned.get(model, 0)
            if model == own:
                pages -= own_pinned
                trial.spare_pages[model] += pages
                continue
            chunks = pages * self.pool.page_bytes(model) // self.pool.chunk_bytes
            excess = trial.owned.get(model, 0) - self._protected_chunks(model, target.privileged)
            chunks = min(chunks, max(excess, 0))
            trial.free_chunks += chunks
            trial.owned[model] = trial.owned.get(model, 0) - chunks
        return trial

    def _evict_until_seated(self, target: _Target, replan: Replan, busy: set[str]) -> BatchPlan | None:
        own = target.req.model
        plan: BatchPlan | None = None
        evicted: dict[str, int] = {}
        for model in self._order(target, busy):
            batch = max(self.pool.chunk_bytes // self.pool.page_bytes(model), 1)
            while self.cache.evictable_pages(model):
                if model != own:
                    owned = self.pool.owned_chunks()[model]
                    if owned <= self._protected_chunks(model, target.privileged):
                        break
                n = self.cache.evict(model, batch)
                if n == 0:
                    break
                evicted[model] = evicted.get(model, 0) + n
                batch *= 2  # O(log) re-plans per reclaim, not one per chunk
                plan = replan(page_budget(self.pool))
                if seated(plan, target.req):
                    self._log(evicted, busy, target.req)
                    return plan
        if not evicted:
            return None
        self._log(evicted, busy, target.req)
        return plan

    def _log(self, evicted: dict[str, int], busy: set[str], req: Req) -> None:
        for model, n in evicted.items():
            self._count(model, n)
            state = "busy" if model in busy else "idle"
            logger.info("reclaim %d cached pages of %s (%s) for %s", n, model, state, req.model)
