"""SGLang's `TokenizerManager`, one instance per hosted model, all in the HTTP process.

SGLang's manager does the work: `GenerateReqInput` normalisation, tokenisation, `SamplingParams`
building and checks, n > 1 (a prompt-only request first, so the samples share its cached pages),
batches, streaming, the result dicts (stop trimming, logprob entries), and its control
communicators. The subclass changes what several managers in one process need, and adds what a
production server needs that SGLang's manager leaves to others:
- `__init__`: built under the model's own SGLang runtime context (`create_context` +
  `use_context`), so `assert_published` and the per-model config (model config, tokenizer,
  context length) are that model's; what the manager reads at request time is model-independent
  and comes from the one context the process published;
- `init_ipc_channels`: it *connects* its PUSH to our scheduler process (which binds one address
  for every manager) and binds its own PULL at a per-model address; that address is stamped on
  everything it sends (`http_worker_ipc`, as SGLang's managers do with `tokenizer_worker_num > 1`),
  so the scheduler and the detokenizer send each reply to the manager that asked;
- `tokenized_generate_req_type`: our `MultiModelTokenizedGenerateReqInput`, SGLang's struct with
  the model added;
- `auto_create_handle_loop`: starts the receive loop only. SGLang's also installs SIGTERM/SIGQUIT
  loop handlers (one per instance, the last one wins) and a watchdog that kills the process tree
  on shutdown; the launcher and uvicorn own shutdown here;
- admission (queue bounds shared by every model, 503 when the engine is gone) and our field checks
  (`validation.py`) before anything is tokenised or sent, the prompt checks after tokenising;
- a client that leaves, or a request past `--request-timeout`, is aborted within
  `DISCONNECT_POLL_S` whether or not outputs arrive (SGLang polls only after 4 s without output);
- n > 1 with a seed: sample j gets `seed + j` (SGLang's copies share one seed: identical samples);
- streamed results with logprobs are held back until their text shows (`stream_holdback.py`);
- Prometheus hooks per output, and `fail_all` when a child process died.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import zmq
import zmq.asyncio
from sglang.srt.managers.tokenizer_manager import TokenizerManager, print_exception_wrapper
from sglang.srt.runtime_context import create_context, use_context
from sglang.srt.server_args import PortArgs, ServerArgs
from sglang.srt.utils import get_or_create_event_loop
from sglang.srt.utils.network import get_zmq_socket

from crosspool_sgl.managers.errors import RequestError, for_sglang
from crosspool_sgl.managers.io_struct import MultiModelTokenizedGenerateReqInput
from crosspool_sgl.managers.metrics_hooks import MetricsHooks
from crosspool_sgl.managers.stream_holdback import StreamHoldback
from crosspool_sgl.managers.validation import (
    check_num_choices,
    check_prompt,
    check_request,
    check_request_ids,
    check_supported_fields,
    our_sampling_params,
    rename_seed,
)

__all__ = ["ModelAddresses", "ModelInfo", "ModelTokenizerManager", "model_port_args", "model_server_args"]

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks its client and its deadline
# Texts longer than this are tokenised in a worker thread: one event loop serves every model, and a
# 50 MB prompt tokenised on it stalled /health for over a minute.
TOKENIZE_INLINE_CHARS = 4096
_SAMPLE_COUNTER = "_crosspool_sample_counter"  # on the sub-requests of an n > 1 request
_OUR_PARAMS = "_crosspool_sampling_params"  # our parse of a request's sampling params, for the prompt check
_PER_MODEL_CONFIG = frozenset({"tool_call_parser", "reasoning_parser"})


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP side knows of a hosted model before its manager exists."""

    name: str
    path: str
    context_len: int
    vocab_size: int
    architecture: str
    tool_call_parser: str | None = None  # SGLang's parser for `tools` (entrypoints/tool_parsers.py)


@dataclass(frozen=True)
class ModelAddresses:
    """Where one model's manager sends (the scheduler's one input) and receives (its own)."""

    scheduler: str
    own: str


class Admission(Protocol):
    """Shared by every model's manager: the queue bounds and whether the engine still serves."""

    def check_admission(self, model: str, num_new: int) -> None: ...


def model_server_args(name: str, path: str, **overrides: Any) -> ServerArgs:
    """The SGLang config one model's manager is built from (its path and served name)."""
    return ServerArgs(model_path=path, device="cpu", served_model_name=name, **overrides)


def model_port_args(addresses: ModelAddresses) -> PortArgs:
    """Only the two names `init_ipc_channels` reads are meaningful."""
    return PortArgs(
        tokenizer_ipc_name=addresses.own,
        scheduler_input_ipc_name=addresses.scheduler,
        detokenizer_ipc_name="",
        nccl_port=0,
        rpc_ipc_name="",
        metrics_ipc_name="",
        tokenizer_worker_ipc_name=None,
        decoupled_spec_ipc_config=None,
    )


def _aborted_result(rid: Any, weight_version: str) -> dict[str, Any]:
    meta = {
        "id": rid,
        "finish_reason": {"type": "abort", "message": "client disconnected"},
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "weight_version": weight_version,
    }
    return {"text": "", "output_ids": [], "meta_info": meta}


class ModelTokenizerManager(TokenizerManager):
    """SGLang's TokenizerManager for one of several models served by one scheduler process."""

    def __init__(
        self,
        info: ModelInfo,
        server_args: ServerArgs,
        addresses: ModelAddresses,
        admission: Admission | None = None,
        metrics: MetricsHooks | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.model = info.name
        self.info = info
        self.admission = admission
        self.metrics = metrics or MetricsHooks()
        self.request_timeout_s = request_timeout_s
        self.max_token_chars: int | None = None
        self._timing: dict[str, list[float]] = {}  # rid -> [sent, last output, tokens so far]
        # The scheduler process routes by this field (managers/scheduler_process.py).
        self.tokenized_generate_req_type = functools.partial(
            MultiModelTokenizedGenerateReqInput, model=self.model
        )
        # Synchronous and before any request: no coroutine sees the swapped context.
        with use_context(create_context(server_args, role="tokenizer")):
            super().__init__(server_args, model_port_args(addresses), start_pd_bootstrap_service=False)

    # ---- the process's sockets and loop --------------------------------------------------------
    def init_ipc_channels(self, port_args: PortArgs) -> None:
        # The process's one asyncio context, not one per manager as SGLang's: a manager dropped
        # without close() (a failed start) otherwise hung the process in its context's __del__
        # (zmq_term waits for sockets the garbage collector had not closed yet).
        context = zmq.asyncio.Context.instance()
        self.recv_from_detokenizer = get_zmq_socket(context, zmq.PULL, port_args.tokenizer_ipc_name, True)
        self.send_to_scheduler = get_zmq_socket(context, zmq.PUSH, port_args.scheduler_input_ipc_name, False)
        # SGLang's `_dispatch_to_scheduler` stamps this on every request and control message.
        self.tokenizer_ipc_name = port_args.tokenizer_ipc_name
        self.load_snapshot_reader = None  # DP load reports (/v1/loads): our scheduler writes none

    def auto_create_handle_loop(self) -> None:
        if self.event_loop is not None:
            return
        loop = get_or_create_event_loop()
        self.asyncio_tasks.add(loop.create_task(print_exception_wrapper(self.handle_loop)))
        self.event_loop = loop

    async def close(self) -> None:
        """Stop the receive loop and close the sockets (the launcher stops the other processes)."""
        tasks = list(self.asyncio_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.asyncio_tasks.clear()
        self.event_loop = None
        for sock in (self.recv_from_detokenizer, self.send_to_scheduler):
            sock.close(linger=0)

    # ---- a request's way in --------------------------------------------------------------------
    async def generate_request(self, obj: Any, request: Any = None) -> AsyncIterator[Any]:
        """SGLang's, watched: the client and the deadline are checked every `DISCONNECT_POLL_S`;
        leaving early cancels SGLang's generator, whose cleanup aborts what reached the scheduler.

        A client that left before any output gets one aborted result (SGLang's streaming
        completion handler read an unbound variable when nothing came)."""
        results = super().generate_request(obj, request)
        started = time.monotonic()
        gates: dict[int, StreamHoldback] = {}
        yielded = False
        try:
            while True:
                step = asyncio.ensure_future(results.__anext__())
                try:
                    gone = await self._watch(step, request, started)
                except BaseException:
                    await _cancel(step)
                    raise
                if gone:
                    await _cancel(step)
                    if not yielded:
                        yield self._aborted(obj)
                    return
                try:
                    result = step.result()
                except StopAsyncIteration:
                    return
                if obj.stream:
                    _raise_if_failed(result)  # a non-streamed one SGLang raises itself
                    if not _release(gates, result):
                        continue
                yielded = True
                yield self._with_model(result)
        finally:
            await results.aclose()

    async def _watch(self, step: asyncio.Future, request: Any, started: float) -> bool:
        """Wait for `step`; True when the client left first. Raises 504 past the deadline."""
        while True:
            done, _ = await asyncio.wait({step}, timeout=DISCONNECT_POLL_S)
            if done:
                return False
            if request is not None and await request.is_disconnected():
                logger.info("client disconnected; abort its %s request", self.model)
                return True
            if self.request_timeout_s is not None and time.monotonic() - started > self.request_timeout_s:
                raise for_sglang(
                    RequestError(
                        f"the request exceeded its deadline of {self.request_timeout_s:g} s "
                        "(--request-timeout); aborted",
                        504,
                        "TimeoutError",
                    )
                )

    def _with_model(self, result: Any) -> Any:
        """Which model answered, in every result's meta_info (our native API's field)."""
        for one in result if isinstance(result, list) else [result]:
            one["meta_info"]["model"] = self.model
        return result

    def config_value(self, name: str) -> Any:
        """The per-model parsers come from this model's config, not the process's one context."""
        if name in _PER_MODEL_CONFIG:
            return getattr(self.server_args, name, None)
        return super().config_value(name)

    def _aborted(self, obj: Any) -> Any:
        version = self.config_value("weight_version") or "default"
        if obj.is_single:
            return _aborted_result(obj.rid, version)
        if obj.stream:
            return {**_aborted_result(obj.rid[0], version), "index": 0}
        return [_aborted_result(rid, version) for rid in obj.rid]

    def _set_default_priority(self, obj: Any) -> None:
        """The one hook SGLang calls once per request, after normalisation and before any state,
        tokenisation or send: where admission and the request-wide checks go."""
        super()._set_default_priority(obj)
        try:
            self._admit(obj)
        except RequestError as e:
            raise for_sglang(e) from e

    def _admit(self, obj: Any) -> None:
        check_supported_fields(obj)
        check_request_ids(obj.rid, obj.is_single)
        n = obj.parallel_sample_num
        check_num_choices(n)
        prompts = 1 if obj.is_single else obj.batch_size
        if prompts == 0:
            raise RequestError("the request asks for no generation (an empty batch)", param="text")
        for params in [obj.sampling_params] if isinstance(obj.sampling_params, dict) else obj.sampling_params:
            rename_seed(params)
        if self.admission is not None:
            # n > 1: one prompt-only request per prompt first, then the n samples of each
            self.admission.check_admission(self.model, prompts * n + (prompts if n > 1 else 0))
        if n > 1:
            for i in range(prompts):  # SGLang copies these per sample: the counter travels along
                setattr(obj[i], _SAMPLE_COUNTER, itertools.count())

    async def _tokenize_one_request(self, obj: Any) -> Any:
        """Our field checks (types SGLang trusts, token ids in the vocabulary, a text too long for
        any tokenisation to fit the context) before SGLang tokenises."""
        try:
            setattr(obj, _OUR_PARAMS, check_request(obj, self.info.vocab_size))
            self._check_text_length(obj)
        except RequestError as e:
            raise for_sglang(e) from e
        return await super()._tokenize_one_request(obj)

    def _check_text_length(self, obj: Any) -> None:
        if not isinstance(obj.text, str) or obj.input_ids is not None:
            return
        if self.max_token_chars is None:
            vocab = getattr(self.tokenizer, "get_vocab", dict)()
            self.max_token_chars = max(16, max(map(len, vocab), default=0))
        if len(obj.text) > self.info.context_len * self.max_token_chars * 2:
            # No tokenisation can fit this in the context (a 50 MB prompt took ~60 s to refuse).
            raise RequestError(
                f"This model's maximum context length is {self.info.context_len} tokens; a prompt of "
                f"{len(obj.text)} characters cannot fit it (model {self.model!r})",
                param="prompt",
            )

    async def _tokenize_texts(self, texts: Any, is_cross_encoder: bool = False) -> Any:
        """SGLang's, in a worker thread for long texts (it awaits nothing when, as here, no
        asynchronous batch tokenizer is configured)."""
        size = len(texts) if isinstance(texts, str) else sum(map(len, texts or []))
        if size <= TOKENIZE_INLINE_CHARS or self.async_dynamic_batch_tokenizer is not None:
            return await super()._tokenize_texts(texts, is_cross_encoder)
        tokenize = super()._tokenize_texts
        return await asyncio.to_thread(lambda: asyncio.run(tokenize(texts, is_cross_encoder)))

    def _validate_one_request(self, obj: Any, input_ids: list[int]) -> None:
        """Our prompt checks (non-empty, in the vocabulary, room for the completion), then SGLang's."""
        try:
            params = getattr(obj, _OUR_PARAMS, None) or our_sampling_params(obj.sampling_params)
            info = self.info
            tokenised = obj.input_ids is None  # given ids were checked against the vocabulary already
            ids = list(input_ids or [])
            check_prompt(ids, params, info.context_len, info.vocab_size, self.model, check_vocab=tokenised)
        except RequestError as e:
            raise for_sglang(e) from e
        super()._validate_one_request(obj, input_ids)

    async def _send_one_request(self, tokenized_obj: Any) -> None:
        """Sample j of an n > 1 request gets seed + j, like separate requests with those seeds."""
        state = self.rid_to_state.get(tokenized_obj.rid)
        params = tokenized_obj.sampling_params
        counter = getattr(state.obj, _SAMPLE_COUNTER, None) if state is not None else None
        if counter is not None and params.sampling_seed is not None and params.max_new_tokens != 0:
            tokenized_obj.sampling_params = copy.copy(params)
            tokenized_obj.sampling_params.sampling_seed = params.sampling_seed + next(counter)
        await super()._send_one_request(tokenized_obj)
        self._timing[tokenized_obj.rid] = [time.monotonic(), 0.0, 0]
        self.metrics.on_request(self.model)

    # ---- outputs -------------------------------------------------------------------------------
    async def _handle_batch_output(self, recv_obj: Any) -> None:
        """SGLang's, after reporting each row to the metrics (before SGLang drops finished states)."""
        if hasattr(recv_obj, "completion_tokens"):
            self._report(recv_obj)
        await super()._handle_batch_output(recv_obj)

    def _report(self, recv_obj: Any) -> None:
        now = time.monotonic()
        for i, rid in enumerate(recv_obj.rids):
            timing = self._timing.get(rid)
            if timing is None:
                continue
            sent, last, tokens = timing
            total = recv_obj.completion_tokens[i]
            if total > tokens:
                if tokens == 0:
                    self.metrics.on_first_token(self.model, now - sent)
                else:
                    self.metrics.on_inter_token(self.model, (now - last) / (total - tokens))
                timing[1], timing[2] = now, total
            reason = recv_obj.finished_reasons[i]
            if reason is not None:
                del self._timing[rid]
                self.metrics.on_finish(self.model, reason, recv_obj.prompt_tokens[i], total)

    def fail_all(self, message: str) -> None:
        """The engine is gone (a child process died): every in-flight request finishes with a 503."""
        reason = {"type": "abort", "message": message, "status_code": 503}
        for rid, state in list(self.rid_to_state.items()):
            meta = {"id": rid, "finish_reason": reason, "prompt_tokens": 0, "completion_tokens": 0}
            state.out_list.append({"text": "", "output_ids": [], "meta_info": meta})
            state.finished = True
            state.event.set()
        self._timing.clear()


def _raise_if_failed(result: dict[str, Any]) -> None:
    """A streamed finish with a status code (the engine failed it) is an error for the client."""
    reason = result["meta_info"].get("finish_reason")
    if isinstance(reason, dict) and reason.get("status_code"):
        raise for_sglang(RequestError(reason.get("message", "error"), reason["status_code"]))


def _release(gates: dict[int, StreamHoldback], result: dict[str, Any]) -> bool:
    """Whether a streamed result goes to the client now (a batch's carry their `index`)."""
    gate = gates.setdefault(result.get("index", 0), StreamHoldback())
    return gate.release(result)


async def _cancel(step: asyncio.Future) -> None:
    step.cancel()
    try:
        await step
    except (asyncio.CancelledError, Exception):
        pass  # the generator's own cleanup ran; what it raised on the way out is moot
