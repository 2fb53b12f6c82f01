"""The multi-model scheduler: request queues of every model over one KV pool.

It is the only place that allocates or frees KV pages. The loop is::

    plan = policy.next_batch(waiting, running, page_budget(kv_pool))
    apply(plan)                            # retract, allocate
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
    ) -> None:
        self.runner = runner
        self.kv_pool = kv_pool
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
        plan = self.policy.next_batch(self.waiting, self.running, page_budget(self.kv_pool))
        if plan is None:
            self._reject_unservable()
        else:
            items = self.apply(plan)
            if items:
                self.postprocess(items, self.runner.run(items))
            self.num_steps += 1
        out, self._outputs = self._outputs, []
        return out

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
        if req.pages:
            self.kv_pool.free(req.model, req.pages)
            req.pages = []
        if not already_emitted:
            self._emit(req, 1 if req.output_ids and reason["type"] != "abort" else 0)

    def _retract(self, req: Req) -> None:
        """Give the pages back and requeue at the front; the tokens so far are kept."""
        if req.pages:
            self.kv_pool.free(req.model, req.pages)
        req.pages, req.num_cached = [], 0
        req.state = ReqState.WAITING
        req.num_retractions += 1
        if req in self.running:
            self.running.remove(req)
        self.waiting.appendleft(req)
        logger.info("retract %s (%s): KV pages short, %d tokens kept", req.rid, req.model, len(req.fill_ids))

    def _reject_unservable(self) -> None:
        """Nothing can run: a head-of-line request that can't fit in an empty pool never will."""
        if self.running or not self.waiting or self.kv_pool.used_pages() > 0:
            return
        req = self.waiting[0]
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
