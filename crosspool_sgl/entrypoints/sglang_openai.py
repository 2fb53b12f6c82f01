"""OpenAI routes served by SGLang's own handlers (`OpenAIServingCompletion`, `OpenAIServingChat`).

One handler pair per hosted model. Each is handed a `ModelFrontend`: a duck-typed
stand-in for SGLang's `TokenizerManager` bound to one model, which answers the
attributes the handlers read (`tokenizer`, `model_config`, `server_args`,
`served_model_name`, `model_path`, `processor`, `request_logger`,
`config_value`, `create_abort_task`, `generate_request`) and forwards generation
to our `MultiModelTokenizerManager`. The handlers' own request conversion
(`GenerateReqInput`), sampling-parameter building, chat templating, streaming,
logprob and usage formatting run unchanged. See managers/SGLANG_FRONTEND.md.

Process config: the handlers read `get_serving()` / `get_observability()` /
`get_model()` at request time, so this process publishes one SGLang
`ServerArgs` (role "tokenizer") with the first model's path; only
model-independent serving flags are read from it. Each model's SGLang
`ModelConfig` is built once at start-up under its own context
(`create_context` + `use_context`, synchronous, before the event loop serves
anything) and kept on its `ModelFrontend`; no context is swapped at request time.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from starlette.background import BackgroundTasks

from crosspool_sgl.entrypoints.tool_parsers import tools_error
from crosspool_sgl.managers.parallel_sampling import submit_sharing_prefix
from crosspool_sgl.managers.stream_holdback import StreamHoldback, held_back
from crosspool_sgl.managers.tokenizer_manager import (
    GenerateInput,
    ModelInfo,
    MultiModelTokenizerManager,
    RequestError,
)
from crosspool_sgl.sampling_params import sample_seed

logger = logging.getLogger(__name__)

_STUBS = Path(__file__).resolve().parents[2] / "patches" / "stubs"
# GenerateReqInput/serving sampling keys -> ours; None values mean "SGLang's default" and are dropped.
_RENAMED = {"sampling_seed": "seed"}
_DROPPED = {"n"}  # parallel sampling is expanded into separate requests here


def _ensure_sgl_kernel_importable() -> None:
    """`ServerArgs.resolve_once` imports SGLang's model loader, which imports `sgl_kernel` (CPU stub)."""
    try:
        import sgl_kernel  # noqa: F401
    except ImportError:
        if _STUBS.is_dir() and str(_STUBS) not in sys.path:
            sys.path.append(str(_STUBS))


def publish_frontend_config(models: dict[str, ModelInfo]) -> Any:
    """Publish one SGLang ServerArgs for this (HTTP) process; returns it."""
    _ensure_sgl_kernel_importable()
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    first = next(iter(models.values()))
    server_args = ServerArgs(model_path=first.path, device="cpu", served_model_name=first.name)
    runtime_context.publish(server_args, role="tokenizer")
    return server_args


def _sampling_params(params: dict[str, Any] | None, index: int = 0) -> dict[str, Any]:
    """SGLang's sampling dict for the index-th of n samples (its seed offset by the index)."""
    out = {}
    for k, v in (params or {}).items():
        if v is None or k in _DROPPED:
            continue
        out[_RENAMED.get(k, k)] = v
    if out.get("seed") is not None:
        out["seed"] = sample_seed(out["seed"], index)
    return out


def _to_request_error(e: RequestError) -> Exception:
    """Our errors in the form SGLang's handlers turn into HTTP errors (ValueError -> 400)."""
    if e.status_code == 400:
        return ValueError(e.message)
    return HTTPException(status_code=e.status_code, detail=e.message)


class ModelFrontend:
    """What SGLang's OpenAI handlers need from a TokenizerManager, for one hosted model."""

    processor = None

    def __init__(self, tm: MultiModelTokenizerManager, name: str) -> None:
        from sglang.srt import runtime_context
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.server_args import ServerArgs

        info = tm.models[name]
        self.tm, self.name = tm, name
        self.tokenizer = tm.tokenizers[name]
        self.model_path = info.path
        self.served_model_name = name
        self.server_args = ServerArgs(
            model_path=info.path, device="cpu", served_model_name=name, tool_call_parser=info.tool_call_parser
        )
        # Per-model config under a model-owned context (SGLang's API for embedded per-model work);
        # synchronous, so no coroutine can observe the swapped context.
        context = runtime_context.create_context(self.server_args, role="tokenizer")
        with runtime_context.use_context(context):
            self.model_config = ModelConfig.from_server_args(self.server_args)
        self.request_logger = SimpleNamespace(log_requests=False, log_requests_level=0)

    def config_value(self, name: str) -> Any:
        return getattr(self.server_args, name, None)

    def create_abort_task(self, obj: Any) -> BackgroundTasks:
        """After a streamed response ends (or its client goes away), abort what is still running."""

        async def abort() -> None:
            rids = [obj.rid] if obj.is_single else obj.rid
            for rid in rids:
                self.tm.abort_request(rid)

        tasks = BackgroundTasks()
        tasks.add_task(abort)
        return tasks

    def _inputs(self, obj: Any) -> list[GenerateInput]:
        """A normalised GenerateReqInput -> our requests; the n samples of a prompt adjacent (as SGLang)."""
        rids = [obj.rid] if obj.is_single else obj.rid
        well_formed = isinstance(rids, list) and all(isinstance(r, str | None) for r in rids)
        if rids is not None and not well_formed:
            # e.g. `"rid": []` on one chat request: SGLang's normaliser keeps it, a set of them raised
            raise RequestError("`rid` must be a string (a list of strings for a batch)", param="rid")
        n = obj.parallel_sample_num
        singles = [obj] if obj.is_single else [obj[i] for i in range(obj.batch_size)]
        out = []
        for one in singles:
            for j in range(n):
                rid = one.rid if n == 1 else f"{one.rid}-{j}"
                out.append(
                    GenerateInput(
                        model=self.name,
                        text=one.text,
                        input_ids=one.input_ids,
                        sampling_params=_sampling_params(one.sampling_params, j),
                        return_logprob=bool(one.return_logprob),
                        logprob_start_len=-1 if one.logprob_start_len is None else one.logprob_start_len,
                        top_logprobs_num=one.top_logprobs_num or 0,
                        return_text_in_logprobs=bool(one.return_text_in_logprobs),
                        rid=rid,
                        stream=bool(one.stream),
                    )
                )
        if isinstance(rids, list) and len(set(rids)) == len(out):
            for req, rid in zip(out, rids, strict=True):  # normalize gave one rid per sample:
                req.rid = rid  # use them, so create_abort_task finds every sample
        return out

    def _shape(self, result: dict[str, Any]) -> dict[str, Any]:
        """Add the meta_info fields SGLang's TokenizerManager adds and the handlers read."""
        meta = result["meta_info"]
        meta.setdefault("weight_version", self.config_value("weight_version") or "default")
        if "output_token_logprobs" in meta:
            meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
        return result

    async def generate_request(self, obj: Any, request: Request | None = None) -> AsyncIterator[Any]:
        """SGLang's contract: single -> cumulative dicts (only the final one unless streaming);
        batch (several prompts or n > 1) -> one list, or streamed dicts carrying `index`.

        It always yields at least once: when the client leaves before the first output, SGLang's
        streaming completion handler reads the last `content` it got and raised UnboundLocalError
        on none; we yield the (aborted) state instead, which it formats for a client that is gone."""
        obj.normalize_batch_and_arguments()
        is_disconnected = request.is_disconnected if request is not None else None
        try:
            states = await submit_sharing_prefix(
                self.tm, self._inputs(obj), obj.parallel_sample_num, is_disconnected
            )
        except RequestError as e:
            raise _to_request_error(e) from e
        stream = bool(obj.stream)
        yielded = False
        try:
            if len(states) == 1 and obj.is_single:
                final = None
                results = self.tm.wait_for(states[0], is_disconnected)
                if stream:
                    results = held_back(results)
                async for result in results:
                    final = self._shape(result)
                    if stream:
                        yielded = True
                        yield final
                if not stream and final is not None:
                    yielded = True
                    yield final
            elif not stream:
                results = await asyncio.gather(*(self.tm.collect(s, is_disconnected) for s in states))
                if all(results):
                    yielded = True
                    yield [self._shape(r) for r in results]
            else:
                gates = [StreamHoldback() for _ in states]
                async for index, result in self.tm.merge_streams(states):
                    if not gates[index].release(result):
                        continue
                    result["index"] = index
                    yielded = True
                    yield self._shape(result)
        except RequestError as e:
            raise _to_request_error(e) from e
        if not yielded:  # the client went away before any output
            yield self._aborted(states, obj)

    def _aborted(self, states: list[Any], obj: Any) -> Any:
        """A final, gracefully aborted result for each request (no status code: nothing to report)."""
        out = []
        for i, s in enumerate(states):
            meta = {
                "id": s.obj.rid,
                "finish_reason": {"type": "abort", "message": "client disconnected"},
                "prompt_tokens": len(s.prompt_ids),
                "completion_tokens": len(s.output_ids),
                "cached_tokens": 0,
            }
            r = self._shape({"text": s.text, "output_ids": list(s.output_ids), "meta_info": meta})
            out.append({**r, "index": i} if obj.stream else r)
        return out[0] if len(out) == 1 and (obj.is_single or obj.stream) else out


class _OpenAIErrorBody:
    """Mixed into an SGLang handler: error bodies are OpenAI's `{"error": {...}}` (SGLang's
    handlers return the ErrorResponse fields at the top level)."""

    def create_error_response(
        self,
        message: str,
        err_type: str = "BadRequestError",
        status_code: int = 400,
        param: str | None = None,
    ) -> Response:
        from fastapi.responses import ORJSONResponse

        error = {"message": message, "type": err_type, "param": param, "code": status_code}
        headers = {"Retry-After": "1"} if status_code == 429 else None  # the queue bound is full
        return ORJSONResponse({"error": error}, status_code=status_code, headers=headers)


class _ChatLogprobsWithoutText:
    """Mixed into SGLang's chat handler: a step whose text delta is empty still sends its logprobs.

    Without a reasoning or tool parser, SGLang emits a chunk only for a non-empty delta and drops
    that step's logprob entries otherwise. The stream holdback keeps such steps back until text
    shows, except the last one: a finish on a stop string trims the text its tokens added, and
    their entries (which the non-streamed response lists) would be lost."""

    async def _generate_stream_content(self, **kw: Any) -> AsyncIterator[str]:
        from sglang.srt.entrypoints.openai.sse_utils import build_sse_content

        sent = False
        async for chunk in super()._generate_stream_content(**kw):
            sent = True
            yield chunk
        if not sent and kw.get("choice_logprobs") is not None:
            yield build_sse_content(
                chunk_id=kw["content"]["meta_info"]["id"],
                created=kw["created"],
                model=kw["request"].model,
                index=kw["index"],
                content="",
                logprobs=kw["choice_logprobs"],
            )


def _handler_class(cls: type, *mixins: type) -> type:
    return type(cls.__name__, (*mixins, _OpenAIErrorBody, cls), {})


def import_handlers() -> tuple[Any, Any, Any]:
    """SGLang's serving_chat, serving_completions and TemplateManager (the launcher imports them
    early, while its children start: `launch_server.import_frontend`)."""
    from sglang.srt.entrypoints.openai import serving_chat, serving_completions
    from sglang.srt.parser.template_manager import TemplateManager

    return serving_chat, serving_completions, TemplateManager


class SGLangOpenAIHandlers:
    """SGLang's completion and chat handlers, one pair per hosted model."""

    def __init__(self, tm: MultiModelTokenizerManager) -> None:
        serving_chat, serving_completions, TemplateManager = import_handlers()
        OpenAIServingChat = _handler_class(serving_chat.OpenAIServingChat, _ChatLogprobsWithoutText)
        OpenAIServingCompletion = _handler_class(serving_completions.OpenAIServingCompletion)
        publish_frontend_config(tm.models)
        self.completion: dict[str, Any] = {}
        self.chat: dict[str, Any] = {}
        for name in tm.models:
            frontend = ModelFrontend(tm, name)
            templates = TemplateManager()
            templates.initialize_templates(frontend, model_path=frontend.model_path)
            self.completion[name] = OpenAIServingCompletion(frontend, templates)
            self.chat[name] = OpenAIServingChat(frontend, templates)


def keep_only_named_tool(req: Any) -> None:
    """A named `tool_choice` offers the model that one function only. SGLang already renders the
    chat template with just that tool, but builds the tool-call grammar from every tool given, so a
    sampled call could name another function; filtering the request makes both agree. An unknown
    name is left for SGLang's validation to refuse with its own message."""
    choice = getattr(req, "tool_choice", None)
    if not getattr(req, "tools", None) or choice is None or isinstance(choice, str):
        return
    named = [tool for tool in req.tools if tool.function.name == choice.function.name]
    if named:
        req.tools = named


def build_sglang_openai_router(tm: MultiModelTokenizerManager) -> APIRouter:
    """/v1/completions and /v1/chat/completions through SGLang's handlers (/v1/models stays ours)."""
    from sglang.srt.entrypoints.openai import protocol as oai
    from sglang.srt.utils.json_response import model_json_response

    from crosspool_sgl.entrypoints.http_io import read_json, validate
    from crosspool_sgl.managers.validation import check_num_choices

    handlers = SGLangOpenAIHandlers(tm)
    router = APIRouter()

    async def serve(table: dict[str, Any], model_cls: type, request: Request) -> Response:
        req = validate(model_cls, await read_json(request))
        model = tm.resolve_model(req.model)
        check_num_choices(req.n)
        req.model = model
        refused = tools_error(
            model,
            getattr(req, "tools", None),
            getattr(req, "tool_choice", None),
            tm.models[model].tool_call_parser,
        )
        if refused:
            raise RequestError(refused, param="tools")
        keep_only_named_tool(req)
        return model_json_response(await table[model].handle_request(req, request))

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(handlers.completion, oai.CompletionRequest, request)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(handlers.chat, oai.ChatCompletionRequest, request)

    return router
