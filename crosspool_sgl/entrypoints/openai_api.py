"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Requests are parsed and responses built with SGLang's own OpenAI protocol
models (`sglang.srt.entrypoints.openai.protocol`), so field names and shapes are
SGLang's; the `model` field picks the hosted model.

The server's default is now SGLang's own handlers (`sglang_openai.py`); these routes
serve /v1/completions and /v1/chat/completions with --openai-frontend own,
and /v1/models always.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sglang.srt.entrypoints.openai import protocol as oai

from crosspool_sgl.entrypoints.http_io import read_json, sse, validate
from crosspool_sgl.managers.tokenizer_manager import GenerateInput, MultiModelTokenizerManager, RequestError
from crosspool_sgl.managers.validation import check_num_choices
from crosspool_sgl.sampling_params import sample_seed

_DEFAULT_MAX_TOKENS = 128


def sampling_params(req: Any, max_tokens: int | None) -> dict[str, Any]:
    stop = req.stop if req.stop is not None else []
    return {
        "max_new_tokens": _DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": -1 if req.top_k is None else req.top_k,
        "min_p": req.min_p or 0.0,
        "stop": [stop] if isinstance(stop, str) else list(stop),
        "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": bool(req.ignore_eos),
        "seed": req.seed,
        "skip_special_tokens": req.skip_special_tokens,
        "no_stop_trim": bool(req.no_stop_trim),
        **_sampling_surface(req),
    }


def _sampling_surface(req: Any) -> dict[str, Any]:
    """Penalties, logit_bias, min_tokens and constraints, named as SGLang's sampling params;
    `response_format` as SGLang's handlers translate it. Tools need SGLang's handlers (400 here)."""
    if getattr(req, "tools", None) and getattr(req, "tool_choice", None) != "none":
        raise RequestError("`tools` need SGLang's handlers (--openai-frontend sglang)", param="tools")
    out: dict[str, Any] = {}
    names = {"min_tokens": "min_new_tokens"}
    for k in ("frequency_penalty", "presence_penalty", "repetition_penalty", "min_tokens", "logit_bias"):
        if getattr(req, k, None) is not None:
            out[names.get(k, k)] = getattr(req, k)
    for k in ("regex", "ebnf", "json_schema"):
        if getattr(req, k, None) is not None:
            out[k] = getattr(req, k)
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        out["json_schema"] = '{"type": "object"}'
    elif fmt is not None and fmt.type == "json_schema":
        out["json_schema"] = json.dumps(fmt.json_schema.schema_)
    return out


def finish_reason(meta: dict[str, Any]) -> tuple[str | None, Any]:
    reason = meta.get("finish_reason")
    if not reason:
        return None, None
    return reason.get("type"), reason.get("matched")


def usage(results: list[dict[str, Any]], num_prompts_counted: list[int]) -> oai.UsageInfo:
    prompt = sum(results[i]["meta_info"]["prompt_tokens"] for i in num_prompts_counted)
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    return oai.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_logprobs(entries: list, tops: list | None, offset: int) -> oai.LogProbs:
    out = oai.LogProbs()
    for i, (lp, _tid, text) in enumerate(entries):
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.text_offset.append(offset)
        offset += len(text)
        if tops is not None:
            out.top_logprobs.append({t: v for v, _, t in tops[i]})
    return out


def chat_logprobs(entries: list, tops: list | None) -> oai.ChoiceLogprobs:
    content = []
    for i, (lp, _tid, text) in enumerate(entries):
        top = [
            oai.TopLogprob(token=t, bytes=list(t.encode()), logprob=v)
            for v, _, t in (tops[i] if tops else [])
        ]
        content.append(
            oai.ChatCompletionTokenLogprob(
                token=text, bytes=list(text.encode()), logprob=lp, top_logprobs=top
            )
        )
    return oai.ChoiceLogprobs(content=content)


def completion_prompts(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"text": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [{"input_ids": prompt}]
    if isinstance(prompt, list) and prompt:
        return [{"text": p} if isinstance(p, str) else {"input_ids": p} for p in prompt]
    raise RequestError("`prompt` must be a non-empty string, list of strings, or token ids", param="prompt")


def chat_prompt_ids(tm: MultiModelTokenizerManager, model: str, req: Any) -> list[int]:
    """Render the messages with the model's own chat template (its HF tokenizer)."""
    tok = tm.tokenizers[model]
    if not getattr(tok, "chat_template", None):
        raise RequestError(f"model {model!r} has no chat template; use /v1/completions", param="messages")
    messages = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(getattr(part, "text", None) or "" for part in content)
        messages.append({"role": m.role, "content": content or ""})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


class Choices:
    """The n choices of one OpenAI request as submitted requests; streams them as one merged feed."""

    def __init__(self, tm: MultiModelTokenizerManager, states: list[Any]) -> None:
        self.tm, self.states = tm, states

    @classmethod
    async def submit(cls, tm: MultiModelTokenizerManager, objs: list[GenerateInput]) -> Choices:
        return cls(tm, await tm.submit_all(objs))

    async def collect(self, request: Request) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.tm.collect(s, request.is_disconnected) for s in self.states)))

    def stream(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        return self.tm.merge_streams(self.states)


def build_openai_router(tm: MultiModelTokenizerManager) -> APIRouter:
    router = APIRouter()

    def card(name: str) -> oai.ModelCard:
        m = tm.models[name]
        return oai.ModelCard(id=m.name, root=m.path, owned_by="crosspool-sgl", max_model_len=m.context_len)

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return oai.ModelList(data=[card(name) for name in tm.models]).model_dump()

    @router.get("/models/{model_name}/v1/models")
    async def list_one_model(model_name: str) -> dict[str, Any]:
        """A model's prefix answers like SGLang's one-model server (clients probe it for readiness)."""
        return oai.ModelList(data=[card(tm.resolve_model(model_name))]).model_dump()

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        """One model's card (`client.models.retrieve`); an unknown id is a 404 with OpenAI's body."""
        if not model_id:  # resolve_model reads an empty name as the default model
            raise RequestError("The model `` does not exist", 404, "NotFoundError", "model")
        return card(tm.resolve_model(model_id)).model_dump()

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle_completions(tm, request)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle_chat_completions(tm, request)

    return router


async def handle_completions(tm: MultiModelTokenizerManager, request: Request) -> Response:
    req = validate(oai.CompletionRequest, await read_json(request))
    model = tm.resolve_model(req.model)
    check_num_choices(req.n)
    params = sampling_params(req, req.max_tokens)
    want_lp = req.logprobs is not None
    objs = [
        GenerateInput(
            model=model,
            sampling_params={**params, "seed": sample_seed(params["seed"], j)},
            return_logprob=want_lp,
            top_logprobs_num=req.logprobs or 0,
            return_text_in_logprobs=True,
            **p,
        )
        for p in completion_prompts(req.prompt)
        for j in range(req.n)
    ]
    choices = await Choices.submit(tm, objs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream_completion(choices, rid, model, req.n, include_usage), media_type="text/event-stream"
        )
    results = await choices.collect(request)
    out = []
    for i, r in enumerate(results):
        meta = r["meta_info"]
        reason, matched = finish_reason(meta)
        lp = None
        if want_lp:
            lp = completion_logprobs(meta["output_token_logprobs"], meta.get("output_top_logprobs"), 0)
        out.append(
            oai.CompletionResponseChoice(
                index=i, text=r["text"], logprobs=lp, finish_reason=reason, matched_stop=matched
            )
        )
    prompt_heads = list(range(0, len(results), req.n))  # count each prompt once, not once per choice
    resp = oai.CompletionResponse(id=rid, model=model, choices=out, usage=usage(results, prompt_heads))
    return JSONResponse(resp.model_dump(exclude_none=True))


async def handle_chat_completions(tm: MultiModelTokenizerManager, request: Request) -> Response:
    req = validate(oai.ChatCompletionRequest, await read_json(request))
    model = tm.resolve_model(req.model)
    check_num_choices(req.n)
    ids = chat_prompt_ids(tm, model, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens)
    want_lp = bool(req.logprobs)
    objs = [
        GenerateInput(
            model=model,
            input_ids=ids,
            sampling_params={**params, "seed": sample_seed(params["seed"], j)},
            return_logprob=want_lp,
            top_logprobs_num=(req.top_logprobs or 0) if want_lp else 0,
            return_text_in_logprobs=True,
        )
        for j in range(req.n or 1)
    ]
    choices = await Choices.submit(tm, objs)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream_chat(choices, rid, model, include_usage), media_type="text/event-stream"
        )
    results = await choices.collect(request)
    out = []
    for i, r in enumerate(results):
        meta = r["meta_info"]
        reason, matched = finish_reason(meta)
        lp = (
            chat_logprobs(meta["output_token_logprobs"], meta.get("output_top_logprobs")) if want_lp else None
        )
        message = oai.ChatMessage(role="assistant", content=r["text"])
        out.append(
            oai.ChatCompletionResponseChoice(
                index=i, message=message, logprobs=lp, finish_reason=reason, matched_stop=matched
            )
        )
    resp = oai.ChatCompletionResponse(id=rid, model=model, choices=out, usage=usage(results, [0]))
    return JSONResponse(resp.model_dump(exclude_none=True))


async def _stream_completion(
    choices: Choices, rid: str, model: str, n: int, include_usage: bool
) -> AsyncIterator[bytes]:
    created = int(time.time())
    sent_text: dict[int, int] = {}
    sent_lp: dict[int, int] = {}
    finals: dict[int, dict[str, Any]] = {}
    try:
        async for index, r in choices.stream():
            meta = r["meta_info"]
            start, lp_start = sent_text.get(index, 0), sent_lp.get(index, 0)
            delta = r["text"][start:]
            reason, matched = finish_reason(meta)
            lp = None
            if "output_token_logprobs" in meta:
                tops = meta.get("output_top_logprobs")
                lp = completion_logprobs(
                    meta["output_token_logprobs"][lp_start:],
                    tops[lp_start:] if tops is not None else None,
                    start,
                )
                sent_lp[index] = len(meta["output_token_logprobs"])
            if not delta and reason is None:
                continue
            sent_text[index] = len(r["text"])
            if reason is not None:
                finals[index] = r
            choice = oai.CompletionResponseStreamChoice(
                index=index, text=delta, logprobs=lp, finish_reason=reason, matched_stop=matched
            )
            chunk = oai.CompletionStreamResponse(id=rid, created=created, model=model, choices=[choice])
            yield sse(chunk.model_dump(exclude_none=True))
    except RequestError as e:
        yield sse({"error": {"message": e.message, "type": e.err_type, "code": e.status_code}})
    if include_usage and finals:
        results = [finals[i] for i in sorted(finals)]
        chunk = oai.CompletionStreamResponse(
            id=rid,
            created=created,
            model=model,
            choices=[],
            usage=usage(results, list(range(0, len(results), n))),
        )
        yield sse(chunk.model_dump(exclude_none=True))
    yield b"data: [DONE]\n\n"


async def _stream_chat(choices: Choices, rid: str, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    sent_text: dict[int, int] = {}
    sent_lp: dict[int, int] = {}
    finals: dict[int, dict[str, Any]] = {}

    def chunk(
        index: int, delta: oai.DeltaMessage, lp: Any = None, reason: Any = None, matched: Any = None
    ) -> bytes:
        choice = oai.ChatCompletionResponseStreamChoice(
            index=index, delta=delta, logprobs=lp, finish_reason=reason, matched_stop=matched
        )
        resp = oai.ChatCompletionStreamResponse(id=rid, created=created, model=model, choices=[choice])
        return sse(resp.model_dump(exclude_none=True))

    for i in range(len(choices.states)):
        yield chunk(i, oai.DeltaMessage(role="assistant", content=""))
    try:
        async for index, r in choices.stream():
            meta = r["meta_info"]
            start, lp_start = sent_text.get(index, 0), sent_lp.get(index, 0)
            delta = r["text"][start:]
            reason, matched = finish_reason(meta)
            lp = None
            if "output_token_logprobs" in meta:
                tops = meta.get("output_top_logprobs")
                lp = chat_logprobs(
                    meta["output_token_logprobs"][lp_start:], tops[lp_start:] if tops is not None else None
                )
                sent_lp[index] = len(meta["output_token_logprobs"])
            if not delta and reason is None:
                continue
            sent_text[index] = len(r["text"])
            if reason is not None:
                finals[index] = r
            yield chunk(index, oai.DeltaMessage(content=delta), lp, reason, matched)
    except RequestError as e:
        yield sse({"error": {"message": e.message, "type": e.err_type, "code": e.status_code}})
    if include_usage and finals:
        resp = oai.ChatCompletionStreamResponse(
            id=rid,
            created=created,
            model=model,
            choices=[],
            usage=usage([finals[i] for i in sorted(finals)], [0]),
        )
        yield sse(resp.model_dump(exclude_none=True))
    yield b"data: [DONE]\n\n"
