"""The multi-model scheduler: request queues of every model over one KV pool.

It is the only place that allocates or frees KV pages. The loop is::

    match_prefixes(waiting)                # reuse cached pages (prefix cache)
    plan = policy.next_batch(waiting, running, page_budget(kv_pool))
    if plan.blocked: reclaim(); re-plan    # cached prefixes of idle, then busy models
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

from crosspool_sgl.managers.model_runner import ModelRunner, StepResult
from crosspool_sgl.managers.req import Req, ReqOutput, ReqState
from crosspool_sgl.managers.schedule_policy import BatchPlan, SchedulePolicy, pages_for
from crosspool_sgl.mem.kv_pool import KVPool, page_budget
from crosspool_sgl.mem.prefix_cache import PrefixCache
from crosspool_sgl.mem.residency_manager import models_with_requests
from crosspool_sgl.sampling_params import InvalidRequestError

logger = logging.getLogger(__name__)

Detokenize = Callable[[list[int]], str]


class MultiModelScheduler:
    def __init__(
        self,
        runner: ModelRunner,
        kv_pool: KVPool,
        policy: SchedulePolicy,
        eos_ids: dict[str, tuple[int, ...]],
        context_lens: dict[str, int],
        detokenizers: dict[str, Detokenize] | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.runner = runner
        self.kv_pool = kv_pool
        self.prefix_cache = prefix_cache or PrefixCache(kv_pool, enabled=False)
        self.counters: dict[str, dict[str, int]] = {}  # decision -> model -> count (for /metrics)
        self.policy = policy
        self.eos_ids = eos_ids
        self.context_lens = context_lens
        self.detokenizers = detokenizers or {}
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self._outputs: list[ReqOutput] = []
        self.num_steps = 0

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
        if req.return_logprob and req.logprob_start_len == 0:
            req.input_logprobs.append((None, req.input_ids[0]))
            req.input_top_logprobs.append(None)
        self.waiting.append(req)

    def abort(self, rid: str) -> bool:
        """Stop a request wherever it is and free its pages; True if it was found."""
        for req in list(self.waiting) + self.running:
            if req.rid == rid:
                self._finish(req, {"type": "abort", "message": "aborted"})
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the loop body ------------------------------------------------------------------
    def step(self) -> list[ReqOutput]:
        """One scheduling step; returns the outputs produced since the last call."""
        self._match_prefixes()
        waiting = self._admissible()
        plan = self.policy.next_batch(waiting, self.running, page_budget(self.kv_pool))
        if plan is not None and plan.blocked is not None and self._reclaim(*plan.blocked):
            plan = self.policy.next_batch(waiting, self.running, page_budget(self.kv_pool))
        if plan is None:
            self._reject_unservable()
        else:
            items = self.apply(plan)
            if items:
                self.postprocess(items, self.runner.run(items))
            self.num_steps += 1
        out, self._outputs = self._outputs, []
        return out

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

    def _unpin_waiting(self, keep: Req | None = None) -> None:
        """Let waiting requests (other than `keep`) drop their matched prefixes so they become evictable."""
        for req in self.waiting:
            if req is not keep and req.pages:
                self._release_pages(req)

    def _reclaim(self, blocked: Req, pages: int) -> bool:
        """Evict cached prefixes — idle models first, then busy ones — until `blocked` fits."""
        pinned = any(r.pages for r in self.waiting if r is not blocked)
        if not pinned and not self.prefix_cache.evictable_pages():
            return False  # nothing to win back: skip the per-model scans on this (frequent) path
        self._unpin_waiting(keep=blocked)
        busy = {r.model for r in self.running} | {r.model for r in self.waiting}
        order = sorted(self.kv_pool.views, key=lambda m: (m in busy, m != blocked.model))
        evicted_any = False
        for model in order:
            while self.prefix_cache.evictable_pages(model):
                if page_budget(self.kv_pool).try_take(blocked.model, pages):
                    return evicted_any
                n = self.prefix_cache.evict(model, max(pages, 8))
                self._count("reclaim", model, n)
                logger.info(
                    "reclaim %d cached pages of %s (%s) for %s",
                    n,
                    model,
                    "busy" if model in busy else "idle",
                    blocked.model,
                )
                evicted_any = True
        return evicted_any

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
            self.running.append(req)
        items = []
        for req, n in plan.items:
            if req.state is not ReqState.RUNNING:
                continue  # retracted in this same plan
            need = pages_for(req, n, self.kv_pool.page_tokens)
            pages = self.kv_pool.alloc(req.model, need) if need else []
            if pages is None:  # the budget was optimistic: retry next step
                self._retract(req)
                continue
            req.pages += pages
            items.append((req, n))
        return items

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
        if not already_emitted:
            self._emit(req, 1 if req.output_ids and reason["type"] != "abort" else 0)

    def _retract(self, req: Req) -> None:
        """Give the pages back and requeue; the tokens so far are kept (their full pages stay cached)."""
        self._release_pages(req)
        req.state = ReqState.WAITING
        req.num_retractions += 1
        if req in self.running:
            self.running.remove(req)
        self.waiting.appendleft(req)
        self._count("preempt", req.model)
        logger.info("preempt %s (%s): KV pages short, %d tokens kept", req.rid, req.model, len(req.fill_ids))

    def _release_pages(self, req: Req) -> None:
        if req.pages:
            self.prefix_cache.release(req.model, req.fill_ids, req.pages, req.num_cached, req.cache_nodes)
        req.pages, req.cache_nodes, req.num_cached = [], [], 0

    def _reject_unservable(self) -> None:
        """Nothing can run: a head-of-line request that can't fit in an empty pool never will."""
        if self.running or not self.waiting:
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

    def _emit(self, req: Req, num_new: int) -> None:
        new = req.output_ids[len(req.output_ids) - num_new :] if num_new else []
        lps = (
            req.output_logprobs[len(req.output_logprobs) - num_new :]
            if num_new and req.return_logprob
            else []
        )
        tops = req.output_top_logprobs[-num_new:] if num_new and req.top_logprobs_num else []
        send_input = req.return_logprob and (req.finished or len(req.output_ids) == 1)
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
