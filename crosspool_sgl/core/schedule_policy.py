"""Which requests run next: a pure function of the queues, a page budget and a cost model.

Order of business each step:

1. Keep every running decode going, retracting victims chosen by the KV planner (loosest
   TBT target, then least computed, then youngest) if their pages can't be found.
2. Fill the rest of the step with prefill chunks — continuing ones and new admissions in
   one priority order (the planner's deadline: arrival + TTFT target + weighted prefill
   time, so short prompts go before long ones and a long one ages past later arrivals).
   A step that carries decodes stays within a *time* budget: the tightest TBT target of
   its decoding models, else `decode_step_slowdown` x what its decodes alone cost; a step
   without decodes within `prefill_step_budget_ms`. Chunk sizes come from the step cost
   model (attention cost grows with context: 256 tokens at 10k context are not 256 tokens
   at 0). While others are queued, a prefill under way takes at most half of what is left.
3. Memory isolation at admission: a new request must fit with its whole prompt and a
   share of its output (`decode_headroom`) beside what running requests will still need,
   inside what the planner lets its model claim (other models keep their working sets).
   A request that does not fit does not block the queue — except once it is *overdue*
   (past its deadline): then it may take other models' working sets, and no later request
   is admitted until it fits (a reservation, as in backfilling schedulers), so it is never
   starved.
   *Large* requests — whose whole footprint (prompt + decode headroom) is more than
   `max_request_share` of the pool (half: no other request of its size fits beside it) — are
   not their model's recurring demand. They do not count into
   working sets; until overdue they come after every other queued request, and they are
   admitted only beside their *own* model's working set too (the long-context trace: a warm
   model's 9k-token prompt took the memory its own short requests needed, 1.7 s TTFT P99).

4. Prefill lane (when the scheduler has one free): the highest-priority prefill whose rest
   costs more than the step can give it gets a chunk of `prefill_step_budget_ms` that runs
   concurrently with the step, on another core — a long prompt then progresses at full speed
   while the decodes keep their TBT.

When something did not fit, the plan says so (`blocked`) so the scheduler can reclaim
cached prefixes and plan again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from crosspool_sgl.core.req import Req, ReqState
from crosspool_sgl.core.step_cost import StepCostModel
from crosspool_sgl.mem.kv_pool import PageBudget


@dataclass(frozen=True)
class PolicyArgs:
    page_tokens: int
    max_running_requests: int = 64
    chunked_prefill_size: int = 1024  # most new tokens per step, decodes included
    # Share of each request's remaining max_new_tokens kept free for its decode when admitting
    # new prefills: without it a burst admits prefills that running decodes then have to preempt
    # (measured: 101 preemptions and 25 client timeouts on the bursty benchmark trace).
    decode_headroom: float = 0.5
    # Used only without a cost model: prefill tokens a step may carry while requests decode.
    prefill_tokens_with_decodes: int = 256
    # Time budgets (with a cost model). A step carrying decodes may take this many times what its
    # decodes alone cost (unless a TBT target is tighter): prefill never more than doubles a TBT.
    decode_step_slowdown: float = 2.0
    min_decode_step_ms: float = 4.0  # budget floor: below it a step can't carry a useful chunk
    prefill_step_budget_ms: float = 50.0  # a step without decodes (bounds new arrivals' wait)
    # A request whose footprint exceeds this share of the pool is *large* (see the module docstring).
    # Not an equal share among the models: that made the bursty trace's 3-3.5k-token prompts large,
    # and their wait beside every working set (TTFT 0.3-0.8 s -> 2.7-10.6 s in loaded in-process
    # replays) became the overall TTFT tail.
    max_request_share: float = 0.5
    # How long a large request's prefill under way yields memory to others' new requests (it pauses
    # when they need it) before its remaining prompt is reserved like any running request's: the
    # aging bound of a large request's prefill. Reserving it at once let a 10.8k-token prompt, admitted
    # in a lull of the warm model, hold back that model's next burst for its whole prefill (1-2 s TTFT).
    max_large_yield_s: float = 30.0


@dataclass
class BatchPlan:
    items: list[tuple[Req, int]] = field(default_factory=list)  # (request, new tokens this step)
    retract: list[Req] = field(default_factory=list)
    admit: list[Req] = field(default_factory=list)  # subset of items' requests that were waiting
    blocked: tuple[Req, int] | None = None  # (request, pages) that did not fit this step
    blocked_overdue: bool = False  # the blocked request is past its deadline (reclaim for it)
    lane: tuple[Req, int] | None = None  # a long prefill chunk to run beside the step (prefill lane)
    also_blocked: list[tuple[Req, int, bool]] = field(default_factory=list)  # all that did not fit

    @property
    def empty(self) -> bool:
        return not self.items and not self.retract and self.lane is None


def pages_for(req: Req, new_tokens: int, page_tokens: int) -> int:
    """Extra pages `req` needs to hold `new_tokens` more tokens."""
    return max(0, -(-(req.num_cached + new_tokens) // page_tokens) - len(req.pages))


def _fifo(req: Req) -> float:
    return req.arrival_time


class _StepFill:
    """What is left of one step's token and time budgets while prefill chunks are added."""

    def __init__(self, policy: SchedulePolicy, decodes: list[Req]) -> None:
        args, cost = policy.args, policy.cost
        self.cost = cost
        self.models = {r.model for r in decodes}
        self.tokens_left = args.chunked_prefill_size - len(decodes)
        self.has_decodes = bool(decodes)
        if cost is None:
            self.ms_left = math.inf
            if decodes:
                self.tokens_left = min(self.tokens_left, args.prefill_tokens_with_decodes)
            return
        decode_ms = cost.estimate_ms((r.model, 1, r.num_cached) for r in decodes)
        if decodes:
            budget = max(args.decode_step_slowdown * decode_ms, args.min_decode_step_ms)
            targets = [policy.tbt_targets_ms[m] for m in self.models if m in policy.tbt_targets_ms]
            budget = min([budget, *targets])
        else:
            budget = args.prefill_step_budget_ms
        self.ms_left = budget - decode_ms

    def chunk_for(self, req: Req, share: float) -> int:
        """New tokens of `req` within `share` of what is left (0: nothing fits)."""
        n = min(req.num_uncached, int(self.tokens_left * share) or self.tokens_left)
        if self.cost is not None:
            fit = self.cost.max_tokens(
                req.model, req.num_cached, self.ms_left * share, req.model in self.models
            )
            n = min(n, fit)
        return max(n, 0)

    def add(self, req: Req, n: int) -> None:
        if self.cost is not None:
            self.ms_left -= self.cost.extra_ms(req.model, n, req.num_cached, req.model in self.models)
        self.models.add(req.model)
        self.tokens_left -= n

    @property
    def exhausted(self) -> bool:
        return self.tokens_left <= 0 or self.ms_left <= 0


class SchedulePolicy:
    def __init__(
        self,
        args: PolicyArgs,
        admission_key: Callable[[Req], float] = _fifo,
        victim_key: Callable[[Req], tuple] = lambda r: (r.arrival_time,),
        cost: StepCostModel | None = None,
        tbt_targets_ms: Mapping[str, float] | None = None,
        pool_pages: Mapping[str, int] | None = None,
    ) -> None:
        self.args = args
        self.admission_key = admission_key
        self.victim_key = victim_key
        self.cost = cost
        self.tbt_targets_ms = dict(tbt_targets_ms or {})
        self.pool_pages = dict(pool_pages or {})  # each model's view of the whole pool, in pages

    def next_batch(
        self,
        waiting: Iterable[Req],
        running: list[Req],
        budget: PageBudget,
        now: float | None = None,
        lane_free: bool = False,
        in_flight: Iterable[Req] = (),
    ) -> BatchPlan | None:
        """The next step's plan; `lane_free`: a prefill lane can take one long chunk beside the step;
        `in_flight`: running requests whose lane chunk is running (not scheduled, but their future
        pages are kept for them like any running request's)."""
        now = time.monotonic() if now is None else now
        in_flight = list(in_flight)
        plan = BatchPlan()
        waiting = list(waiting)
        keep = self._schedule_running(running, budget, plan)
        step = _StepFill(self, [r for r, _ in plan.items])
        headroom = budget.copy()  # what admissions may use once running requests keep their share
        started = [*keep, *in_flight]
        yielding = {id(r) for r in started if self.yields(r, now)}
        # privileged: what a running request will still need is its own, whoever's working set it is in
        room = all(
            [
                headroom.try_take(r.model, self.future_pages(r, 0), True)
                for r in started
                if id(r) not in yielding
            ]
        )
        # a large prefill under way keeps only what others' working sets leave: if its rest does not fit
        # beside them, nothing is kept for it (it pauses) and no other large request starts meanwhile
        large_room = all(
            [headroom.try_take(r.model, self.future_pages(r, 0)) for r in started if id(r) in yielding]
        )
        own_reserve: dict[str, int] | None = None  # built for the first large admission only
        candidates = [r for r in keep if r.num_uncached > 1] + waiting
        deadline = {id(r): self.admission_key(r) for r in candidates}  # once per step: a cost estimate each
        candidates.sort(key=lambda r: deadline[id(r)])
        if len(waiting) > 1:  # a large request goes after everyone else queued (until it is overdue)
            candidates.sort(
                key=lambda r: r.state is ReqState.WAITING and now < deadline[id(r)] and self.large(r)
            )
        num_running, admitting, num_prefills = len(keep) + len(in_flight), True, 0
        # the overdue request later admissions are held back for, if it waits only for memory outside
        # the other models' working sets (then their own requests inside them may still be admitted)
        reserver: Req | None = None
        running_large = [self.pool_share(r) for r in started if self.large(r)]
        for i, req in enumerate(candidates):
            if step.exhausted and num_prefills and not lane_free:
                break
            is_new = req.state is ReqState.WAITING
            overdue = now >= deadline[id(req)] and id(req) not in yielding
            if is_new and num_running >= self.args.max_running_requests:
                continue
            if is_new and not admitting and not self._inside_own_working_set(req, reserver, headroom):
                continue
            to_lane = lane_free and self._wants_lane(req, step)
            if to_lane:  # a long prefill: a chunk of a whole step's worth, beside the decodes
                n = self.cost.max_tokens(req.model, req.num_cached, self.args.prefill_step_budget_ms, False)
                # never the prompt's last token: sampling (penalty tables, grammars) stays on the step
                n = min(req.num_uncached - 1, max(n, self.args.page_tokens))
            else:  # a prefill under way leaves half of what is left to those queued behind it...
                n = step.chunk_for(req, 0.5 if not is_new and i + 1 < len(candidates) else 1.0)
                if n == 0 and not num_prefills:  # ...unless half can't pay for its model's forward: the
                    n = step.chunk_for(req, 1.0)  # first in line gets the step, not a cheaper one behind it
            if n == 0 and (num_prefills or (step.has_decodes and not overdue)):
                continue  # a cheaper request further down may still fit
            if overdue or n == 0:  # progress: one page at least (aging, when decodes fill every step)
                n = max(n, min(req.num_uncached, self.args.page_tokens))
            need = pages_for(req, n, self.args.page_tokens)
            future = self.future_pages(req, n)
            # An overdue request reserves memory only when it can follow the running ones: beside a
            # large running request it cannot start before that one ends, and holding back the small
            # requests meanwhile would only cost their TTFT (long-context trace, two 9-12k prompts).
            reserve = not any(share + self.pool_share(req) > 1.0 for share in running_large)
            if is_new and not overdue and self.large(req):  # its own model's working set stays free
                if not large_room:
                    self._blocked(plan, req, future, overdue, reserve)
                    continue
                if own_reserve is None:
                    own_reserve = self._own_reserves(budget, started)
                future += own_reserve.get(req.model, 0)
            if is_new and num_running and not (room and headroom.copy().try_take(req.model, future, overdue)):
                pages = future
            elif not budget.try_take(req.model, need, overdue):
                pages = need
            else:
                pages = 0
            if pages:
                if not self._blocked(plan, req, pages, overdue, reserve) and admitting:
                    admitting = False
                    reserver = req if self._waits_outside_working_sets(req, budget) else None
                continue
            if is_new:
                headroom.try_take(req.model, future, overdue)
                plan.admit.append(req)
                num_running += 1
            if to_lane:
                plan.lane, lane_free = (req, n), False
                continue
            plan.items.append((req, n))
            step.add(req, n)
            num_prefills += 1
        return None if plan.empty and plan.blocked is None else plan

    def _waits_outside_working_sets(self, req: Req, budget: PageBudget) -> bool:
        """Does `req` fit beside every other model's working set? Then, while it reserves, it waits
        for memory outside them (freed as the running requests end), not for theirs; otherwise it
        needs working-set memory too and holds every later admission back (aging)."""
        planner = budget.planner
        if planner is None:
            return False
        others_ws = sum(c for m, c in planner.working_set.items() if m != req.model)
        outside = (planner.num_chunks - others_ws) * budget.pages_per_chunk.get(req.model, 0)
        return self.footprint_pages(req) <= outside

    def _inside_own_working_set(self, req: Req, reserver: Req | None, headroom: PageBudget) -> bool:
        """May `req` be admitted beside `reserver`'s reservation (backfill)? When it is another model's
        ordinary request that fits inside its own model's working set, it takes nothing the reserver
        waits for. The long-context trace: an overdue 6.4k-token prompt held back the warm model's
        short requests for 1 s although it was waiting for a 12k-token prompt's memory, not theirs."""
        planner = headroom.planner
        if reserver is None or planner is None or req.model == reserver.model or self.large(req):
            return False
        per_chunk = headroom.pages_per_chunk.get(req.model, 0)
        mine = headroom.owned.get(req.model, 0) - planner.large_held.get(req.model, 0)
        uncovered = max(0, planner.working_set.get(req.model, 0) - mine)
        return self.future_pages(req) <= headroom.spare_pages.get(req.model, 0) + uncovered * per_chunk

    def yields(self, req: Req, now: float) -> bool:
        """Does this running request's prefill yield memory to the others?

        A large request admitted before it was overdue (it found room in a lull) claims the rest of
        its prompt like a new request would — other models' working sets stay free, nothing is
        reserved for it ahead of later arrivals — so it pauses while their bursts need the memory,
        until `max_large_yield_s` after its arrival (aging). One admitted overdue has waited enough.
        """
        return (
            req.state is ReqState.RUNNING
            and req.num_uncached > 1
            and req.admitted_time is not None
            and now - req.arrival_time < self.args.max_large_yield_s
            and self.large(req)
            and req.admitted_time < self.admission_key(req)
        )

    def _wants_lane(self, req: Req, step: _StepFill) -> bool:
        """A prefill whose rest costs more than this step can still give it runs in the lane."""
        if self.cost is None or req.num_uncached <= self.args.page_tokens:
            return False
        rest_ms = self.cost.extra_ms(req.model, req.num_uncached, req.num_cached, True)
        return rest_ms > max(step.ms_left, 0.0)

    @staticmethod
    def _blocked(plan: BatchPlan, req: Req, pages: int, overdue: bool, reserve: bool) -> bool:
        """Note what did not fit; returns whether later requests may still be admitted (not when an
        overdue request waits and `reserve`: what frees up is kept for it)."""
        if plan.blocked is None or (overdue and not plan.blocked_overdue):
            plan.blocked, plan.blocked_overdue = (req, pages), overdue
        plan.also_blocked.append((req, pages, overdue))
        return not (overdue and reserve)

    def _pool(self, req: Req) -> int:
        return self.pool_pages.get(req.model, 0)

    def pool_share(self, req: Req) -> float:
        """The share of its model's view of the pool the request's footprint takes."""
        return self.footprint_pages(req) / max(self._pool(req), 1)

    def footprint_pages(self, req: Req) -> int:
        """Pages the request holds once its prompt is in, with its decode headroom."""
        remaining = max(req.params.max_new_tokens - len(req.output_ids), 0)
        tokens = len(req.input_ids) + len(req.output_ids) + int(remaining * self.args.decode_headroom)
        return -(-tokens // self.args.page_tokens)

    def large(self, req: Req) -> bool:
        """Its footprint exceeds `max_request_share` of its model's view of the pool."""
        total = self._pool(req)
        return bool(total) and self.footprint_pages(req) > self.args.max_request_share * total

    def demand(self, running: Iterable[Req], waiting: Iterable[Req]) -> tuple[dict[str, int], dict[str, int]]:
        """Per model: pages its ordinary requests hold or will need (its working set follows this),
        and pages held by its large requests (not the model's recurring demand)."""
        ordinary: dict[str, int] = {}
        large_held: dict[str, int] = {}
        for req in running:
            if self.large(req):
                large_held[req.model] = large_held.get(req.model, 0) + len(req.pages)
            else:
                ordinary[req.model] = ordinary.get(req.model, 0) + len(req.pages) + self.future_pages(req)
        for req in waiting:
            if self.large(req):
                large_held.setdefault(req.model, 0)  # the model is active: it counts for shares
            else:
                ordinary[req.model] = ordinary.get(req.model, 0) + self.future_pages(req)
        return ordinary, large_held

    def _own_reserves(self, budget: PageBudget, running: list[Req]) -> dict[str, int]:
        """Per model, the pages of its working set its running ordinary requests do not cover yet:
        what a large request of the same model must leave free."""
        planner = budget.planner
        if planner is None:
            return {}
        ordinary, _ = self.demand(running, ())
        return {
            m: max(0, chunks * budget.pages_per_chunk.get(m, 0) - ordinary.get(m, 0))
            for m, chunks in planner.working_set.items()
        }

    def future_pages(self, req: Req, new_tokens: int = 0) -> int:
        """Pages for the rest of its prompt (at least `new_tokens`) plus its decode headroom."""
        remaining = max(req.params.max_new_tokens - len(req.output_ids), 0)
        ahead = max(new_tokens, req.num_uncached) + int(remaining * self.args.decode_headroom)
        return pages_for(req, ahead, self.args.page_tokens)

    def _schedule_running(self, running: list[Req], budget: PageBudget, plan: BatchPlan) -> list[Req]:
        """Give every running decode one token; retract victims until the pages fit."""
        keep = list(running)
        decodes = [r for r in keep if r.num_uncached == 1]
        while decodes:
            need: dict[str, int] = {}
            for r in decodes:
                need[r.model] = need.get(r.model, 0) + pages_for(r, 1, self.args.page_tokens)
            trial = budget.copy()
            # privileged: a running decode may use other models' working sets, never their floors
            if all(trial.try_take(m, n, True) for m, n in need.items()):
                budget.spare_pages, budget.free_chunks, budget.owned = (
                    trial.spare_pages,
                    trial.free_chunks,
                    trial.owned,
                )
                break
            if plan.blocked is None:
                model, pages = next(iter(need.items()))
                plan.blocked = (next(r for r in decodes if r.model == model), pages)
            victim = max(keep, key=self.victim_key)
            keep.remove(victim)
            plan.retract.append(victim)
            budget.give_back(victim.model, len(victim.pages))
            if victim in decodes:
                decodes.remove(victim)
        plan.items.extend((r, 1) for r in decodes)
        return keep
