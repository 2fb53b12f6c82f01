"""The tokenizer side of the server (runs in the HTTP process): one manager, a tokenizer per model.

It validates and tokenizes requests, sends them to the scheduler process over
ZMQ, and turns the detokenizer's outputs back into SGLang-shaped results
(`text`, `output_ids`, `meta_info`). Field names follow SGLang's
`GenerateReqInput`/`TokenizerManager` so the native API matches SGLang's.

Why not a subclass of SGLang's TokenizerManager: its `__init__` reads the
process-global runtime context (`assert_published(server_args)`, `get_serving()`,
...) and builds one model config, one tokenizer and one set of ZMQ sockets from
it. Several instances, one per model, cannot coexist in one process (the
context is process-wide and not async-safe), and one instance cannot hold
several tokenizers without overriding most of its 4,000 lines. We keep its
message names and response shapes instead: it sends SGLang's own structs to the scheduler
(`TokenizedGenerateReqInput` with the model added, built in `validation.py`; `AbortReq`,
`FlushCacheReqInput`, `GetInternalStateReq`) and reads SGLang's `BatchStrOutput` from the
detokenizer (SGLang's DetokenizerManager, one tokenizer per model: managers/detokenizer_process.py).
SGLANG_FRONTEND.md has the detailed
assessment; SGLang's OpenAI handlers run on this manager through
`entrypoints/sglang_openai.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from sglang.srt.managers.io_struct import async_sock_recv, sock_send

from crosspool_sgl.managers.admission import QueueBounds
from crosspool_sgl.managers.errors import RequestError, unavailable
from crosspool_sgl.managers.io_struct import (
    AbortReq,
    BatchStrOutput,
    FlushCacheReqInput,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
)
from crosspool_sgl.managers.output_delta import OutputDelta
from crosspool_sgl.managers.result_format import LogprobLists, format_result
from crosspool_sgl.managers.validation import check_prompt, check_request, tokenized_request
from crosspool_sgl.sampling_params import SamplingParams

__all__ = ["GenerateInput", "ModelInfo", "MultiModelTokenizerManager", "RequestError"]

# Texts longer than this are tokenised in a worker thread: the event loop serves every model, and a
# 50 MB prompt tokenised on it stalled /health for over a minute.
_TOKENIZE_INLINE_CHARS = 4096
_DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there

logger = logging.getLogger(__name__)


@dataclass
class GenerateInput:
    """One normalised generation request (a batch is split into these)."""

    model: str
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    rid: str | None = None
    stream: bool = False  # SGLang's TokenizedGenerateReqInput.stream: whether the client streams


@dataclass
class ModelInfo:
    name: str
    path: str
    context_len: int
    vocab_size: int
    architecture: str
    tool_call_parser: str | None = None  # SGLang's parser for `tools` (entrypoints/tool_parsers.py)


@dataclass
class ReqState:
    """What the HTTP side knows about one in-flight request."""

    obj: GenerateInput
    prompt_ids: list[int]
    created: float = field(default_factory=time.monotonic)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    pending: list[OutputDelta] = field(default_factory=list)
    finished: bool = False
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)
    input_logprobs: list | None = None
    input_top_logprobs: list | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    last_token_time: float | None = None
    error: RequestError | None = None  # set when the engine failed it (e.g. a child process died)


@dataclass
class MetricsHooks:
    """Callables the tokenizer side reports to (Prometheus lives in entrypoints/metrics.py)."""

    on_request: Callable[[str], None] = lambda model: None
    on_first_token: Callable[[str, float], None] = lambda model, s: None
    on_inter_token: Callable[[str, float], None] = lambda model, s: None
    on_finish: Callable[[str, dict, int, int], None] = lambda model, reason, p, c: None


class MultiModelTokenizerManager:
    def __init__(
        self,
        models: dict[str, ModelInfo],
        tokenizers: dict[str, Any],
        send_addr: str,
        recv_addr: str,
        metrics: MetricsHooks | None = None,
        max_pending_requests: int = 4096,
        max_pending_per_model: int | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.models = models
        self.bounds = QueueBounds(max_pending_requests, max_pending_per_model)
        self.request_timeout_s = request_timeout_s
        self.tokenizers = tokenizers
        self.send_addr, self.recv_addr = send_addr, recv_addr
        self.metrics = metrics or MetricsHooks()
        self.rid_to_state: dict[str, ReqState] = {}
        self.control_futures: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._token_chars: dict[str, int] = {}
        self.dead_reason: str | None = None  # set by the watchdog: every request answers 503
        self.draining = False  # SIGTERM: new requests answer 503, in-flight ones finish
        self.dispatch = {
            BatchStrOutput: self.handle_batch_str_output,
            GetInternalStateReqOutput: self.handle_control_output,
            FlushCacheReqOutput: self.handle_control_output,
        }

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    async def start(self) -> None:
        """Open the sockets and start the receive loop (call inside the server's event loop)."""
        self.context = zmq.asyncio.Context(2)
        self.receiver = self.context.socket(zmq.PULL)
        self.receiver.bind(self.recv_addr)
        self.sender = self.context.socket(zmq.PUSH)
        self.sender.connect(self.send_addr)
        self.loop_task = asyncio.create_task(self.handle_loop())

    async def stop(self) -> None:
        self.loop_task.cancel()
        self.context.destroy(linger=0)

    async def handle_loop(self) -> None:
        while True:
            msg = await async_sock_recv(self.receiver)
            try:
                self.dispatch[type(msg)](msg)
            except Exception:  # one bad message must not kill the loop
                logger.exception("failed to handle %s", type(msg).__name__)

    # ---- generation ---------------------------------------------------------------------
    def resolve_model(self, name: str | None) -> str:
        name = name or self.default_model
        if not isinstance(name, str):
            raise RequestError("`model` must be a string", param="model")
        if name not in self.models:
            raise RequestError(
                f"The model `{name}` does not exist. Hosted models: {', '.join(self.models)}",
                404,
                "NotFoundError",
                "model",
            )
        return name

    def prepare(self, obj: GenerateInput) -> tuple[SamplingParams, list[int]]:
        """Check every field and tokenise (no I/O); raises RequestError. Safe to run in a thread."""
        info = self.models[obj.model]
        params = check_request(obj, info.vocab_size)
        ids = list(obj.input_ids) if obj.input_ids is not None else self._encode(obj)
        check_prompt(ids, params, info.context_len, info.vocab_size, obj.model)
        return params, ids

    def _encode(self, obj: GenerateInput) -> list[int]:
        info = self.models[obj.model]
        if len(obj.text) > info.context_len * self._max_token_chars(obj.model) * 2:
            # No tokenisation can fit this in the context (a 50 MB prompt took ~60 s to refuse): say so now.
            raise RequestError(
                f"This model's maximum context length is {info.context_len} tokens; a prompt of "
                f"{len(obj.text)} characters cannot fit it (model {obj.model!r})",
                param="prompt",
            )
        try:
            return self.tokenizers[obj.model].encode(obj.text)
        except Exception as e:  # the tokenizer's own refusal is the client's error, not ours
            raise RequestError(f"the prompt cannot be tokenised: {e}", param="prompt") from e

    def _max_token_chars(self, model: str) -> int:
        """Longest vocabulary entry in characters: a prompt has at least len(text) / this many tokens."""
        if model not in self._token_chars:
            vocab = getattr(self.tokenizers[model], "get_vocab", dict)()
            self._token_chars[model] = max(16, max(map(len, vocab), default=0))
        return self._token_chars[model]

    def check_admission(self, model: str, num_new: int) -> None:
        """Refuse before anything is tokenised or sent: 503 when down, 400/429 beyond a queue bound."""
        if self.dead_reason is not None:
            raise unavailable(self.dead_reason)
        if self.draining:
            raise unavailable("the server is shutting down")
        in_flight: dict[str, int] = dict.fromkeys(self.models, 0)
        for state in self.rid_to_state.values():
            in_flight[state.obj.model] += 1
        self.bounds.check(model, num_new, in_flight, list(self.models))

    def submit(
        self, obj: GenerateInput, prepared: tuple[SamplingParams, list[int]] | None = None
    ) -> ReqState:
        """Validate, tokenize and send one request; raises RequestError before anything is sent."""
        obj.model = self.resolve_model(obj.model)
        self.check_admission(obj.model, 1)
        params, ids = prepared or self.prepare(obj)
        obj.rid = obj.rid or f"{uuid.uuid4().hex}-{next(self._ids)}"
        if obj.rid in self.rid_to_state:
            raise RequestError(f"duplicate request id {obj.rid!r}", param="rid")
        msg = tokenized_request(obj, ids, params, self.tokenizers[obj.model])
        state = ReqState(obj, ids)
        self.rid_to_state[obj.rid] = state
        sock_send(self.sender, msg)
        self.metrics.on_request(obj.model)
        return state

    async def submit_all(self, objs: list[GenerateInput]) -> list[ReqState]:
        """Check, tokenise (long texts off the event loop) and send a batch; all or nothing."""
        if not objs:
            raise RequestError("the request asks for no generation", param="n")
        for obj in objs:
            obj.model = self.resolve_model(obj.model)
        model = objs[0].model  # one request's generations are of one model
        self.check_admission(model, len(objs))
        prepared: dict[int, tuple[SamplingParams, list[int]]] = {}
        for i, obj in enumerate(objs):
            if isinstance(obj.text, str) and obj.input_ids is None and len(obj.text) > _TOKENIZE_INLINE_CHARS:
                prepared[i] = await asyncio.to_thread(self.prepare, obj)
            else:
                prepared[i] = self.prepare(obj)
        self.check_admission(model, len(objs))  # again: others may have been admitted while we tokenised
        states: list[ReqState] = []
        try:
            for i, obj in enumerate(objs):
                states.append(self.submit(obj, prepared[i]))
        except RequestError:
            for s in states:
                self.abort_request(s.obj.rid)
            raise
        return states

    async def generate_request(
        self, obj: GenerateInput, is_disconnected: Callable | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Submit one request and yield its cumulative results (see `wait_for`)."""
        (state,) = await self.submit_all([obj])
        async for result in self.wait_for(state, is_disconnected):
            yield result

    async def wait_for(
        self, state: ReqState, is_disconnected: Callable | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield cumulative SGLang-shaped results until the request finishes; abort it if we stop early.

        The client is polled every `_DISCONNECT_POLL_S` whether or not tokens arrive: a non-streaming
        request whose client left used to run to max_tokens, because outputs kept the poll from firing.
        """
        rid = state.obj.rid
        last_poll = time.monotonic()
        try:
            while True:
                try:
                    await asyncio.wait_for(state.event.wait(), timeout=_DISCONNECT_POLL_S)
                except TimeoutError:
                    pass
                if is_disconnected is not None and time.monotonic() - last_poll >= _DISCONNECT_POLL_S:
                    last_poll = time.monotonic()
                    if await is_disconnected():
                        logger.info("client disconnected; abort %s", rid)
                        return
                if state.error is not None:
                    state.finished = True  # nothing to abort: the engine side is gone
                    raise state.error
                if (
                    self.request_timeout_s is not None
                    and time.monotonic() - state.created > self.request_timeout_s
                ):
                    raise RequestError(
                        f"request {rid} exceeded its deadline of {self.request_timeout_s:g} s "
                        "(--request-timeout); aborted",
                        504,
                        "TimeoutError",
                    )
                if not state.event.is_set():
                    continue
                state.event.clear()
                outs, state.pending = state.pending, []
                for out in outs:
                    self.apply_output(state, out)
                yield self.result(state)
                if state.finished:
                    return
        finally:
            if not state.finished:
                self.abort_request(rid)
            self.rid_to_state.pop(rid, None)

    async def collect(self, state: ReqState, is_disconnected: Callable | None = None) -> dict[str, Any]:
        """Run a submitted request to completion and return its final result."""
        final: dict[str, Any] = {}
        async for result in self.wait_for(state, is_disconnected):
            final = result
        return final

    async def merge_streams(self, states: list[ReqState]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(index, cumulative result) of several submitted requests as they arrive (n > 1, batches).

        Leaving early (a disconnect) cancels the pumps, which aborts their requests in the scheduler.
        """
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, state: ReqState) -> None:
            try:
                async for result in self.wait_for(state):
                    await queue.put((index, result, None))
            except RequestError as e:
                await queue.put((index, None, e))
            await queue.put((index, None, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(states)]
        try:
            live = len(tasks)
            while live:
                index, result, err = await queue.get()
                if err is not None:
                    raise err
                if result is None:
                    live -= 1
                    continue
                yield index, result
        finally:
            for t in tasks:
                t.cancel()

    def fail_all(self, message: str) -> None:
        """The engine is gone (a child process died): every in-flight and later request gets 503 now."""
        self.dead_reason = message
        err = unavailable(message)
        for state in list(self.rid_to_state.values()):
            state.error = err
            state.event.set()
        for fut in self.control_futures.values():
            if not fut.done():
                fut.set_exception(unavailable(message))

    def abort_request(self, rid: str) -> None:
        if self.rid_to_state.pop(rid, None) is not None:
            sock_send(self.sender, AbortReq(rid=rid))

    def handle_batch_str_output(self, batch: BatchStrOutput) -> None:
        """SGLang's BatchStrOutput from the detokenizer: each row is queued on its request."""
        for i, rid in enumerate(batch.rids or []):
            state = self.rid_to_state.get(rid)
            if state is None:
                continue  # aborted by us; late output
            state.pending.append(OutputDelta.of(batch, i))
            state.event.set()

    def apply_output(self, state: ReqState, out: OutputDelta) -> None:
        now = time.monotonic()
        model = state.obj.model
        if out.token_ids:
            if state.last_token_time is None:
                self.metrics.on_first_token(model, now - state.created)
            else:
                self.metrics.on_inter_token(model, (now - state.last_token_time) / len(out.token_ids))
            state.last_token_time = now
        state.text += out.text
        state.output_ids += out.token_ids
        state.output_logprobs += out.logprobs
        state.output_top_logprobs += out.top_logprobs
        if out.input_logprobs is not None:
            state.input_logprobs, state.input_top_logprobs = out.input_logprobs, out.input_top_logprobs
        state.meta = {
            "id": state.obj.rid,
            "model": model,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
            "num_retractions": out.num_retractions,
            "e2e_latency": now - state.created,
        }
        if out.finish_reason is not None:
            state.finished = True
            reason = out.finish_reason or {}
            self.metrics.on_finish(model, reason, out.prompt_tokens, out.completion_tokens)
            if reason.get("status_code"):
                raise RequestError(
                    reason.get("message", "bad request"), reason["status_code"], param=reason.get("param")
                )

    def result(self, state: ReqState) -> dict[str, Any]:
        obj = state.obj
        logprobs = None
        if obj.return_logprob:
            tops = obj.top_logprobs_num > 0
            logprobs = LogprobLists(
                state.output_logprobs,
                state.input_logprobs or [],
                state.output_top_logprobs if tops else None,
                state.input_top_logprobs if tops else None,
            )
        tok = self.tokenizers[obj.model]
        decode = (lambda t: tok.decode([t])) if obj.return_text_in_logprobs else None
        return format_result(state.text, state.output_ids, state.meta, logprobs, decode)

    # ---- control ------------------------------------------------------------------------
    async def control(self, msg_type: type, timeout: float = 10.0) -> Any:
        if self.dead_reason is not None:
            raise unavailable(self.dead_reason)
        req_id = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self.control_futures[req_id] = fut
        sock_send(self.sender, msg_type(rid=req_id))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.control_futures.pop(req_id, None)

    async def get_scheduler_info(self) -> dict[str, Any]:
        return (await self.control(GetInternalStateReq)).internal_state

    async def flush_cache(self) -> bool:
        return (await self.control(FlushCacheReqInput)).success

    def handle_control_output(self, msg: GetInternalStateReqOutput | FlushCacheReqOutput) -> None:
        fut = self.control_futures.get(msg.rid)
        if fut is not None and not fut.done():
            fut.set_result(msg)
