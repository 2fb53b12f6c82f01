"""The multi-model scheduler: request queues of every model over one KV pool.

It is the only place that allocates or frees KV pages. The loop is::

    match_prefixes(waiting)                # reuse cached pages (prefix cache)
    plan = policy.next_batch(waiting, running, page_budget(kv_pool))
    if plan.blocked: reclaim(); re-plan    # cached prefixes, until the plan seats it (core/reclaim.py)
    apply(plan)                            # retract (preempt), allocate
    postprocess(plan, runner.run(plan.items))

Used in-process by the offline Engine and wrapped by the server's scheduler
process. Imports no sglang.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures

from crosspool_sgl.core.model_runner import ModelRunner, StepResult
from crosspool_sgl.core.prefill_lane import PrefillLane
from crosspool_sgl.core.reclaim import CacheReclaimer
from crosspool_sgl.core.req import Req, ReqOutput, ReqState
from crosspool_sgl.core.schedule_policy import BatchPlan, SchedulePolicy, pages_for
from crosspool_sgl.layers.grammar import GrammarCompiler, InvalidGrammarError
from crosspool_sgl.mem.kv_pool import KVPool, page_budget
from crosspool_sgl.mem.prefix_cache import PrefixCache
from crosspool_sgl.mem.residency_manager import models_with_requests
from crosspool_sgl.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)

Detokenize = Callable[[list[int]], str]
_GRAMMAR_IDLE_WAIT_S = 0.005  # with nothing to run, wait this long for a compiling grammar


class IntervalStats:
    """Per-interval throughput, step times and pool occupancy, logged as one line (busy intervals only)."""

    def __init__(self, period_s: float = 10.0) -> None:
        self.period_s = period_s
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.start = now
        self.steps = self.prefill_tokens = self.decode_tokens = self.lane_chunks = 0
        self.step_ms: list[float] = []
        self.abs_err_ms = 0.0

    def record(
        self, items: list[tuple[Req, int]], elapsed_ms: float, predicted_ms: float, lane: bool = False
    ) -> None:
        if lane:
            self.lane_chunks += 1
            self.prefill_tokens += sum(n for _, n in items)
            return
        self.steps += 1
        for _, n in items:
            if n == 1:
                self.decode_tokens += 1
            else:
                self.prefill_tokens += n
        self.step_ms.append(elapsed_ms)
        self.abs_err_ms += abs(elapsed_ms - predicted_ms)

    def due(self) -> bool:
        return time.monotonic() - self.start >= self.period_s

    def flush(self, sched: MultiModelScheduler) -> str:
        now = time.monotonic()
        span = max(now - self.start, 1e-9)
        times = sorted(self.step_ms) or [0.0]
        planner = sched.kv_pool.planner
        snap = sched.kv_pool.snapshot()
        line = (
            f"interval {span:.1f}s: {self.steps} steps + {self.lane_chunks} lane chunks, "
            f"prefill {self.prefill_tokens / span:.0f} tok/s, "
            f"decode {self.decode_tokens / span:.0f} tok/s, step ms p50 {times[len(times) // 2]:.1f} "
            f"max {times[-1]:.1f} (cost model |err| {self.abs_err_ms / max(self.steps, 1):.1f}), "
            f"waiting {len(sched.waiting)} running {len(sched.running)}, KV free "
            f"{snap.num_free_chunks}/{snap.num_chunks} chunks, working sets "
            f"{planner.working_set if planner is not None else {}}"
        )
        self._reset(now)
        return line


class MultiModelScheduler:
    grammar_compiler: GrammarCompiler | None = None  # set by runtime.py; None: constraints are refused

    def __init__(
        self,
        runner: ModelRunner,
        kv_pool: KVPool,
        policy: SchedulePolicy,
        eos_ids: dict[str, tuple[int, ...]],
        context_lens: dict[str, int],
        detokenizers: dict[str, Detokenize] | None = None,
        prefix_cache: PrefixCache | None = None,
        prefill_lane: PrefillLane | None = None,
    ) -> None:
        self.runner = runner
        self.lane = prefill_lane  # long prefill chunks on a second thread (see prefill_lane.py)
        self._lane_released: list[Req] = []  # finished while their chunk ran: pages freed after it
        self.kv_pool = kv_pool
        self.prefix_cache = prefix_cache or PrefixCache(kv_pool, enabled=False)
        self.counters: dict[str, dict[str, int]] = {}  # decision -> model -> count (for /metrics)
        self._blocked_logged = 0.0  # when a blocked plan was last logged (DEBUG)
        self.reclaimer = CacheReclaimer(kv_pool, self.prefix_cache, lambda m, n: self._count("reclaim", m, n))
        self.policy = policy
        self.eos_ids = eos_ids
        self.context_lens = context_lens
        self.detokenizers = detokenizers or {}
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self._outputs: list[ReqOutput] = []
        self.num_steps = 0
        self.interval = IntervalStats()

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, req: Req) -> None:
        """Queue a request; raises InvalidRequestError for one that can never be served."""
        if req.model not in self.runner.models:
            raise InvalidRequestError(
                f"model {req.model!r} is not hosted here (hosted: {', '.join(self.runner.models)})"
            )
        if not req.input_ids:
            raise InvalidRequestError("the prompt is empty")
        limit = self.context_lens[req.model]
        if len(req.input_ids) >= limit:
            raise InvalidRequestError(
                f"prompt of {len(req.input_ids)} tokens exceeds model {req.model!r}'s "
                f"context of {limit} tokens"
            )
        planner = self.kv_pool.planner
        if planner is not None:
            need = -(-(len(req.input_ids) + 1) // self.kv_pool.page_tokens)
            most = planner.max_pages(req.model, self.kv_pool.page_bytes(req.model))
            if need > most:
                raise InvalidRequestError(
                    f"prompt of {len(req.input_ids)} tokens needs {need} KV pages but model "
                    f"{req.model!r} may hold at most {most} (its KV ceiling)"
                )
        vocab = self.runner.models[req.model].config.vocab_size
        if any(t < 0 or t >= vocab for t in req.input_ids):
            raise InvalidRequestError(f"input_ids must be in [0, {vocab}) for model {req.model!r}")
        self._verify_sampling(req, vocab)
        if req.return_logprob and req.logprob_start_len == 0:
            req.input_logprobs.append((None, req.input_ids[0]))
            req.input_top_logprobs.append(None)
        self._start_grammar(req)
        self.waiting.append(req)

    def abort(self, rid: str) -> bool:
        """Stop a request wherever it is and free its pages; True if it was found."""
        for req in list(self.waiting) + self.running:
            if req.rid == rid:
                self._finish(req, {"type": "abort", "message": "aborted"})
                return True
        return False

    def close(self) -> None:
        """Let a running lane chunk finish (its pages are then released) and stop the lane's thread."""
        if self.lane is not None:
            self._collect_lane(wait_s=None)
            self.lane.shutdown()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or (self.lane is not None and self.lane.busy))

    # ---- the loop body ------------------------------------------------------------------
    def step(self) -> list[ReqOutput]:
        """One scheduling step; returns the outputs produced since the last call."""
        now = time.monotonic()
        self._collect_lane(wait_s=0.0)
        self._match_prefixes()
        self._observe_demand(now)
        waiting = self._grammar_ready(self._admissible())
        in_lane = [r for r, _ in self.lane.items] if self.lane is not None else []
        running = [r for r in self.running if r not in in_lane]
        lane_free = self.lane is not None and not self.lane.busy
        plan = self.policy.next_batch(waiting, running, page_budget(self.kv_pool), now, lane_free, in_lane)
        if plan is not None and plan.blocked is not None:
            replanned = self.reclaimer.reclaim(
                plan,
                lambda budget: self.policy.next_batch(waiting, running, budget, now, lane_free, in_lane),
                busy=set(models_with_requests(self.running, self.waiting)),
                pinned=self._pinned_pages(),
                unpin=self._unpin_waiting,
            )
            plan = plan if replanned is None else replanned
        if plan is not None and plan.blocked is not None and logger.isEnabledFor(logging.DEBUG):
            self._log_blocked(plan, now)
        items: list[tuple[Req, int]] = []
        if plan is None or plan.empty:
            if self.lane is None or not self.lane.busy:
                self._reject_unservable()
        else:
            items = self.apply(plan)
            if plan.lane is not None and self.lane is not None and plan.lane[0].state is ReqState.RUNNING:
                self.lane.submit([plan.lane])
            if items:
                self.postprocess(items, self._run_timed(items))
            self.num_steps += 1
        if not items and self.lane is not None and self.lane.busy:
            self._collect_lane(wait_s=0.005)  # nothing else to run: wait for the lane, briefly
        out, self._outputs = self._outputs, []
        return out

    def _collect_lane(self, wait_s: float | None) -> None:
        """Take the prefill lane's finished chunk into the requests (or drop it if they finished)."""
        if self.lane is None:
            return
        done = self.lane.poll(wait_s)
        if done is None:
            return
        items, results, elapsed_ms = done
        live = [(r, n) for r, n in items if r.state is ReqState.RUNNING]
        for req in self._lane_released:
            self._release_pages(req)
        self._lane_released = []
        if self.policy.cost is not None:
            self.policy.cost.observe([(r.model, n, r.num_cached) for r, n in items], elapsed_ms)
        self.interval.record(items, elapsed_ms, 0.0, lane=True)
        if live:
            self.postprocess(live, results)

    def _run_timed(self, items: list[tuple[Req, int]]) -> dict[str, StepResult]:
        """Run the step and teach the cost model what it took."""
        work = [(req.model, n, req.num_cached) for req, n in items]
        cost = self.policy.cost
        predicted = cost.estimate_ms(work) if cost is not None else 0.0
        start = time.perf_counter()
        results = self.runner.run(items)
        elapsed = (time.perf_counter() - start) * 1e3
        if cost is not None:
            cost.observe(work, elapsed)
        self.interval.record(items, elapsed, predicted)
        if self.interval.due():
            logger.info("%s", self.interval.flush(self))
        return results

    def _observe_demand(self, now: float) -> None:
        """Tell the planner what each model's ordinary requests hold or will need (its working set
        follows) and what its large requests hold (see `SchedulePolicy.demand`)."""
        planner = self.kv_pool.planner
        if planner is None:
            return
        ordinary, large_held = self.policy.demand(self.running, self.waiting)
        chunk = self.kv_pool.chunk_bytes

        def chunks(pages: dict[str, int]) -> dict[str, int]:
            return {m: -(-n * self.kv_pool.page_bytes(m) // chunk) for m, n in pages.items()}

        planner.observe_demand(chunks(ordinary), now, chunks(large_held))

    def _admissible(self) -> list[Req]:
        """Waiting requests whose model's experts are resident; polls the residency manager
        (keep-alive expiry, evictions, bounded page-ins) so a cold model pages in between steps
        while other models keep decoding."""
        residency = self.runner.residency
        if residency is None:
            return list(self.waiting)
        ready = residency.poll(models_with_requests(self.running, self.waiting))
        return [r for r in self.waiting if r.model in ready]

    def _match_prefixes(self) -> None:
        """Attach cached prefix pages to the waiting requests next in line (bounded: they pin pages)."""
        room = self.policy.args.max_running_requests - len(self.running)
        for req in sorted(self.waiting, key=self.policy.admission_key)[: max(room, 0)]:
            if not req.pages and req.num_cached == 0:
                req.cache_nodes = self.prefix_cache.match(req.model, req.fill_ids)
                req.pages = [n.page for n in req.cache_nodes]
                req.num_cached = len(req.pages) * self.kv_pool.page_tokens
                req.cached_tokens = max(req.cached_tokens, min(req.num_cached, len(req.input_ids)))

    def _pinned_pages(self) -> dict[str, int]:
        """Per model, cached pages that waiting requests hold only as matched prefixes."""
        pinned: dict[str, int] = {}
        for req in self.waiting:
            if req.pages:
                pinned[req.model] = pinned.get(req.model, 0) + len(req.pages)
        return pinned

    def _unpin_waiting(self, keep: Req | None = None) -> None:
        """Let waiting requests (other than `keep`) drop their matched prefixes so they become evictable."""
        for req in self.waiting:
            if req is not keep and req.pages:
                self._release_pages(req)

    def request_pages(self, model: str | None = None) -> int:
        """KV pages held by requests (allocated pages minus unreferenced cached prefixes)."""
        return self.kv_pool.used_pages(model) - self.prefix_cache.evictable_pages(model)

    def flush_cache(self) -> int:
        """Drop every unreferenced cached prefix page; returns pages freed."""
        return self.prefix_cache.flush()

    def _count(self, decision: str, model: str, n: int = 1) -> None:
        per_model = self.counters.setdefault(decision, {})
        per_model[model] = per_model.get(model, 0) + n

    def apply(self, plan: BatchPlan) -> list[tuple[Req, int]]:
        """Retract, admit and allocate pages exactly as planned (the only place pages move)."""
        for req in plan.retract:
            self._retract(req)
        for req in plan.admit:
            self.waiting.remove(req)
            req.state = ReqState.RUNNING
            req.admitted_time = time.monotonic()
            self.running.append(req)
            self._log_admission(req)
        items = []
        for req, n in plan.items + ([plan.lane] if plan.lane is not None else []):
            if req.state is not ReqState.RUNNING:
                continue  # retracted in this same plan
            need = pages_for(req, n, self.kv_pool.page_tokens)
            # privileged: the plan already left other models their working sets
            pages = self.kv_pool.alloc(req.model, need, privileged=True) if need else []
            if pages is None:  # the budget was optimistic: retry next step
                self._retract(req)
                continue
            req.pages += pages
            if plan.lane is None or req is not plan.lane[0]:
                items.append((req, n))
        return items

    def _log_blocked(self, plan: BatchPlan, now: float, after_s: float = 0.5, every_s: float = 0.5) -> None:
        """DEBUG: why a request has waited over `after_s` (at most once per `every_s`) — the pool's
        chunks, spare pages, working sets, cache and request pages per model. The tails of the
        isolation benchmark were found by reading exactly this."""
        req, pages = plan.blocked
        if now - req.arrival_time < after_s or now - self._blocked_logged < every_s:
            return
        self._blocked_logged = now
        budget = page_budget(self.kv_pool)
        planner = self.kv_pool.planner
        logger.debug(
            "blocked %s (%s, %d tokens) for %.2f s: %d pages%s; %d chunks free, owned %s, spare pages %s, "
            "working sets %s, cached pages %s, request pages %s; also blocked %d",
            req.rid,
            req.model,
            len(req.input_ids),
            now - req.arrival_time,
            pages,
            ", overdue" if plan.blocked_overdue else "",
            budget.free_chunks,
            budget.owned,
            budget.spare_pages,
            dict(planner.working_set) if planner is not None else {},
            {m: self.prefix_cache.evictable_pages(m) for m in self.kv_pool.views},
            {m: self.request_pages(m) for m in self.kv_pool.views},
            len(plan.also_blocked),
        )

    def _log_admission(self, req: Req) -> None:
        """Large or overdue admissions are rare and shape everyone's latency: say when and why."""
        now = req.admitted_time
        overdue = now >= self.policy.admission_key(req)
        if not (overdue or self.policy.large(req)):
            return
        logger.info(
            "admit %s (%s, %d tokens, %.0f%% of the pool%s) after %.2f s; %d chunks free, working sets %s",
            req.rid,
            req.model,
            len(req.input_ids),
            100 * self.policy.pool_share(req),
            ", overdue" if overdue else "",
            now - req.arrival_time,
            len(self.kv_pool.free_chunks),
            dict(self.kv_pool.planner.working_set) if self.kv_pool.planner is not None else {},
        )

    def postprocess(self, items: list[tuple[Req, int]], results: dict[str, StepResult]) -> None:
        now = time.monotonic()
        for req, n in items:
            res = results[req.rid]
            req.num_cached += n
            if res.prompt_logprobs:
                req.input_logprobs += res.prompt_logprobs
                req.input_top_logprobs += res.prompt_top or [None] * len(res.prompt_logprobs)
            if res.next_token is None:
                continue
            if req.params.max_new_tokens == 0:  # prompt-only (e.g. logprob scoring): sample nothing
                self._finish(req, {"type": "length", "length": 0})
                continue
            req.output_ids.append(res.next_token)
            if req.first_token_time is None:
                req.first_token_time = now
            if res.next_logprob is not None:
                req.output_logprobs.append((res.next_logprob, res.next_token))
                if res.next_top is not None:
                    req.output_top_logprobs.append(res.next_top)
            reason = self._check_finished(req)
            if reason is not None:
                self._finish(req, reason)
            else:
                self._emit(req, 1)

    # ---- helpers ------------------------------------------------------------------------
    def _check_finished(self, req: Req) -> dict | None:
        token = req.output_ids[-1]
        p = req.params
        if req.grammar is not None and req.grammar.is_terminated():
            return {"type": "stop", "matched": token}  # the constraint is complete (ignore_eos or not)
        if not p.ignore_eos and token in self.eos_ids[req.model]:
            return {"type": "stop", "matched": token}
        if token in p.stop_token_ids:
            return {"type": "stop", "matched": token}
        if p.stop and req.model in self.detokenizers:
            tail = self.detokenizers[req.model](req.output_ids[-(max(len(s) for s in p.stop) + 8) :])
            for s in p.stop:
                if s in tail:
                    return {"type": "stop", "matched": s}
        if len(req.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": len(req.output_ids)}
        if len(req.fill_ids) >= self.context_lens[req.model]:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def _finish(self, req: Req, reason: dict) -> None:
        already_emitted = req.finished
        req.finish(reason)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._release_pages(req)
        self._release_sampling(req)
        if not already_emitted:
            self._emit(req, 1 if req.output_ids and reason["type"] != "abort" else 0)

    def _retract(self, req: Req) -> None:
        """Give the pages back and requeue; the tokens so far are kept (their full pages stay cached)."""
        self._release_pages(req)
        req.state, req.admitted_time = ReqState.WAITING, None
        req.num_retractions += 1
        if req in self.running:
            self.running.remove(req)
        self.waiting.appendleft(req)
        self._count("preempt", req.model)
        logger.info("preempt %s (%s): KV pages short, %d tokens kept", req.rid, req.model, len(req.fill_ids))

    def _release_pages(self, req: Req) -> None:
        if self.lane is not None and self.lane.holds(req):  # its chunk still writes these pages
            self._lane_released.append(req)
            return
        if req.pages:
            self.prefix_cache.release(req.model, req.fill_ids, req.pages, req.num_cached, req.cache_nodes)
        req.pages, req.cache_nodes, req.num_cached = [], [], 0

    def _reject_unservable(self) -> None:
        """Nothing can run: a head-of-line request that can't fit in an empty pool never will."""
        if self.running or not self.waiting or self._grammars_pending():
            return
        self._unpin_waiting()
        self.prefix_cache.flush()
        req = min(self.waiting, key=self.policy.admission_key)
        need = -(-len(req.fill_ids) // self.kv_pool.page_tokens) - len(req.pages)
        if page_budget(self.kv_pool).try_take(req.model, need):
            return  # it fits now that the cache is flushed; the next step admits it
        self._finish(
            req,
            {
                "type": "abort",
                "message": f"request needs more KV cache than the pool holds ({len(req.fill_ids)} tokens)",
                "status_code": 400,
            },
        )

    # ---- sampling surface: grammars, per-request sampling state (issue 12) -----------------
    def _verify_sampling(self, req: Req, vocab: int) -> None:
        """Checks that need the model: logit_bias token ids, a grammar without a backend."""
        bias = req.params.logit_bias or {}
        if any(t >= vocab for t in bias):
            raise InvalidRequestError(f"logit_bias keys must be in [0, {vocab - 1}] for model {req.model!r}")
        if req.params.grammar is not None and self.grammar_compiler is None:
            raise InvalidRequestError(f"{req.params.grammar[0]} is not supported: no grammar backend")

    def _start_grammar(self, req: Req) -> None:
        """Compile the request's constraint off the step loop (the compiler's thread pool, cached)."""
        if req.params.grammar is not None and req.grammar is None:
            req.grammar_future = self.grammar_compiler.compile(req.model, *req.params.grammar)

    def _grammar_ready(self, waiting: list[Req]) -> list[Req]:
        """Waiting requests minus those whose grammar still compiles; attach compiled ones, and
        finish a request whose grammar failed with a 400 naming its field."""
        pending = [r.grammar_future for r in waiting if r.grammar_future is not None]
        if pending and not self.running and len(pending) == len(waiting):
            wait_futures(pending, timeout=_GRAMMAR_IDLE_WAIT_S, return_when=FIRST_COMPLETED)  # idle: no spin
        ready = []
        for req in waiting:
            fut = req.grammar_future
            if fut is not None:
                if not fut.done():
                    continue
                req.grammar_future = None
                try:
                    req.grammar, req.grammar_accepted = fut.result(), 0
                except InvalidGrammarError as e:
                    self._finish(
                        req, {"type": "abort", "message": str(e), "status_code": 400, "param": e.field}
                    )
                    continue
                except Exception as e:  # a backend failure is the server's, not the request's
                    logger.exception("grammar compilation failed for %s", req.rid)
                    self._finish(
                        req, {"type": "abort", "message": f"grammar backend error: {e}", "status_code": 500}
                    )
                    continue
            ready.append(req)
        return ready

    def _grammars_pending(self) -> bool:
        return any(r.grammar_future is not None for r in self.waiting)

    def _release_sampling(self, req: Req) -> None:
        release = getattr(self.runner, "release_sampling", None)
        if release is not None:
            release(req)
        if req.grammar_future is not None:
            req.grammar_future.cancel()

    def _emit(self, req: Req, num_new: int) -> None:
        new = req.output_ids[len(req.output_ids) - num_new :] if num_new else []
        lps = (
            req.output_logprobs[len(req.output_logprobs) - num_new :]
            if num_new and req.return_logprob
            else []
        )
        tops = req.output_top_logprobs[-num_new:] if num_new and req.top_logprobs_num else []
        # once, complete: with the first token (or the finish of a prompt-only request)
        send_input = (
            req.return_logprob and not req.input_logprobs_sent and bool(req.finished or req.output_ids)
        )
        req.input_logprobs_sent = req.input_logprobs_sent or send_input
        self._outputs.append(
            ReqOutput(
                rid=req.rid,
                model=req.model,
                new_token_ids=list(new),
                new_logprobs=list(lps),
                new_top_logprobs=list(tops),
                finished=req.finished,
                finish_reason=req.finish_reason,
                prompt_tokens=len(req.input_ids),
                completion_tokens=len(req.output_ids),
                input_logprobs=list(req.input_logprobs) if send_input else None,
                input_top_logprobs=list(req.input_top_logprobs) if send_input else None,
                num_retractions=req.num_retractions,
                cached_tokens=req.cached_tokens,  # the client's usage report (it read 0 before)
            )
        )

    # ---- failures: the server process turns an exception into errors of the requests it hit ----
    def fail_request(self, rid: str, message: str, status_code: int = 500) -> bool:
        """Finish one request with an error (its client gets `status_code`); True if it was found."""
        for req in list(self.waiting) + self.running:
            if req.rid == rid:
                self._fail(req, message, status_code)
                return True
        return False

    def fail_step(self, message: str, status_code: int = 500) -> list[ReqOutput]:
        """After `step()` raised: fail that step's batch (the running requests; the waiting ones when
        none ran, since then admission itself raised), free their pages, return all pending outputs."""
        victims = list(self.running) or list(self.waiting)
        for req in victims:
            self._fail(req, message, status_code)
        out, self._outputs = self._outputs, []
        return out

    def _fail(self, req: Req, message: str, status_code: int) -> None:
        reason = {"type": "abort", "message": message, "status_code": status_code}
        try:
            self._finish(req, reason)
        except Exception:  # its state is broken: drop it from the queues even if pages stay behind
            logger.exception("could not release %s cleanly", req.rid)
            req.finish(reason)
            for queue in (self.running, self.waiting):
                if req in queue:
                    queue.remove(req)
            self._emit(req, 0)
