"""The scheduler process: our MultiModelScheduler behind ZMQ, started with `spawn`.

Loop: receive requests (block on the socket when there is nothing to run, so an
idle server never spins a core), add/abort, step, send the outputs on to the
detokenizer. The loop checks its parent once a second while idle and exits when
the parent is gone, so a killed launcher leaves no orphan.

The wire is SGLang's both ways (`sock_recv`/`sock_send`): in come SGLang's
`TokenizedGenerateReqInput` (ours adds the model: `MultiModelTokenizedGenerateReqInput`; a plain one
is for the first model; `BatchTokenizedGenerateReqInput` holds several), `AbortReq`,
`FlushCacheReqInput` and `GetInternalStateReq`. `core_request` turns SGLang's request into the
engine core's `Req` (the core never sees an SGLang type). Out go `FlushCacheReqOutput`,
`GetInternalStateReqOutput` (our per-model pool usage) and the core's `ReqOutput`s as SGLang's
`BatchTokenIDOutput`, one per model and destination per step (`token_id_output.py`), so SGLang's
DetokenizerManager can decode them. Every reply carries the `http_worker_ipc` its request came with
(SGLang's routing field: a `ModelTokenizerManager`'s own address; None for the one default).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sized
from typing import Any

import msgspec
import zmq
from sglang.srt.managers.io_struct import sock_recv, sock_send
from sglang.srt.sampling.sampling_params import TOP_K_ALL

from crosspool_sgl.core.req import Req, ReqOutput
from crosspool_sgl.managers.io_struct import (
    AbortReq,
    BatchTokenizedGenerateReqInput,
    FlushCacheReqInput,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    MultiModelTokenizedGenerateReqInput,
    TokenizedGenerateReqInput,
)
from crosspool_sgl.managers.io_struct import SamplingParams as SGLangSamplingParams
from crosspool_sgl.managers.process_liveness import LauncherWatch
from crosspool_sgl.managers.token_id_output import DetokenizeOptions, TokenIdOutputs
from crosspool_sgl.runtime import Runtime, build_runtime, usable_cores
from crosspool_sgl.sampling_params import InvalidRequestError, SamplingParams
from crosspool_sgl.server_args import EngineArgs

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000  # how often an idle scheduler checks that its parent is alive


class SchedulerServer:
    """Owns the runtime and the two sockets; one type->handler table for incoming messages."""

    def __init__(self, runtime: Runtime, recv_addr: str, send_addr: str) -> None:
        self.runtime = runtime
        self.scheduler = runtime.scheduler
        self.context = zmq.Context(2)
        self.receiver = self.context.socket(zmq.PULL)
        self.receiver.bind(recv_addr)
        self.sender = self.context.socket(zmq.PUSH)
        self.sender.connect(send_addr)
        self.token_id_outputs = TokenIdOutputs(self.scheduler.detokenizers)
        self.stopping = False
        self.default_model = next(iter(runtime.models))
        self.dispatch = {
            MultiModelTokenizedGenerateReqInput: self.handle_generate,
            TokenizedGenerateReqInput: self.handle_generate,
            BatchTokenizedGenerateReqInput: self.handle_generate_batch,
            AbortReq: self.handle_abort,
            FlushCacheReqInput: self.handle_flush_cache,
            GetInternalStateReq: self.handle_info,
        }

    def event_loop(self) -> None:
        launcher = LauncherWatch()
        while not self.stopping:
            for msg in self.recv_all(block=not self.scheduler.has_work()):
                self.handle(msg)
            self.send_outputs(self.safe_step())  # also polls weights residency, idle or not
            if not launcher.alive():
                logger.warning("parent process is gone; scheduler exits")
                return

    def handle(self, msg: Any) -> None:
        """One message; an exception is that message's error (its request fails), never the loop's."""
        handler = self.dispatch.get(type(msg))
        if handler is None:
            logger.error("dropped a message of unknown type %s", type(msg).__name__)
            return
        try:
            handler(msg)
        except Exception as e:
            rid = getattr(msg, "rid", None)
            logger.exception("failed to handle %s (request %s)", type(msg).__name__, rid)
            if isinstance(msg, TokenizedGenerateReqInput):
                self.fail_new_request(msg, f"internal error: {type(e).__name__}: {e}", 500)

    def safe_step(self) -> list[ReqOutput]:
        """One scheduler step; if it raises, the requests of its batch get a 500 and the loop goes on."""
        try:
            return self.scheduler.step()
        except Exception as e:
            rids = [r.rid for r in self.scheduler.running] or [r.rid for r in self.scheduler.waiting]
            logger.exception("scheduler step failed; failing its batch: %s", ", ".join(rids))
            return self.scheduler.fail_step(
                f"internal error while running the batch: {type(e).__name__}: {e}"
            )

    def fail_new_request(self, msg: TokenizedGenerateReqInput, message: str, status_code: int) -> None:
        """Answer a request the scheduler did not (or only partly) take with an error output."""
        if self.scheduler.fail_request(msg.rid, message, status_code):
            return  # it was queued: the scheduler emits its error with the next outputs
        if msg.rid not in self.token_id_outputs.streams:  # its error goes where it came from
            self.token_id_outputs.add(msg.rid, DetokenizeOptions(), msg.http_worker_ipc)
        reason = {"type": "abort", "message": message, "status_code": status_code}
        prompt_len = len(msg.input_ids) if isinstance(msg.input_ids, Sized) else 0
        model = getattr(msg, "model", self.default_model)
        self.send_outputs([ReqOutput(msg.rid, model, [], [], [], True, reason, prompt_len, 0)])

    def recv_all(self, block: bool) -> list[Any]:
        msgs = []
        if block and not self.receiver.poll(_IDLE_POLL_MS):
            return msgs
        while True:
            try:
                msgs.append(sock_recv(self.receiver, zmq.NOBLOCK))
            except zmq.Again:
                return msgs

    def send_outputs(self, outputs: list[ReqOutput]) -> None:
        """One SGLang BatchTokenIDOutput per model that has outputs this step."""
        for msg in self.token_id_outputs.convert(outputs):
            sock_send(self.sender, msg)

    # ---- handlers -----------------------------------------------------------------------
    def handle_generate(self, msg: TokenizedGenerateReqInput) -> None:
        try:
            req = core_request(msg, self.default_model)
            self.scheduler.add_request(req)
        except (InvalidRequestError, TypeError, ValueError) as e:
            logger.info("rejected %s: %s", msg.rid, e)
            self.fail_new_request(msg, str(e), 400)
            return
        # Its outputs go to the manager that sent it (None: the one default destination).
        self.token_id_outputs.add(msg.rid, DetokenizeOptions.of(req.params), msg.http_worker_ipc)

    def handle_generate_batch(self, msg: BatchTokenizedGenerateReqInput) -> None:
        """SGLang's TokenizerManager sends a batch of pre-tokenised prompts as one message."""
        for req in msg.batch:
            self.handle(req)

    def handle_abort(self, msg: AbortReq) -> None:
        if self.scheduler.abort(msg.rid):
            logger.info("aborted %s", msg.rid)
        else:
            self.token_id_outputs.forget(msg.rid)  # finished already, or never admitted

    def handle_flush_cache(self, msg: FlushCacheReqInput) -> None:
        # Like SGLang: only flush when idle, so running requests keep their cached prefixes.
        idle = not self.scheduler.has_work()
        if idle:
            freed = self.scheduler.flush_cache()
            logger.info("flush_cache: %d cached prefix pages freed", freed)
        reply = FlushCacheReqOutput(rid=msg.rid, http_worker_ipc=msg.http_worker_ipc, success=idle)
        sock_send(self.sender, reply)

    def handle_info(self, msg: GetInternalStateReq) -> None:
        info = scheduler_info(self.runtime)
        reply = GetInternalStateReqOutput(
            rid=msg.rid, http_worker_ipc=msg.http_worker_ipc, internal_state=info
        )
        sock_send(self.sender, reply)


# ---- SGLang's request -> the engine core's ----------------------------------------------
# TokenizedGenerateReqInput fields the core serves; every other one must hold its default.
_SERVED = frozenset(
    {"rid", "http_worker_ipc", "model", "input_text", "input_ids", "sampling_params", "return_logprob"}
    | {"logprob_start_len", "top_logprobs_num", "stream", "time_stats", "sampling_logprobs_mode"}
)
# SGLang sampling fields we do not act on: passed to our parser, which refuses them unless neutral.
# (`n` is not one: SGLang's TokenizerManager sends each of n samples as its own request, `n` left as
# the client gave it, and SGLang's scheduler never reads it; nor do we.)
_UNSERVED_SAMPLING = ("beam_width", "custom_params", "watermark", "stream_interval")


def core_request(msg: TokenizedGenerateReqInput, default_model: str) -> Req:
    """SGLang's request as the core's `Req`. Its sampling params are parsed and checked again
    (the tokenizer side checked them; this process must not trust its socket): InvalidRequestError,
    TypeError or ValueError means a 400 for that request."""
    unserved = [
        f.name
        for f in msgspec.structs.fields(msg)
        if f.name not in _SERVED and getattr(msg, f.name) != _default(f)
    ]
    if unserved:
        raise InvalidRequestError(f"unsupported request fields: {', '.join(unserved)}")
    sp = msg.sampling_params
    if not isinstance(sp, SGLangSamplingParams):
        raise InvalidRequestError(f"sampling_params must be SGLang's SamplingParams, got {sp!r}")
    params = SamplingParams.from_dict(our_sampling_dict(sp))
    model = getattr(msg, "model", default_model)
    ids = list(msg.input_ids or [])
    return Req(msg.rid, model, ids, params, msg.return_logprob, msg.logprob_start_len, msg.top_logprobs_num)


def _default(f: msgspec.structs.FieldInfo) -> Any:
    """What a field holds when the sender left it alone (a required one we never fill: None)."""
    if f.default is not msgspec.NODEFAULT:
        return f.default
    return None if f.default_factory is msgspec.NODEFAULT else f.default_factory()


def our_sampling_dict(sp: SGLangSamplingParams) -> dict[str, Any]:
    """SGLang's SamplingParams as the dict our `SamplingParams.from_dict` parses. SGLang spells greedy
    top_k 1 (its `__post_init__` turns temperature 0 into temperature 1, top_k 1), ours temperature 0;
    its "whole vocabulary" top_k is our -1."""
    stop = sp.stop_strs if sp.is_normalized else sp.stop
    greedy = sp.top_k == 1
    return {
        "max_new_tokens": sp.max_new_tokens,
        "temperature": 0.0 if greedy else sp.temperature,
        "top_p": sp.top_p,
        "top_k": -1 if greedy or sp.top_k == TOP_K_ALL else sp.top_k,
        "min_p": sp.min_p,
        "stop": stop or [],
        "stop_token_ids": sorted(sp.stop_token_ids or ()),
        "ignore_eos": sp.ignore_eos,
        "seed": sp.sampling_seed,
        "skip_special_tokens": sp.skip_special_tokens,
        "spaces_between_special_tokens": sp.spaces_between_special_tokens,
        "no_stop_trim": sp.no_stop_trim,
        "frequency_penalty": sp.frequency_penalty,
        "presence_penalty": sp.presence_penalty,
        "repetition_penalty": sp.repetition_penalty,
        "min_new_tokens": sp.min_new_tokens,
        "logit_bias": sp.logit_bias,
        "regex": sp.regex,
        "json_schema": sp.json_schema,
        "ebnf": sp.ebnf,
        "structural_tag": sp.structural_tag,
        "stop_regex": (sp.stop_regex_strs if sp.is_normalized else sp.stop_regex) or None,
        **{name: getattr(sp, name) for name in _UNSERVED_SAMPLING},
    }


def scheduler_info(runtime: Runtime) -> dict[str, Any]:
    """Pool usage and queue depths, per model."""
    snap = runtime.kv_pool.snapshot()
    sched = runtime.scheduler
    models = list(runtime.models)
    return {
        "kv_pool": {
            "total_bytes": snap.total_bytes,
            "free_bytes": snap.free_bytes,
            "chunk_bytes": snap.chunk_bytes,
            "num_chunks": snap.num_chunks,
            "num_free_chunks": snap.num_free_chunks,
            # pages held by requests; unreferenced cached prefixes are reported under prefix_cache
            "used_pages": {m: sched.request_pages(m) for m in models},
            "used_bytes": {m: sched.request_pages(m) * runtime.kv_pool.page_bytes(m) for m in models},
            "allocated_pages": dict(snap.used_pages),
            "owned_bytes": dict(snap.owned_bytes),
        },
        "planner_decisions": {
            "grant": dict(runtime.kv_pool.num_grants),
            **{d: dict(c) for d, c in sched.counters.items()},
        },
        "weight_pool": {
            "used_bytes": runtime.weight_pool.used_bytes,
            "model_bytes": dict(runtime.weight_pool.model_bytes),
            **(runtime.residency.snapshot() if runtime.residency is not None else {}),
        },
        "num_waiting": {m: sum(r.model == m for r in sched.waiting) for m in models},
        "num_running": {m: sum(r.model == m for r in sched.running) for m in models},
        "num_steps": sched.num_steps,
        **_prefix_cache_info(sched, models),
    }


def _prefix_cache_info(sched: Any, models: list[str]) -> dict[str, Any]:
    """Cached/evictable prefix pages per model, when the scheduler has a prefix cache."""
    cache = getattr(sched, "prefix_cache", None)
    if cache is None or not hasattr(cache, "cached_pages"):
        return {}
    return {
        "prefix_cache": {
            "cached_pages": {m: cache.cached_pages(m) for m in models},
            "evictable_pages": {m: cache.evictable_pages(m) for m in models},
        }
    }


def _ffn_pids(runtime: Runtime) -> list[int]:
    """The FFN worker processes (disaggregated mode), for the launcher's watchdog."""
    ffn = getattr(runtime.scheduler.runner, "ffn", None)
    return [p.pid for p in getattr(ffn, "procs", [])]


def run_scheduler_process(
    engine_args: EngineArgs,
    recv_addr: str,
    send_addr: str,
    pipe_writer: Any,
    num_threads: int | None = None,
    log_level: str = "info",
) -> None:
    """Process entry (top level, so `spawn` can import it). Reports ready/error on the pipe."""
    logging.basicConfig(level=log_level.upper(), format="[scheduler] %(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher owns shutdown
    import torch

    try:
        runtime = build_runtime(engine_args)
        server = SchedulerServer(runtime, recv_addr, send_addr)
        # Default: every usable core — with the prefill lane, one thread here and one in the lane
        # (intra-op threads waiting on each other were slower whenever the other core was busy).
        torch.set_num_threads(num_threads or (1 if runtime.scheduler.lane is not None else usable_cores()))
    except Exception as e:  # reported to the launcher, which exits non-zero
        logger.exception("scheduler failed to start")
        pipe_writer.send({"status": "error", "message": f"{type(e).__name__}: {e}"})
        raise SystemExit(1) from e
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "stopping", True))
    pipe_writer.send(
        {"status": "ready", "info": scheduler_info(runtime), "ffn_worker_pids": _ffn_pids(runtime)}
    )
    with torch.inference_mode():
        server.event_loop()
