"""OpenAI routes served by SGLang's own handlers (`OpenAIServingCompletion`, `OpenAIServingChat`).

One handler pair per hosted model, each on that model's SGLang TokenizerManager
(`managers/model_tokenizer_manager.py`): the handlers' request conversion (`GenerateReqInput`),
sampling-parameter building, chat templating, streaming, logprob and usage formatting run
unchanged. Ours: routing by the `model` field, the error body (OpenAI's `{"error": {...}}`), the
logprobs of a streamed chat step without text, and the tool checks. See managers/SGLANG_FRONTEND.md.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from crosspool_sgl.entrypoints.tool_parsers import tools_error
from crosspool_sgl.managers.errors import RequestError
from crosspool_sgl.managers.hosted_models import HostedModels

logger = logging.getLogger(__name__)


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

    def __init__(self, hosted: HostedModels) -> None:
        serving_chat, serving_completions, TemplateManager = import_handlers()
        OpenAIServingChat = _handler_class(serving_chat.OpenAIServingChat, _ChatLogprobsWithoutText)
        OpenAIServingCompletion = _handler_class(serving_completions.OpenAIServingCompletion)
        self.completion: dict[str, Any] = {}
        self.chat: dict[str, Any] = {}
        for name, tm in hosted.managers.items():
            templates = TemplateManager()
            templates.initialize_templates(tm, model_path=tm.model_path)
            self.completion[name] = OpenAIServingCompletion(tm, templates)
            self.chat[name] = OpenAIServingChat(tm, templates)


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


def build_sglang_openai_router(hosted: HostedModels) -> APIRouter:
    """/v1/completions and /v1/chat/completions through SGLang's handlers (/v1/models stays ours)."""
    from sglang.srt.entrypoints.openai import protocol as oai
    from sglang.srt.utils.json_response import model_json_response

    from crosspool_sgl.entrypoints.http_io import read_json, validate
    from crosspool_sgl.managers.validation import check_num_choices

    handlers = SGLangOpenAIHandlers(hosted)
    router = APIRouter()

    async def serve(table: dict[str, Any], model_cls: type, request: Request) -> Response:
        req = validate(model_cls, await read_json(request))
        model = hosted.resolve_model(req.model)
        check_num_choices(req.n)
        req.model = model
        refused = tools_error(
            model,
            getattr(req, "tools", None),
            getattr(req, "tool_choice", None),
            hosted.infos[model].tool_call_parser,
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
